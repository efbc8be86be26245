"""Run a GGUF artifact in llama.cpp (through llama-cpp-python): logits and greedy generation."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgedistill.runtime import Generation

_FMT_BY_FILE_TYPE = {2: "gguf-q4_0", 7: "gguf-q8_0"}  # general.file_type (gguf.LlamaFileType)


class LlamaCppRunner:
    def __init__(self, path: Path, *, n_ctx: int = 2048, n_threads: int | None = None):
        import llama_cpp

        # logits_all: llama.cpp keeps the logits of every position, which `logits` returns.
        # n_threads_batch too: left out, prompt processing takes every core whatever n_threads says.
        with _quiet_stderr():
            self._llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, logits_all=True,
                verbose=False,
            )
        self.path = Path(path)
        self.n_ctx = n_ctx
        file_type = int(self._llm.metadata.get("general.file_type", -1))
        self.fmt = _FMT_BY_FILE_TYPE.get(file_type, f"gguf-type{file_type}")

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position of `ids`, [len(ids), vocab] float32, from an empty context."""
        self._check_len(len(ids))
        self._llm.reset()
        self._llm.eval(list(ids))
        return np.array(self._llm.scores[: len(ids)], dtype=np.float32)

    def generate(self, ids: Sequence[int], max_new_tokens: int, *, stop_ids: Sequence[int] = ()) -> Generation:
        """Greedy (argmax) continuation of `ids`; stops after a token in `stop_ids` or at the context end."""
        self._check_len(len(ids))
        max_new_tokens = min(max_new_tokens, self.n_ctx - len(ids))
        if max_new_tokens <= 0:
            return Generation([], 0.0, 0.0)
        stop = set(stop_ids)
        llm = self._llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(list(ids))
        tokens = [int(np.argmax(llm.scores[llm.n_tokens - 1]))]
        t1 = time.perf_counter()
        while len(tokens) < max_new_tokens and tokens[-1] not in stop:
            llm.eval([tokens[-1]])
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        return Generation(tokens, t1 - t0, time.perf_counter() - t1)

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_len(self, n: int) -> None:
        if not 0 < n <= self.n_ctx:
            raise ValueError(f"{n} prompt tokens do not fit a context of {self.n_ctx}")


@contextlib.contextmanager
def _quiet_stderr():
    """Send fd 2 to /dev/null: llama.cpp warns from C (e.g. a context longer than the trained one)
    even with verbose=False. Load failures still raise in Python."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
