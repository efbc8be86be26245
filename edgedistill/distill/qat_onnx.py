"""Format-exact fake-quant for the ONNX INT4/INT8 artifacts, with a straight-through estimator.

The ONNX exporter (onnxruntime-genai's model builder, then edgedistill.export.onnx) quantizes every
matrix with ONNX Runtime's MLAS blockwise quantizer (`quantize_matmul_4bits` / `_8bits`, symmetric,
"default" algorithm). For a weight [out, in] that rule is, per block of `block_size` consecutive
weights along `in` (MatMulNBits' K axis; GatherBlockQuantized's quantize_axis=1 on [vocab, hidden]):

- `m` = the block's max if |max| > |min|, else its min (a tie picks the negative end);
- `scale = m / -2**(bits-1)` in float32 (so the scale is signed), stored as float32;
- `code = clamp(roundf(x * (1/scale) + zp), 0, 2**bits - 1)` with `zp = 2**(bits-1)` (8 or 128),
  roundf rounding halves away from zero, and the reciprocal taken first (x * (1/s) != x / s);
  an all-zero block has scale 0 and every code at zp;
- value = `(code - zp) * scale`: the element of largest magnitude lands exactly on -2**(bits-1),
  and the other end of the range can clip at 2**(bits-1) - 1.

The zero point is implicit (not stored) because the export is symmetric. A tied embedding/lm_head
is one quantized matrix read by both MatMulNBits and GatherBlockQuantized, so quantize it once.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _round_half_away(x: Tensor) -> Tensor:
    # C roundf. Splitting off the fractional part is exact in float32; floor(x + 0.5) is not
    # (0.49999997 + 0.5 rounds to 1.0).
    t = torch.trunc(x)
    return t + torch.where((x - t).abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


def dequant_blockwise(w: Tensor, bits: int, block_size: int = 32) -> Tensor:
    """The values the ONNX artifact holds for a [out, in] weight (float32, no gradient)."""
    if w.dim() != 2:
        raise ValueError(f"ONNX fake-quant needs a 2-D weight [out, in], got {tuple(w.shape)}")
    rows, cols = w.shape
    x = w.detach().float()
    pad = -cols % block_size
    if pad:
        # The exporter zero-pads K; zeros never win the max-magnitude pick, so values are unchanged.
        x = torch.nn.functional.pad(x, (0, pad))
    x = x.reshape(rows, -1, block_size)
    hi, lo = x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True)
    m = torch.where(hi.abs() > lo.abs(), hi, lo)
    mid = float(1 << (bits - 1))
    scale = m / -mid
    recip = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
    code = _round_half_away(x * recip + mid).clamp(0, 2 * mid - 1)
    return ((code - mid) * scale).reshape(rows, -1)[:, :cols]


def _straight_through(w: Tensor, q: Tensor) -> Tensor:
    # q plus an exact zero: the forward value is bit-exact and d(out)/d(w) is the identity.
    return q.to(w.dtype) + (w - w.detach())


def fake_quant_int4(w: Tensor, block_size: int = 32) -> Tensor:
    """ONNX INT4 (MatMulNBits bits=4) fake-quant: forward = exported values, backward = identity."""
    return _straight_through(w, dequant_blockwise(w, 4, block_size))


def fake_quant_int8(w: Tensor, block_size: int = 32) -> Tensor:
    """ONNX INT8 (MatMulNBits bits=8) fake-quant: forward = exported values, backward = identity."""
    return _straight_through(w, dequant_blockwise(w, 8, block_size))


def which_onnx_weights_are_quantized(config) -> list[str]:
    """HF parameter names the ONNX export stores quantized (the rest, the norms, stay float32).

    Every linear in every decoder layer, the token embedding and the lm_head. With tied embeddings
    the lm_head *is* model.embed_tokens.weight (one quantized matrix), so it is listed once.
    """
    names = []
    for i in range(config.num_hidden_layers):
        names += [f"model.layers.{i}.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"model.layers.{i}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    names.append("model.embed_tokens.weight")
    if not getattr(config, "tie_word_embeddings", False):
        names.append("lm_head.weight")
    return names


FAKE_QUANT = {"onnx-int4": fake_quant_int4, "onnx-int8": fake_quant_int8}
