"""ONNX Runtime's blockwise weight quantization (MatMulNBits / GatherBlockQuantized), bit-exact.

`quantize_int4` / `quantize_int8` reproduce ONNX Runtime's MLAS quantizer (`quantize_matmul_4bits`
/ `_8bits`, the builder's "default" algorithm) on a weight [out, in]. Each row is cut into blocks
of `block` consecutive weights along `in` (MatMulNBits' K axis; GatherBlockQuantized's
quantize_axis=1), the last one zero-padded. With B = 2**bits - 1 and mid = 2**(bits-1):

- symmetric: `m` = the block's max if |max| > |min|, else its min (a tie picks the negative end);
  `scale = m / -mid` in float32 (a signed scale) and the zero point is the implicit `mid` (8 / 128,
  not stored in the file);
- asymmetric: lo = min(block min, 0), hi = max(block max, 0); `scale = (hi - lo) / B` in float32
  and `zp = clamp(roundf(0 - lo / scale), 0, B)` (0 where scale is 0), stored in the file;
- both: `code = clamp(roundf(x * (1/scale) + zp), 0, B)`, roundf rounding halves away from zero
  and the reciprocal taken first (x * (1/s) != x / s); an all-zero block has scale 0 and every code
  at zp; value = `(code - zp) * scale`.

The padding columns hold the code of 0.0, i.e. zp, so they dequantize to exactly 0 (MLAS leaves
that part of the caller's buffer as it was).

A learned (LSQ) scale replaces the rule's scale and the codes follow with the same formula. In the
asymmetric scheme the zero point stays the rule's, set by the block's own range: only the step is
learned, so a learned-scale file carries no zero points.

Block sizes: any power of two >= 16 (MatMulNBits' and GatherBlockQuantized's constraint), or
`PER_CHANNEL`: one block per row, its size the smallest power of two >= max(in, 16), which is the
block_size attribute such a node needs; the padding never changes a block's range or pick. (MLAS's
own quantizer stops at 256; the MatMulNBits kernel runs larger blocks, checked in the tests.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from edgedistill.distill.quantized import PER_CHANNEL, QuantizedWeight, Scheme, round_half_away
from edgedistill.errors import UserError


def block_for(block_size: int, cols: int) -> int:
    """The block a scheme's block_size means for a matrix with `cols` inputs."""
    if block_size == PER_CHANNEL:
        return max(16, 1 << max(cols - 1, 0).bit_length())
    if block_size < 16 or block_size & (block_size - 1):
        raise UserError(f"ONNX block_size must be a power of two >= 16 (or 0: per channel), got {block_size}")
    return block_size


def _blocks(w: Tensor, block: int) -> Tensor:
    """w [rows, cols] as float32 [rows, blocks, block], K zero-padded like the runtime's B."""
    if w.dim() != 2:
        raise ValueError(f"ONNX quantization needs a 2-D weight [out, in], got {tuple(w.shape)}")
    x = w.detach().float()
    pad = -x.shape[1] % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(x.shape[0], -1, block)


def _symmetric_rule(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    hi, lo = x.amax(dim=-1), x.amin(dim=-1)
    m = torch.where(hi.abs() > lo.abs(), hi, lo)
    mid = 1 << (bits - 1)
    return m / float(-mid), torch.full_like(m, float(mid))


def _asymmetric_rule(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    top = float((1 << bits) - 1)
    lo, hi = x.amin(dim=-1).clamp(max=0.0), x.amax(dim=-1).clamp(min=0.0)
    scale = (hi - lo) / top
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.where(scale == 0, torch.zeros_like(scale), 0.0 - lo / safe)
    return scale, round_half_away(zp).clamp(0.0, top)


def _codes(x: Tensor, scale: Tensor, zp: Tensor, bits: int) -> Tensor:
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    recip = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / safe).unsqueeze(-1)
    return round_half_away(x * recip + zp.unsqueeze(-1)).clamp(0.0, float((1 << bits) - 1))


def _quantize(w: Tensor, scheme: Scheme, scale: Tensor | None, bits: int) -> QuantizedWeight:
    cols = w.shape[-1]
    x = _blocks(w, block_for(scheme.block_size, cols))
    rule_scale, zp = (_symmetric_rule if scheme.symmetric else _asymmetric_rule)(x, bits)
    if scale is not None:
        scale = scale.detach().to(torch.float32, copy=True).reshape(-1)
        if scale.numel() != rule_scale.numel():
            raise ValueError(f"learned scale has {scale.numel()} values; {scheme} on {tuple(w.shape)} "
                             f"needs {tuple(rule_scale.shape)}")
        rule_scale = scale.reshape(rule_scale.shape).to(rule_scale.device)
    codes = _codes(x, rule_scale, zp, bits)
    return QuantizedWeight(codes.to(torch.uint8), rule_scale.contiguous(), zp.to(torch.uint8), cols)


def quantize_int4(w: Tensor, scheme: Scheme, scale: Tensor | None = None) -> QuantizedWeight:
    """MatMulNBits / GatherBlockQuantized bits=4 codes of w [out, in] (see the module docstring)."""
    return _quantize(w, scheme, scale, 4)


def quantize_int8(w: Tensor, scheme: Scheme, scale: Tensor | None = None) -> QuantizedWeight:
    """MatMulNBits / GatherBlockQuantized bits=8 codes of w [out, in] (see the module docstring)."""
    return _quantize(w, scheme, scale, 8)


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
