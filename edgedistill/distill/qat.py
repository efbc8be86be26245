"""Quantization-aware training: train against what the artifact's runtime will actually compute.

Two effects are modelled, each exactly as the runtime does it:

- weights: every quantized module computes with `quantize(w, scheme).dequantize()`
  (edgedistill.distill.quantized), the very codes and scales the exporter writes, with a
  straight-through gradient to the float master weight;
- activations (`QuantSpec.act`): llama.cpp's CPU kernels quantize the input of every Q4_0/Q8_0
  matmul to Q8_0 blocks (32 values, scale amax/127 stored as fp16), and ONNX Runtime's MatMulNBits
  at accuracy_level 4 quantizes it to int8 per weight block (scale amax/127, float32). A forward
  pre-hook applies the same rounding to each quantized Linear's input, straight-through.

Activation rounding makes a network's output a discontinuous function of its input: a last-bit
difference in accumulation order flips a code, and the flip propagates. So the activation model
matches the runtime's *distribution* of rounding error, not each rounding; see verify.py.

Under bf16 autocast (the trainer's default where the hardware has bf16 math) a matmul rounds its
fake-quant weights and activations to bf16 while training; the values themselves, the artifacts
and the verify stage's float32 reference are exact.
"""

from __future__ import annotations

import copy
import types

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from edgedistill.distill.quantized import QuantSpec, Scheme, quantize, quantize_named, round_half_away
from edgedistill.formats import FORMATS


def _straight_through(x: Tensor, value: Tensor) -> Tensor:
    # value plus an exact zero: the forward is bit-exact and d(out)/d(x) is the identity.
    # (x + (value - x).detach() can be off by one ulp.)
    return value.to(x.dtype) + (x - x.detach())


class FakeQuant(nn.Module):
    """Parametrization: the module computes with its stored (dequantized) weight; the float master is trained.

    With a learned scale (the owning module's `weight_scale`, LSQ), the codes are computed with it.
    """

    def __init__(self, scheme: Scheme, spec: QuantSpec, scale: nn.Parameter | None = None):
        super().__init__()
        self.scheme, self.spec = scheme, spec
        self._scale = [scale]  # a list keeps it out of this module's parameters: its owner holds it

    def forward(self, weight: Tensor) -> Tensor:
        scale = self._scale[0]
        if scale is None:
            return _straight_through(weight, quantize(weight, self.scheme).dequantize())
        return _lsq(weight, scale, self.scheme)

    def extra_repr(self) -> str:
        return f"{self.scheme.fmt}, block={self.scheme.block_size or 'row'}, symmetric={self.scheme.symmetric}"


# ---- learned scales (LSQ: Esser et al., "Learned Step Size Quantization")

SCALE = "weight_scale"  # the learned scale's attribute on a quantized module


def _lsq(w: Tensor, scale: Tensor, scheme: Scheme) -> Tensor:
    """Forward: exactly the codes the exporter writes with this scale. Backward: LSQ's gradients.

    d/dw is 1 where the code is not clamped and 0 where it is; d/dscale is (code - zp) - w/scale
    unclamped and (code - zp) clamped, scaled by 1/sqrt(block * qmax) as LSQ prescribes.
    """
    q = quantize(w, scheme, scale.detach())
    rows, blocks, block = q.codes.shape
    c = q.codes.float() - q.zero_point.float().unsqueeze(-1)  # integer steps, constant
    wb = nn.functional.pad(w.float(), (0, blocks * block - w.shape[1])).reshape(rows, blocks, block)
    qmax = float((1 << (FORMATS[scheme.fmt].bits - 1)) - 1)
    g = 1.0 / (block * qmax) ** 0.5
    s = (scale * g + (scale - scale * g).detach()).unsqueeze(-1)  # value scale, gradient scale * g
    # an all-zero block has scale 0: its codes sit at the zero point, and nothing is inside
    sd = s.detach()
    ratio = torch.where(sd == 0, torch.zeros_like(wb), wb / torch.where(sd == 0, torch.ones_like(sd), sd)).detach()
    inside = (ratio - c).abs() <= 0.5 + 1e-3
    surrogate = s * c + torch.where(inside, wb - s * ratio, torch.zeros_like(wb))
    value = q.dequantize()
    surrogate = surrogate.reshape(rows, -1)[:, : w.shape[1]]
    return (value + (surrogate - surrogate.detach())).to(w.dtype)


