"""Format-exact fake-quant for GGUF Q4_0 and Q8_0, with a straight-through estimator.

The forward pass returns exactly what `gguf.quants.dequantize(gguf.quants.quantize(w, T), T)` gives
for a float32 weight, because that pair is what the GGUF exporter writes and llama.cpp reads back.
Rules mirrored from gguf-py (which matches ggml-quants.c bit for bit):

- blocks of 32 consecutive weights along the input (last) dimension share one scale `d`;
- the codes are computed with the float32 scale, but the scale is *stored* as fp16, so the value a
  runtime sees is `code * fp16(d)`;
- Q4_0: `d = m / -8` where `m` is the signed element of largest magnitude (first one on ties),
  code = `min(15, trunc(x / d + 8.5))`, value = `(code - 8) * d`;
- Q8_0: `d = max|x| / 127`, code = `roundf(x / d)` (halves away from zero, unlike torch.round),
  value = `code * d`.

Both multiply by the reciprocal `1 / d` rather than dividing, as the reference does; x * (1/d) and
x / d differ in the last bit often enough to flip a code.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 32


def _blocks(w: Tensor) -> Tensor:
    if w.dim() != 2 or w.shape[-1] % BLOCK:
        raise ValueError(f"GGUF fake-quant needs a 2-D weight whose last dim is a multiple of {BLOCK}, "
                         f"got {tuple(w.shape)}")
    return w.detach().float().reshape(-1, BLOCK)


def _reciprocal(d: Tensor) -> Tensor:
    # an all-zero block has d == 0; the reference then uses 0 so every code is the zero point
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _round_half_away(x: Tensor) -> Tensor:
    # C roundf; floor(|x| + 0.5) would round 0.49999997 up because |x| + 0.5 rounds to 1.0 in fp32
    a = x.abs()
    f = a.floor()
    return x.sign() * (f + (2 * (a - f)).floor())


def _straight_through(w: Tensor, q: Tensor) -> Tensor:
    # q + (w - w.detach()) is q plus an exact zero, so the forward value is bit-exact, while the
    # gradient w.r.t. w is the identity. (w + (q - w).detach() can be off by one ulp.)
    return q.to(w.dtype) + (w - w.detach())


def dequant_q4_0(w: Tensor) -> Tensor:
    """The Q4_0 values of `w` (float32, no gradient)."""
    x = _blocks(w)
    imax = x.abs().argmax(dim=-1, keepdim=True)  # torch and numpy both return the first maximum
    d = x.gather(-1, imax) / -8
    code = torch.trunc(x * _reciprocal(d) + 8.5).clamp(0, 15)
    return ((code - 8) * d.half().float()).reshape(w.shape)


def dequant_q8_0(w: Tensor) -> Tensor:
    """The Q8_0 values of `w` (float32, no gradient)."""
    x = _blocks(w)
    d = x.abs().amax(dim=-1, keepdim=True) / 127
    code = _round_half_away(x * _reciprocal(d))
    return (code * d.half().float()).reshape(w.shape)


def fake_quant_q4_0(w: Tensor) -> Tensor:
    """Q4_0 fake-quant of a [out, in] weight: forward = exported values, backward = identity."""
    return _straight_through(w, dequant_q4_0(w))


def fake_quant_q8_0(w: Tensor) -> Tensor:
    """Q8_0 fake-quant of a [out, in] weight: forward = exported values, backward = identity."""
    return _straight_through(w, dequant_q8_0(w))


FAKE_QUANT = {"gguf-q4_0": fake_quant_q4_0, "gguf-q8_0": fake_quant_q8_0}
