"""One weight matrix as an artifact stores it: integer codes, scales and zero points, per block.

This is the one contract between training and export. `QuantSpec` is an artifact's setting (its
format, wider tensor groups, ONNX block size and symmetry, whether the runtime's activation
rounding is modelled) and gives each tensor its `Scheme`; `quantize(w, scheme)` gives the codes and
scales of a [out, in] weight in a format; fake-quant (QAT) computes with exactly their
`dequantize()`, the exporters pack exactly these codes and scales into the file (never a fresh
quantization of their own), and verify compares the file against them. A learned scale (LSQ) is
passed as `scale=`: the codes are then computed with it, by the format's own rounding rule.

The per-format rules live beside this module (qat_gguf: llama.cpp Q4_0/Q8_0; qat_onnx: ONNX
Runtime MatMulNBits/GatherBlockQuantized); they are looked up by name so this module imports alone.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from edgedistill.errors import UserError
from edgedistill.formats import FORMATS, tensor_format, tensor_group

# 0 as a block size means one block per row: a scale per output channel.
PER_CHANNEL = 0


@dataclass(frozen=True)
class Scheme:
    """How one tensor is stored. `fmt` is the tensor's own format (after any group_bits widening)."""

    fmt: str
    block_size: int = 32  # weights per scale along the input dim; GGUF formats fix it at 32
    symmetric: bool = True  # False: a stored zero point per block (ONNX only)


@dataclass(frozen=True)
class QuantSpec:
    """What an artifact stores and how its runtime computes: the one setting QAT, export and verify share."""

    fmt: str  # the artifact's format, e.g. "gguf-q4_0"
    group_bits: dict | None = field(default=None, hash=False)  # wider formats per tensor group, {"embed": 8}
    block_size: int = 32  # ONNX: weights per scale (16/32/64/128); GGUF fixes 32
    symmetric: bool = True  # ONNX: False stores a zero point per block
    int8_per_channel: bool = False  # ONNX: INT8 tensors get one scale per output row
    act: bool = False  # also model the runtime's activation quantization
    learn_scales: bool = False  # LSQ: train each block's scale too; the exporters then write the learned ones

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise UserError(f"no fake-quant for format {self.fmt!r}; known: {', '.join(FORMATS)}")
        tensor_format(self.fmt, None, self.group_bits)  # rejects unknown groups and bit widths now

    @property
    def runtime(self) -> str:
        return FORMATS[self.fmt].runtime

    def scheme(self, name: str) -> Scheme:
        """The storage scheme of the HF module or parameter `name` in this artifact."""
        return self.group_scheme(tensor_group(name))

    def group_scheme(self, group: str | None) -> Scheme:
        """The storage scheme of a tensor group (formats.TENSOR_GROUPS) in this artifact."""
        fmt = tensor_format(self.fmt, group, self.group_bits)
        if FORMATS[fmt].runtime == "llamacpp":
            return Scheme(fmt)
        block = PER_CHANNEL if self.int8_per_channel and FORMATS[fmt].bits == 8 else self.block_size
        return Scheme(fmt, block, self.symmetric)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> QuantSpec | None:
        return cls(**d) if d else None


@dataclass
class QuantizedWeight:
    """codes: uint8 [rows, blocks, block]; the input dim zero-padded to whole blocks.
    scale: float32 [rows, blocks], exactly the value the runtime multiplies by (fp16-rounded for GGUF).
    zero_point: uint8 [rows, blocks]; the format's implicit midpoint where the file stores none.
    cols: the input dim before padding."""

    codes: Tensor
    scale: Tensor
    zero_point: Tensor
    cols: int

    @property
    def block(self) -> int:
        return self.codes.shape[-1]

    def dequantize(self) -> Tensor:
        """(code - zero_point) * scale as float32 [rows, cols]: the weights the runtime computes with."""
        values = (self.codes.float() - self.zero_point.float().unsqueeze(-1)) * self.scale.unsqueeze(-1)
        return values.reshape(self.codes.shape[0], -1)[:, : self.cols]


def round_half_away(x: Tensor) -> Tensor:
    """C's roundf (halves away from zero), which both llama.cpp and MLAS quantize with; torch.round
    rounds halves to even. Split into integer and fractional parts, which is exact in float32
    (floor(x + 0.5) is not: 0.49999997 + 0.5 rounds to 1.0)."""
    t = torch.trunc(x)
    return t + torch.where((x - t).abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


QUANTIZERS: dict[str, str] = {
    "gguf-q4_0": "edgedistill.distill.qat_gguf:quantize_q4_0",
    "gguf-q8_0": "edgedistill.distill.qat_gguf:quantize_q8_0",
    "onnx-int4": "edgedistill.distill.qat_onnx:quantize_int4",
    "onnx-int8": "edgedistill.distill.qat_onnx:quantize_int8",
}


def quantize(w: Tensor, scheme: Scheme, scale: Tensor | None = None) -> QuantizedWeight:
    """The codes and scales `scheme` stores for the 2-D weight w (no gradient).

    scale: a learned float32 [rows, blocks] scale to quantize with instead of the format's rule.
    """
    if scheme.fmt not in QUANTIZERS:
        raise UserError(f"no quantizer for format {scheme.fmt!r}; known: {', '.join(QUANTIZERS)}")
    module_name, _, attr = QUANTIZERS[scheme.fmt].partition(":")
    fn = getattr(importlib.import_module(module_name), attr)
    with torch.no_grad():
        return fn(w.detach().float(), scheme, scale)


# Learned (LSQ) scales travel with the student folder, keyed by HF weight name, each with the
# scheme it was learned for: an exporter uses a scale only for a tensor it stores in that scheme.
SCALES_FILE = "quant_scales.safetensors"


def save_learned_scales(folder, scales: dict[str, tuple[Scheme, Tensor]]) -> None:
    from safetensors.torch import save_file

    from edgedistill.atomic import atomic_path

    tensors = {name: s.detach().float().contiguous().cpu() for name, (_, s) in scales.items()}
    meta = {name: f"{sch.fmt}|{sch.block_size}|{int(sch.symmetric)}" for name, (sch, _) in scales.items()}
    with atomic_path(f"{folder}/{SCALES_FILE}") as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_learned_scales(folder) -> dict[str, tuple[Scheme, Tensor]]:
    """{HF weight name: (scheme, scale)} saved beside a student; {} when it learned none."""
    from pathlib import Path

    from safetensors import safe_open

    path = Path(folder) / SCALES_FILE
    if not path.is_file():
        return {}
    out = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for name in f.keys():
            fmt, block, sym = meta[name].split("|")
            out[name] = (Scheme(fmt, int(block), bool(int(sym))), f.get_tensor(name))
    return out


def quantize_named(name: str, w: Tensor, scheme: Scheme, learned: dict[str, tuple[Scheme, Tensor]]) -> QuantizedWeight:
    """quantize(w, scheme) with the scale learned for `name`, when it was learned for this scheme."""
    entry = learned.get(name)
    scale = entry[1] if entry is not None and entry[0] == scheme else None
    return quantize(w, scheme, scale)