def _owners(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """The first (name, module) holding each quantized weight: a tied weight has one owner."""
    owners: dict[int, tuple[str, nn.Module]] = {}
    for name, module in quantized_modules(model):
        owners.setdefault(id(_master(module)), (name, module))
    return owners


def quantized_weight_names(model: nn.Module) -> list[str]:
    """HF names of the quantized matrices, each once (a tied lm_head is the embedding's matrix)."""
    return [f"{name}.weight" for name, _ in _owners(model).values()]


def _master(module: nn.Module) -> Tensor:
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def init_learned_scales(model: nn.Module, spec: QuantSpec) -> list[nn.Parameter]:
    """Give each quantized weight a trainable scale initialised by its format's rule (in place).

    Called before the optimizer is built, so the scales are in it and in every checkpoint; called
    again when fake-quant switches on, to start from the weights as they are then.
    """
    params = []
    for name, module in _owners(model).values():
        w = _master(module).detach()
        rule = quantize(w, spec.scheme(name)).scale
        existing = getattr(module, SCALE, None)
        if existing is None:
            module.register_parameter(SCALE, nn.Parameter(rule.clone()))
        else:
            with torch.no_grad():
                existing.copy_(rule)
        module._edgedistill_scale_scheme = spec.scheme(name)  # what the scale is learned for
        params.append(getattr(module, SCALE))
    return params


def learned_scales(model: nn.Module, *, remove: bool = False) -> dict[str, tuple[Scheme, Tensor]]:
    """{HF weight name: (the scheme it was learned for, scale)} of the modules' learned scales, as
    saved beside a student (quantized.save_learned_scales); remove=True takes them off the modules."""
    out = {}
    for name, module in _owners(model).values():
        scale = module._parameters.pop(SCALE, None) if remove else getattr(module, SCALE, None)
        if scale is not None:
            out[f"{name}.weight"] = (module._edgedistill_scale_scheme, scale.detach().clone())
    return out


# ---- activations


def act_quant(x: Tensor, runtime: str, block: int) -> Tensor:
    """x with its last dim rounded as the runtime's int8 activation quantization does, blocks of `block`.

    llama.cpp (Q8_0): d = amax/127, codes roundf(x / d), values code * fp16(d).
    ONNX Runtime (MatMulNBits CompInt8): the same with a float32 scale and round-half-even, as
    measured against the kernel (an identity weight returns the quantized input).
    """
    cols = x.shape[-1]
    xf = x.detach().float().reshape(-1, cols)
    pad = -cols % block
    if pad:
        xf = nn.functional.pad(xf, (0, pad))
    blocks = xf.reshape(xf.shape[0], -1, block)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    if runtime == "llamacpp":
        q = round_half_away(blocks * inv) * d.half().float()
    else:
        q = torch.round(blocks * inv) * d
    return q.reshape(xf.shape[0], -1)[:, :cols].reshape(x.shape)


def _act_block(scheme: Scheme, cols: int) -> int:
    if FORMATS[scheme.fmt].runtime == "llamacpp":
        return 32  # Q8_0 blocks
    from edgedistill.distill.qat_onnx import block_for

    # MatMulNBits quantizes activations per weight block, but in blocks of at most 256 (measured
    # with an identity weight: a per-channel block of 512-2048 matches only a 256 act block)
    return min(block_for(scheme.block_size, cols), 256)


def _act_hook(runtime: str, block: int):
    def hook(module, args):
        (x, *rest) = args
        return (_straight_through(x, act_quant(x, runtime, block)), *rest)

    return hook


# ---- switching it on and off


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) for the modules whose weights the exporters quantize.

    In a Llama-family causal LM every nn.Linear sits in a decoder layer or is the lm_head, and the
    only nn.Embedding is the token embedding, whose [vocab, hidden] rows are quantized along hidden
    like any [out, in] matrix. Norms stay float in every format.
    """
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]


def enable_fake_quant(model: nn.Module, spec: QuantSpec | str, group_bits: dict | None = None) -> None:
    """Make every quantized module compute as the artifact of `spec` will, in place.

    `spec` may be a format name (then group_bits applies, nothing else). register_parametrization
    moves the existing Parameter object to `parametrizations.weight.original`, so an optimizer
    built before this call keeps training it, and a tied embedding / lm_head (one Parameter in two
    modules, both in the "embed" group) stays a single tensor. On an FSDP-sharded model the modules'
    forwards apply the same fake-quant instead (_enable_in_forward).
    """
    spec = spec if isinstance(spec, QuantSpec) else QuantSpec(spec, group_bits)
    disable_fake_quant(model)
    if _fsdp_sharded(model):
        _enable_in_forward(model, spec)
        return
    owners = _owners(model)
    for name, module in quantized_modules(model):
        scheme = spec.scheme(name)
        owner = owners[id(module.weight)][1]
        scale = getattr(owner, SCALE, None) if spec.learn_scales else None
        if spec.learn_scales and scale is None:
            raise ValueError("learn_scales: call init_learned_scales before enable_fake_quant")
        parametrize.register_parametrization(module, "weight", FakeQuant(scheme, spec, scale))
        if spec.act and isinstance(module, nn.Linear):
            handle = module.register_forward_pre_hook(_act_hook(spec.runtime, _act_block(scheme, module.in_features)))
            module._edgedistill_act_hook = handle


# Under FSDP (torch's fully_shard) the weights are registered by module and name, sharded between
# forwards and all-gathered into the same names for each forward: a parametrization would move them
# out from under it. There the quantized modules compute with the fake-quant weight in their forward
# instead, from the unsharded weight FSDP has gathered for it; the straight-through gradient reaches
# that weight and FSDP reduce-scatters it as usual, and the registered parameters are never touched
# (checkpoints hold the float masters either way). The values are those of the parametrization:
# the same FakeQuant of the same weight, and F.linear / F.embedding as the modules' own forwards.
_IN_FORWARD = "_edgedistill_fake_quant_forward"


def _fsdp_sharded(model: nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _linear_forward(module: nn.Linear, input: Tensor) -> Tensor:
    return nn.functional.linear(input, module.__dict__[_IN_FORWARD](module.weight), module.bias)


def _embedding_forward(module: nn.Embedding, input: Tensor) -> Tensor:
    return nn.functional.embedding(input, module.__dict__[_IN_FORWARD](module.weight), module.padding_idx,
                                   module.max_norm, module.norm_type, module.scale_grad_by_freq, module.sparse)


def _enable_in_forward(model: nn.Module, spec: QuantSpec) -> None:
    if spec.learn_scales:
        # the learned scales are parameters of their own, sharded beside the weights, that
        # init_learned_scales re-initialises from the (sharded) master weights: not done here
        raise ValueError("learn_scales does not run on an FSDP-sharded model")
    for name, module in quantized_modules(model):
        scheme = spec.scheme(name)
        module.__dict__[_IN_FORWARD] = FakeQuant(scheme, spec)  # not a submodule: state and children stay as they are
        # bound methods: a deep copy of the module gets a forward bound to the copy
        module.forward = types.MethodType(_linear_forward if isinstance(module, nn.Linear) else _embedding_forward,
                                          module)
        if spec.act and isinstance(module, nn.Linear):
            handle = module.register_forward_pre_hook(_act_hook(spec.runtime, _act_block(scheme, module.in_features)))
            module._edgedistill_act_hook = handle


def disable_fake_quant(model: nn.Module) -> None:
    """Undo enable_fake_quant: the modules hold their float master weights again, same objects."""
    for _, module in quantized_modules(model):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        if module.__dict__.pop(_IN_FORWARD, None) is not None:
            del module.forward  # the class's own forward again
        handle = module.__dict__.pop("_edgedistill_act_hook", None)
        if handle is not None:
            handle.remove()


def fake_quant_spec(model: nn.Module) -> QuantSpec | None:
    """The QuantSpec fake-quant is enabled with on model, or None."""
    for _, module in quantized_modules(model):
        if parametrize.is_parametrized(module, "weight"):
            return module.parametrizations.weight[0].spec
        if _IN_FORWARD in module.__dict__:
            return module.__dict__[_IN_FORWARD].spec
    return None


@torch.no_grad()
def fake_quant_model_copy(model: nn.Module, spec: QuantSpec | str, group_bits: dict | None = None, *,
                          learned: dict[str, tuple[Scheme, Tensor]] | None = None) -> nn.Module:
    """A deep copy computing what an artifact of `spec` should: plain tensors holding the stored
    weights, plus the activation hooks when spec.act. The verify stage compares against it.

    learned: scales to quantize with where their scheme matches (quantized.quantize_named); by
    default the model's own learned scales.

    A tied weight is quantized once (both of its modules are in the "embed" group): quantizing an
    already dequantized tensor again need not be the identity (the fp16 scale may round differently).
    """
    spec = spec if isinstance(spec, QuantSpec) else QuantSpec(spec, group_bits)
    # A parametrized module gets a class of its own that deepcopy shares rather than copies, so
    # removing the parametrization from the copy would break the original: copy it plain.
    enabled = fake_quant_spec(model)
    if learned is None:
        learned = learned_scales(model)
    disable_fake_quant(model)
    try:
        out = copy.deepcopy(model)
    finally:
        if enabled is not None:
            enable_fake_quant(model, enabled)
    done: set[int] = set()
    for name, module in quantized_modules(out):
        scheme = spec.scheme(name)
        if id(module.weight) not in done:
            done.add(id(module.weight))
            stored = quantize_named(f"{name}.weight", module.weight, scheme, learned)
            module.weight.copy_(stored.dequantize().to(module.weight.dtype))
        if spec.act and isinstance(module, nn.Linear):
            module.register_forward_pre_hook(_act_hook(spec.runtime, _act_block(scheme, module.in_features)))
    learned_scales(out, remove=True)  # the copy computes with plain weights
    return out
