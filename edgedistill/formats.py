"""Artifact formats: one name per format, used by plan, QAT, export, verify and the report."""

from dataclasses import dataclass


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

