"""Runners: load an exported artifact in its on-device runtime, for logits and greedy generation.

Every runner (llama.cpp for GGUF, onnxruntime for ONNX) has the same interface:
`fmt`, `logits(ids)`, `generate(ids, max_new_tokens, stop_ids=...)` and `close()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Generation:
    tokens: list[int]  # generated ids, without the prompt; a stop id that ended generation is included
    prefill_s: float  # wall time from the start to the first generated token (time to first token)
    decode_s: float  # wall time for the remaining len(tokens) - 1 tokens


def load_runner(path: Path, fmt: str, n_threads: int | None = None):
    """The runner for an artifact of format `fmt` ("gguf-*" file or "onnx-*" folder)."""
    if fmt.startswith("gguf"):
        from edgedistill.runtime.llamacpp import LlamaCppRunner

        return LlamaCppRunner(Path(path), n_threads=n_threads)
    from edgedistill.runtime.ort import OrtRunner

    return OrtRunner(Path(path), n_threads=n_threads, fmt=fmt)
