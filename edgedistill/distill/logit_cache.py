"""Teacher logit cache: one pass of the teacher over the packed training rows, kept on disk.

Per position the cache holds what the top-k loss (losses.kd_loss_top_k) reads: the teacher's k most
likely token ids (int32), their log-probabilities and the log of the remaining (tail) mass, both
float32, at the run's training temperature. A later run with the same teacher and the same rows
(another target, another build, a resumed or longer run) reads them instead of running the teacher.

Format. Rows are cut into shards of SHARD_ROWS consecutive rows, each one safetensors file with
tensors "top_ids" [rows, L, k] int32, "top_log_probs" [rows, L, k] float32, "tail_log_mass"
[rows, L] float32 and in its metadata the key, the position count and the summed mass kept.

Key. A shard's file name is sha256 over (the settings: format version, teacher weights and config,
k, temperature, the teacher's precision, the tokenizer; and that shard's token ids). Keying each
shard by its own rows, not the run's whole data, lets a longer run (its packed stream extends a
shorter run's) reuse the shorter run's shards and compute only the new ones.

Temperature. Log-probabilities are stored at the training temperature, which is part of the key:
the tail bucket is a sum of probabilities outside the top k and cannot be re-tempered without the
logits it came from, so a run at another temperature builds its own cache. (The top-k ids do not
depend on the temperature; the stored values do.)

Values are float32, not float16: float16 would save 2k + 2 of a position's 8k + 4 bytes (the ids
stay int32), about a quarter of the cache, but round log p ~ -20 by up to 0.01 nats; float32 keeps
the cached loss equal to the online top-k loss up to the teacher's own rounding.

Writes are atomic (atomic.atomic_path: a temporary name, then a rename): a run killed mid-shard
leaves at most a hidden ".*.partial" file that is never read, so only complete shards are trusted.

DDP: each process builds the missing shards i with i % processes == its rank, in parallel; all
processes then read any row they train on, so the cache folder must be shared between them (it
is on one machine; across machines put it on a shared file system).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from edgedistill import atomic
from edgedistill.distill.losses import teacher_buckets

# 2: rows are packed with attention boundaries (position_ids restart per example), part of each shard's key
FORMAT_VERSION = 2
SHARD_ROWS = 64  # rows per shard: a few MB at k = 64, L = 256
VALUE_DTYPE = torch.float32
SUFFIX = ".safetensors"


# ---------------------------------------------------------------- identity

def _update_with_tensor(h, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """sha256 of the teacher's weights (names, dtypes, shapes, bytes) and architecture: what its
    outputs depend on. Config keys that change no value (paths, versions, attention kernel) are left out."""
    h = hashlib.sha256()
    skip = {"_name_or_path", "transformers_version", "_attn_implementation", "_attn_implementation_internal",
            "_commit_hash"}
    config = {k: v for k, v in teacher.config.to_dict().items() if k not in skip}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in teacher.state_dict().items():
        h.update(name.encode())
        _update_with_tensor(h, t)
    return h.hexdigest()


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def shard_key(settings_key: str, input_ids: Tensor, position_ids: Tensor) -> str:
    """The shard's name: its settings, its own token ids and their positions (where examples start)."""
    h = hashlib.sha256(settings_key.encode())
    _update_with_tensor(h, input_ids.to(torch.int64))
    _update_with_tensor(h, position_ids.to(torch.int64))
    return h.hexdigest()


def shard_ranges(rows: int, shard_rows: int) -> list[tuple[int, int]]:
    return [(a, min(a + shard_rows, rows)) for a in range(0, rows, shard_rows)]


# ---------------------------------------------------------------- computing one shard

