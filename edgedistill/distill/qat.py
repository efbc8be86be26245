"""Quantization-aware training switch: train against the weights the exporter will actually write.

The format-exact fake-quant functions live beside this module (qat_gguf, qat_onnx); each maps a
2-D float weight [out, in] to its dequantized value with a straight-through gradient. They are
looked up by "module:function" name on first use, so this module imports cleanly on its own.
"""

from __future__ import annotations

import copy
import importlib
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from edgedistill.errors import UserError
from edgedistill.formats import tensor_format, tensor_group

FAKE_QUANT: dict[str, str] = {
    "gguf-q4_0": "edgedistill.distill.qat_gguf:fake_quant_q4_0",
    "gguf-q8_0": "edgedistill.distill.qat_gguf:fake_quant_q8_0",
    "onnx-int4": "edgedistill.distill.qat_onnx:fake_quant_int4",
    "onnx-int8": "edgedistill.distill.qat_onnx:fake_quant_int8",
}


def fake_quant_fn(fmt: str) -> Callable[[Tensor], Tensor]:
    if fmt not in FAKE_QUANT:
        raise UserError(f"no fake-quant for format {fmt!r}; known: {', '.join(FAKE_QUANT)}")
    module_name, _, attr = FAKE_QUANT[fmt].partition(":")
    return getattr(importlib.import_module(module_name), attr)


class FakeQuant(nn.Module):
    """Parametrization: the module computes with fake_quant(weight); the float master is trained.

    `fmt` is this tensor's format; `base` and `group_bits` are the model-wide setting it came from,
    kept so that the setting can be read back from the model (checkpoints, copies).
    """

    def __init__(self, fmt: str, base: str, group_bits: dict | None):
        super().__init__()
        self.fmt, self.base, self.group_bits = fmt, base, group_bits
        self.fn = fake_quant_fn(fmt)

    def forward(self, weight: Tensor) -> Tensor:
        # parametrize requires the dtype to be unchanged; a float32 fake-quant of bf16 weights
        # would otherwise be rejected.
        return self.fn(weight).to(weight.dtype)

    def extra_repr(self) -> str:
        return self.fmt


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) for the modules whose weights the exporters quantize.

    In a Llama-family causal LM every nn.Linear sits in a decoder layer or is the lm_head, and the
    only nn.Embedding is the token embedding, whose [vocab, hidden] rows are quantized along hidden
    like any [out, in] matrix. Norms stay float in every format.
    """
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]


def enable_fake_quant(model: nn.Module, fmt: str, group_bits: dict | None = None) -> None:
    """Make every quantized module compute with its fake-quant weights, in place.

    Each module's format is fmt, or the same runtime's wider format its tensor group asks for in
    group_bits (edgedistill.formats.tensor_format), exactly as the exporters choose.

    register_parametrization moves the existing Parameter object to
    `parametrizations.weight.original`, so an optimizer built before this call keeps training it,
    and a tied embedding / lm_head (one Parameter in two modules, both in the "embed" group)
    stays a single tensor.
    """
    disable_fake_quant(model)
    for name, module in quantized_modules(model):
        module_fmt = tensor_format(fmt, tensor_group(name), group_bits)
        parametrize.register_parametrization(module, "weight", FakeQuant(module_fmt, fmt, group_bits))


def disable_fake_quant(model: nn.Module) -> None:
    """Undo enable_fake_quant: the modules hold their float master weights again, same objects."""
    for _, module in quantized_modules(model):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


def _any_fake_quant(model: nn.Module) -> FakeQuant | None:
    for _, module in quantized_modules(model):
        if parametrize.is_parametrized(module, "weight"):
            return module.parametrizations.weight[0]
    return None


def fake_quant_format(model: nn.Module) -> str | None:
    """The format (the artifact's, before group_bits) whose fake-quant is enabled on model, or None."""
    fq = _any_fake_quant(model)
    return fq.base if fq is not None else None


def fake_quant_group_bits(model: nn.Module) -> dict | None:
    """The group_bits fake-quant was enabled with on model (None when off or not given)."""
    fq = _any_fake_quant(model)
    return fq.group_bits if fq is not None else None


@torch.no_grad()
def fake_quant_model_copy(model: nn.Module, fmt: str, group_bits: dict | None = None) -> nn.Module:
    """A deep copy whose weights are plain tensors holding the fake-quant values of fmt + group_bits.

    This is what an artifact of format fmt exported with group_bits should compute; the verify
    stage compares against it. A tied weight is quantized once (both of its modules are in the
    "embed" group): quantizing an already dequantized tensor again need not be the identity (the
    fp16 scale may round differently).
    """
    # A parametrized module gets a class of its own that deepcopy shares rather than copies, so
    # removing the parametrization from the copy would break the original: copy it plain.
    enabled, enabled_bits = fake_quant_format(model), fake_quant_group_bits(model)
    disable_fake_quant(model)
    try:
        out = copy.deepcopy(model)
    finally:
        if enabled is not None:
            enable_fake_quant(model, enabled, enabled_bits)
    done: set[int] = set()
    for name, module in quantized_modules(out):
        if id(module.weight) not in done:
            done.add(id(module.weight))
            fn = fake_quant_fn(tensor_format(fmt, tensor_group(name), group_bits))
            module.weight.copy_(fn(module.weight.detach()).to(module.weight.dtype))
    return out
