"""Run an ONNX artifact folder in plain onnxruntime: logits and greedy generation with its KV cache.

The decoder the model builder writes takes input_ids, attention_mask (+ position_ids in some
variants) and past_key_values.N.key/value [batch, kv_heads, past_len, head_dim], and returns logits
[batch, seq, vocab] with present.N.key/value [batch, kv_heads, past_len + seq, head_dim]. Names,
dtypes and fixed dims are read from the session; the head dim, symbolic there, from genai_config.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgedistill.runtime import Generation

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
           "tensor(int32)": np.int32}
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")


class OrtRunner:
    def __init__(self, path: Path, *, n_ctx: int = 2048, n_threads: int | None = None, fmt: str | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        decoder_cfg, context = _genai_config(self.path)
        # past the trained context the rotary tables (cos_cache/sin_cache) run out
        self.n_ctx = min(n_ctx, context) if context else n_ctx
        self.fmt = fmt or _folder_format(self.path)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # the builder's graphs trigger harmless warnings on load
        if n_threads:
            opts.intra_op_num_threads = n_threads
        self._sess = ort.InferenceSession(str(self.path / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self._sess.get_inputs()}
        self._ids_dtype = _DTYPES[inputs["input_ids"].type]
        self._mask_dtype = _DTYPES[inputs["attention_mask"].type] if "attention_mask" in inputs else None
        self._pos_dtype = _DTYPES[inputs["position_ids"].type] if "position_ids" in inputs else None
        self._past = sorted((n for n in inputs if _PAST.match(n)), key=_past_order)
        head_dim = decoder_cfg.get("head_size")
        self._empty_past = {}
        for name in self._past:
            shape = [d if isinstance(d, int) else 0 for d in inputs[name].shape]
            shape[0], shape[2] = 1, 0  # batch 1, nothing cached yet
            if not isinstance(inputs[name].shape[3], int):
                shape[3] = head_dim
            self._empty_past[name] = np.zeros(shape, _DTYPES[inputs[name].type])
        # present.N.key answers past_key_values.N.key
        self._present = {n: n.replace("past_key_values", "present") for n in self._past}

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position of `ids`, [len(ids), vocab] float32, from an empty cache."""
        self._check_len(len(ids))
        binding = self._bind(list(ids), 0, None)
        self._sess.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()[0].astype(np.float32, copy=False)

    def generate(self, ids: Sequence[int], max_new_tokens: int, *, stop_ids: Sequence[int] = ()) -> Generation:
        """Greedy continuation: one prefill pass, then one token per step against the KV cache.

        Stops after a token in `stop_ids` (included in the result) or at the context end.
        """
        self._check_len(len(ids))
        max_new_tokens = min(max_new_tokens, self.n_ctx - len(ids))
        if max_new_tokens <= 0:
            return Generation([], 0.0, 0.0)
        stop = set(stop_ids)
        t0 = time.perf_counter()
        token, cache = self._step(list(ids), 0, None)
        tokens = [token]
        t1 = time.perf_counter()
        while len(tokens) < max_new_tokens and tokens[-1] not in stop:
            token, cache = self._step([tokens[-1]], len(ids) + len(tokens) - 1, cache)
            tokens.append(token)
        return Generation(tokens, t1 - t0, time.perf_counter() - t1)

    def step_logits(self, ids: Sequence[int]) -> np.ndarray:
        """Like `logits`, but fed one token at a time through the KV cache (the decode path)."""
        self._check_len(len(ids))
        rows, cache = [], None
        for pos, tok in enumerate(ids):
            binding = self._bind([tok], pos, cache)
            self._sess.run_with_iobinding(binding)
            out = binding.get_outputs()
            rows.append(out[0].numpy()[0, -1].astype(np.float32))
            cache = dict(zip(self._past, out[1:]))
        return np.stack(rows)

    def close(self) -> None:
        self._sess = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _step(self, ids: list[int], past_len: int, cache: dict | None) -> tuple[int, dict]:
        binding = self._bind(ids, past_len, cache)
        self._sess.run_with_iobinding(binding)
        out = binding.get_outputs()
        # the KV stays in onnxruntime's buffers (OrtValues) from one step to the next: no copies
        return int(np.argmax(out[0].numpy()[0, -1])), dict(zip(self._past, out[1:]))

    def _bind(self, ids: list[int], past_len: int, cache: dict | None):
        binding = self._sess.io_binding()
        total = past_len + len(ids)
        binding.bind_cpu_input("input_ids", np.array([ids], self._ids_dtype))
        if self._mask_dtype is not None:
            binding.bind_cpu_input("attention_mask", np.ones((1, total), self._mask_dtype))
        if self._pos_dtype is not None:
            binding.bind_cpu_input("position_ids", np.arange(past_len, total, dtype=self._pos_dtype)[None])
        for name in self._past:
            if cache is None:
                binding.bind_cpu_input(name, self._empty_past[name])
            else:
                binding.bind_ortvalue_input(name, cache[name])
        binding.bind_output("logits", "cpu")
        for name in self._past:
            binding.bind_output(self._present[name], "cpu")
        return binding

    def _check_len(self, n: int) -> None:
        if not 0 < n <= self.n_ctx:
            raise ValueError(f"{n} prompt tokens do not fit a context of {self.n_ctx}")


def _past_order(name: str) -> tuple[int, str]:
    layer, kind = _PAST.match(name).groups()
    return int(layer), kind


def _genai_config(folder: Path) -> tuple[dict, int | None]:
    """(the decoder section, the context length) of genai_config.json, if there is one."""
    path = folder / "genai_config.json"
    if not path.is_file():
        return {}, None
    model = json.loads(path.read_text())["model"]
    return model.get("decoder", {}), model.get("context_length")


def _folder_format(folder: Path) -> str:
    """The format edgedistill_onnx.json records, else the bit width of the MatMulNBits nodes."""
    from edgedistill.export.onnx import read_info

    info = read_info(folder)
    if "format" in info:
        return info["format"]
    import onnx

    model = onnx.load(folder / "model.onnx", load_external_data=False)
    bits = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    return f"onnx-int{bits.pop()}" if len(bits) == 1 else "onnx"