def top_k_buckets(logits: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """[rows, V] teacher logits -> top-k ids [rows, k] int32, their log-probabilities [rows, k] and the
    tail log-mass [rows], at `temperature`: losses.teacher_buckets, what kd_loss(top_k=k) computes
    online, so the cached loss matches it."""
    index, buckets = teacher_buckets(logits, k, temperature, torch.float32)
    return index.to(torch.int32), buckets[:, :-1].to(VALUE_DTYPE), buckets[:, -1].to(VALUE_DTYPE)


def run_teacher(teacher, input_ids: Tensor, position_ids: Tensor, *, k: int, temperature: float, batch_size: int,
                autocast) -> dict[str, Tensor]:
    """The cached tensors of `input_ids` [rows, L] at `position_ids` (the trainer's packed rows): the
    teacher over them, batch_size rows at a time."""
    rows, length = input_ids.shape
    device = next(teacher.parameters()).device
    parts = []
    for i in range(0, rows, batch_size):
        with torch.inference_mode(), autocast():
            logits = teacher(input_ids=input_ids[i:i + batch_size].to(device),
                             position_ids=position_ids[i:i + batch_size].to(device), use_cache=False).logits
        parts.append(top_k_buckets(logits.reshape(-1, logits.shape[-1]), k, temperature))
    ids, top, tail = (torch.cat(p).cpu() for p in zip(*parts))
    kk = ids.shape[-1]
    return {"top_ids": ids.reshape(rows, length, kk), "top_log_probs": top.reshape(rows, length, kk),
            "tail_log_mass": tail.reshape(rows, length)}


def mass_kept_sum(top_log_probs: Tensor) -> float:
    """Sum over positions of the teacher's probability inside its top k: exp(logsumexp(top-k log-probs))."""
    return float(torch.logsumexp(top_log_probs.double(), dim=-1).exp().sum())


def write_shard(path: Path, tensors: dict[str, Tensor], key: str) -> None:
    """Written under a temporary name and renamed: a half-written shard is never at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    positions = tensors["tail_log_mass"].numel()
    metadata = {"key": key, "format": str(FORMAT_VERSION), "positions": str(positions),
                "mass_kept_sum": repr(mass_kept_sum(tensors["top_log_probs"]))}
    with atomic.atomic_path(path) as tmp:
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp), metadata=metadata)


def read_metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


# ---------------------------------------------------------------- the cache of one run

@dataclass
class LogitCache:
    """The shards of one run's rows, read a shard at a time (batches come in row order)."""

    paths: list[Path]
    keys: list[str]
    shard_rows: int
    length: int
    _loaded: tuple[int, dict] | None = None

    def _shard(self, i: int) -> dict[str, Tensor]:
        if self._loaded is None or self._loaded[0] != i:
            tensors = load_file(str(self.paths[i]))
            meta = read_metadata(self.paths[i])
            if meta.get("key") != self.keys[i] or tensors["tail_log_mass"].shape[1] != self.length:
                raise ValueError(f"logit cache shard {self.paths[i]} does not hold what its name says; delete it")
            self._loaded = (i, tensors)
        return self._loaded[1]

    def rows(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k ids (int64), log-probabilities and tail log-mass of the given global row indices."""
        picked = []
        for r in index.tolist():
            shard = self._shard(r // self.shard_rows)
            j = r % self.shard_rows
            picked.append((shard["top_ids"][j], shard["top_log_probs"][j], shard["tail_log_mass"][j]))
        ids, top, tail = (torch.stack(p) for p in zip(*picked))
        return ids.long(), top, tail


def cache_stats(paths: list[Path], positions: int) -> dict:
    """Bytes on disk per cached token and the mean teacher mass the top k keep, over the run's shards."""
    size = sum(p.stat().st_size for p in paths)
    metas = [read_metadata(p) for p in paths]
    counted = sum(int(m["positions"]) for m in metas)
    mass = sum(float(m["mass_kept_sum"]) for m in metas)
    return {"bytes_per_token": round(size / max(positions, 1), 2),
            "mass_kept": round(mass / counted, 6) if counted else None}


def prepare(teacher, input_ids: Tensor, position_ids: Tensor, root: Path, *, k: int, temperature: float, precision: str,
            batch_size: int, autocast, rank: int = 0, processes: int = 1, wait=lambda: None,
            extra: dict | None = None, shard_rows: int | None = None) -> tuple[LogitCache, dict]:
    """The cache of `input_ids` [rows, L] at `position_ids` under `root`: missing shards are built (process `rank` of
    `processes` builds every processes-th one; `wait` is the barrier between them), present ones
    are reused. Returns the reader and the figures for the run's summary."""
    settings = {"format": FORMAT_VERSION, "teacher": teacher_fingerprint(teacher), "k": k,
                "temperature": temperature, "precision": precision, "value_dtype": str(VALUE_DTYPE),
                **(extra or {})}
    skey = settings_digest(settings)
    shard_rows = shard_rows or SHARD_ROWS
    folder = Path(root) / skey[:16]
    ranges = shard_ranges(input_ids.shape[0], shard_rows)
    keys = [shard_key(skey, input_ids[a:b], position_ids[a:b]) for a, b in ranges]
    paths = [folder / f"{key}{SUFFIX}" for key in keys]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    wait()  # every process has looked before any writes, so all count the same shards as built
    t0 = time.perf_counter()
    for i in missing:
        if i % processes != rank:
            continue
        a, b = ranges[i]
        tensors = run_teacher(teacher, input_ids[a:b], position_ids[a:b], k=k, temperature=temperature, batch_size=batch_size,
                              autocast=autocast)
        write_shard(paths[i], tensors, keys[i])
    wait()
    seconds = time.perf_counter() - t0
    cache = LogitCache(paths, keys, shard_rows, input_ids.shape[1])
    top_k = min(k, teacher.config.vocab_size)
    stats = {"top_k": top_k, "value_dtype": str(VALUE_DTYPE).removeprefix("torch."), "key": skey[:16],
             "shards": len(paths), "shards_built": len(missing), "shards_reused": len(paths) - len(missing),
             "build_seconds": round(seconds, 3) if missing else 0.0,
             **cache_stats(paths, input_ids.numel())}
    return cache, stats


def payload_bytes_per_token(k: int) -> int:
    """int32 ids + float32 log-probabilities for k tokens + one float32 tail: without file headers."""
    return k * 4 + k * VALUE_DTYPE.itemsize + VALUE_DTYPE.itemsize

