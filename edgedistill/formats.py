"""Artifact formats: one name per format, used by plan, QAT, export, verify and the report."""

from dataclasses import dataclass

from edgedistill.errors import UserError


@dataclass(frozen=True)
class Format:
    name: str  # e.g. "gguf-q4_0"
    runtime: str  # "llamacpp" | "ort"
    bits: int  # weight bits of the quantized matrices
    block: int  # elements sharing one scale along the input dimension
    bytes_per_block: int  # storage of one block: codes + scale (+ zero point)

    @property
    def bytes_per_weight(self) -> float:
        return self.bytes_per_block / self.block

    @property
    def artifact_name(self) -> str:
        """File (GGUF) or folder (ONNX) name inside OUT/<target>/."""
        kind, quant = self.name.split("-", 1)
        return f"model-{quant}.gguf" if kind == "gguf" else f"onnx-{quant}"


# Storage per block: GGUF Q4_0 = fp16 scale + 16 bytes of nibbles; Q8_0 = fp16 scale + 32 int8.
# ONNX MatMulNBits (symmetric, block 32): packed codes + one fp32 scale per block.
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("gguf-q4_0", "llamacpp", 4, 32, 18),
        Format("gguf-q8_0", "llamacpp", 8, 32, 34),
        Format("onnx-int4", "ort", 4, 32, 16 + 4),
        Format("onnx-int8", "ort", 8, 32, 32 + 4),
    )
}


# Tensor groups a plan may give more bits than its artifact's format (e.g. {"embed": 8}), keyed by
# the last part of the HF module name; norms and biases are in no group and stay float.
TENSOR_GROUPS = ("embed", "attn", "mlp")
_GROUP_OF_MODULE = {
    "embed_tokens": "embed", "lm_head": "embed",
    "q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}


def tensor_group(hf_name: str) -> str | None:
    """The group of an HF parameter ("...q_proj.weight") or module ("...q_proj") name, or None."""
    parts = hf_name.split(".")
    if parts[-1] == "weight":
        parts.pop()
    return _GROUP_OF_MODULE.get(parts[-1]) if parts else None


def tensor_format(fmt: str, group: str | None, group_bits: dict | None) -> str:
    """The format a tensor of `group` is stored in, in an artifact of format `fmt`.

    A group asking for more bits than fmt gets the format of fmt's runtime with those bits; one
    asking for fewer (or none) keeps fmt: an artifact is never less precise than its name says.
    """
    if not group_bits:
        return fmt
    unknown = set(group_bits) - set(TENSOR_GROUPS)
    if unknown:
        raise UserError(f"unknown tensor group(s) {sorted(unknown)}; known: {', '.join(TENSOR_GROUPS)}")
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    base, bits = FORMATS[fmt], group_bits.get(group)
    if bits is None or bits <= base.bits:
        return fmt
    for f in FORMATS.values():
        if f.runtime == base.runtime and f.bits == bits:
            return f.name
    raise UserError(f"no {base.runtime} format has {bits}-bit weights (tensor group {group!r} of {fmt})")
