"""llama.cpp's Q4_0 and Q8_0 as codes and scales, under the contract of edgedistill.distill.quantized.

Without a learned scale, `quantize_q4_0` / `quantize_q8_0` give exactly the blocks gguf-py's
reference quantizer writes for a float32 weight (gguf-py matches ggml-quants.c bit for bit):

- blocks of 32 consecutive weights along the input (last) dimension share one scale `d`;
- the codes are computed with the float32 scale, but the scale is *stored* as fp16, so the value a
  runtime sees is `(code - zero point) * fp16(d)`;
- Q4_0: `d = m / -8` where `m` is the signed element of largest magnitude (first one on ties),
  code = `min(15, trunc(x / d + 8.5))`, zero point 8;
- Q8_0: `d = max|x| / 127`, q = `roundf(x / d)` (halves away from zero, unlike torch.round). The
  file holds q as int8; the contract's uint8 code is q + 128, zero point 128.

Both multiply by the reciprocal `1 / d` rather than dividing, as the reference does; x * (1/d) and
x / d differ in the last bit often enough to flip a code. An all-zero block has d = 0 and every
code at the zero point.

A learned scale (LSQ) can only reach the file as fp16, so it is rounded to fp16 first and the codes
are computed with that stored value, by the same rounding rule, clamped to the code range (Q8_0 to
q in [-127, 127], the reference's range: -128 would break the symmetry the scale was learned for).
"""

from __future__ import annotations

import torch
from torch import Tensor

from edgedistill.distill.quantized import QuantizedWeight, Scheme, round_half_away
from edgedistill.errors import UserError

BLOCK = 32
Q4_ZERO = 8
Q8_ZERO = 128
Q8_MAX = 127


def quantize_q4_0(w: Tensor, scheme: Scheme, scale: Tensor | None = None) -> QuantizedWeight:
    """Q4_0 codes and scales of the [out, in] weight w; `scale`: a learned [out, in/32] scale."""
    x = _blocks(w, scheme)
    if scale is None:
        imax = x.abs().argmax(dim=-1, keepdim=True)  # torch and numpy both return the first maximum
        d = x.gather(-1, imax).squeeze(-1) / -8
        stored = d.half()
    else:
        stored = _learned(scale, x, scheme)
        d = stored.float()
    code = torch.trunc(x * _reciprocal(d).unsqueeze(-1) + 8.5).clamp(0, 2 * Q4_ZERO - 1)
    return _result(code, stored, Q4_ZERO, w.shape[1])


def quantize_q8_0(w: Tensor, scheme: Scheme, scale: Tensor | None = None) -> QuantizedWeight:
    """Q8_0 codes (q + 128) and scales of the [out, in] weight w; `scale`: a learned [out, in/32] scale."""
    x = _blocks(w, scheme)
    if scale is None:
        d = x.abs().amax(dim=-1) / Q8_MAX
        stored = d.half()
    else:
        stored = _learned(scale, x, scheme)
        d = stored.float()
    q = round_half_away(x * _reciprocal(d).unsqueeze(-1)).clamp(-Q8_MAX, Q8_MAX)
    return _result(q + Q8_ZERO, stored, Q8_ZERO, w.shape[1])


def _blocks(w: Tensor, scheme: Scheme) -> Tensor:
    """w as float32 [rows, blocks, 32], after checking that the file can store it in `scheme`."""
    if scheme.block_size != BLOCK:
        raise UserError(f"{scheme.fmt}: GGUF blocks hold {BLOCK} weights; block size {scheme.block_size} "
                        "cannot be stored")
    if not scheme.symmetric:
        raise UserError(f"{scheme.fmt}: GGUF stores no zero point, so an asymmetric scheme cannot be stored")
    if w.dim() != 2 or w.shape[1] % BLOCK:
        raise UserError(f"{scheme.fmt} needs a 2-D weight whose input dim is a multiple of {BLOCK}, "
                        f"got {tuple(w.shape)}")
    return w.detach().float().reshape(w.shape[0], -1, BLOCK)


def _learned(scale: Tensor, x: Tensor, scheme: Scheme) -> Tensor:
    """The fp16 value a learned scale is stored as: the codes must be computed with it, not the float."""
    if tuple(scale.shape) != tuple(x.shape[:2]):
        raise UserError(f"{scheme.fmt}: learned scale has shape {tuple(scale.shape)}, the weight needs "
                        f"{tuple(x.shape[:2])} (rows, blocks of {BLOCK})")
    stored = scale.detach().to(x.device).half()
    if not torch.isfinite(stored).all():
        raise UserError(f"{scheme.fmt}: a learned scale does not fit fp16 (|scale| > 65504 or NaN)")
    return stored


def _reciprocal(d: Tensor) -> Tensor:
    # an all-zero block has d == 0; the reference then uses 0 so every code is the zero point
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _result(code: Tensor, stored: Tensor, zero: int, cols: int) -> QuantizedWeight:
    return QuantizedWeight(
        codes=code.to(torch.uint8),
        scale=stored.float(),
        zero_point=torch.full(stored.shape, zero, dtype=torch.uint8, device=stored.device),
        cols=cols,
    )
