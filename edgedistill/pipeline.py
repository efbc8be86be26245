"""Stage runner: cache keys, skip-if-unchanged, resume, per-target fan-out, and publishing OUT/<target>/.

A stage is a plain function `run(ctx) -> dict` (its summary). It writes files into `ctx.dir` only.
Its cache key hashes the config fields it reads and the outputs of the stages it comes after, so a
second target whose plan is the same reuses the student, and a re-run reuses everything unchanged.
Each stage's folder is written as `<name>-<key>.partial` and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console

from edgedistill import __version__, atomic, processes
from edgedistill.config import BuildConfig
from edgedistill.targets import TargetProfile

STAGE_FILE = "stage.json"


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[["StageContext"], dict]
    # upstream stage -> the field of its summary this stage depends on (None: all of its outputs)
    after: dict[str, Optional[str]]
    reads: tuple[str, ...] = ()  # dotted config fields; "target.x.y" reads the target profile
    extra: Optional[Callable[[BuildConfig], str]] = None  # identity of inputs outside the config
    version: int = 1  # bump when a stage's code changes what it writes
    # under a multi-process launch: run on every process (DDP training), not the main one alone
    every_process: bool = False


@dataclass
class Record:
    """A finished stage: where its files are and what it said."""

    name: str
    key: str
    dir: Path
    summary: dict
    outputs_hash: str
    outputs: dict = field(default_factory=dict)  # file (relative to dir) -> sha256
    cached: bool = False
    seconds: float = 0.0

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)


@dataclass
class Session:
    """State shared by all stages and targets of one build: the loaded teacher, the console."""

    cfg: BuildConfig
    console: Console
    resume: bool = False
    progress: bool = True
    _teacher: Optional[tuple] = None
    _teacher_targets: dict = field(default_factory=dict)
    _stage_cache: dict = field(default_factory=dict)

    def teacher(self, record: Record):
        """The teacher model and tokenizer, loaded once per build from the teacher stage's snapshot."""
        if self._teacher is None:
            from edgedistill.teacher import load_snapshot

            self._teacher = load_snapshot(record.path("teacher"))
        return self._teacher

    def teacher_targets(self, record: Record, examples: list[dict]) -> list[dict]:
        """measure.quality.teacher_targets on these examples, computed once per build: the distill
        stage scores the students and the profile stage every target's artifacts on the same held-out
        examples, and the teacher pass is the costly part."""
        from edgedistill.measure.quality import teacher_targets

        key = hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest()
        if key not in self._teacher_targets:
            self._teacher_targets[key] = teacher_targets(self.teacher(record)[0], examples)
        return self._teacher_targets[key]


@dataclass
class StageContext:
    cfg: BuildConfig
    target: TargetProfile
    dir: Path
    upstream: dict[str, Record]
    session: Session

    def __getitem__(self, name: str) -> Record:
        return self.upstream[name]

    @property
    def console(self) -> Console:
        return self.session.console


def _read_field(cfg: BuildConfig, target: TargetProfile, dotted: str):
    root, _, rest = dotted.partition(".")
    value = target.model_dump(mode="json") if root == "target" else cfg.model_dump(mode="json")
    parts = rest.split(".") if root == "target" else dotted.split(".")
    for p in filter(None, parts):
        value = value[p]
    return value


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def stage_key(stage: Stage, cfg: BuildConfig, target: TargetProfile, upstream: dict[str, Record]) -> str:
    parts = {
        "stage": stage.name,
        "version": [stage.version, __version__],  # an upgrade never reuses another release's outputs
        "reads": {f: _read_field(cfg, target, f) for f in stage.reads},
        "after": {n: (upstream[n].outputs_hash if sel is None else _digest(upstream[n].summary.get(sel)))
                  for n, sel in stage.after.items()},
        "extra": stage.extra(cfg) if stage.extra else None,
    }
    return _digest(parts)[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _outputs(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): file_sha256(p)
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != STAGE_FILE and not any(part.startswith("ckpt") for part in p.parts)}


def _drop_leftovers(partial: Path) -> None:
    """A killed run leaves the temporary files of its unfinished atomic writes (atomic.py names them
    .<name>.<pid>.<id>.partial); a resumed stage rewrites those files, so they go."""
    for leftover in partial.rglob(".*.partial"):
        if leftover.is_file():
            leftover.unlink()


def _stats(folder: Path, outputs: dict) -> Optional[dict]:
    """Size and modification time of each output: a cheap check that none changed since it was
    hashed (renaming the stage folder keeps both). None when one is missing."""
    stats = {}
    for name in outputs:
        try:
            st = (folder / name).stat()
        except OSError:
            return None
        stats[name] = [st.st_size, st.st_mtime_ns]
    return stats


def _load_record(stage: Stage, key: str, folder: Path) -> Optional[Record]:
    marker = folder / STAGE_FILE
    if not marker.is_file():
        return None
    data = json.loads(marker.read_text())
    stats = _stats(folder, data.get("outputs", {}))
    # another key, or outputs that went missing or changed since (a published file is a hard link to
    # its stage output: an in-place edit of OUT/T/x changes the cache too): run it again. A record
    # from before stats were kept is checked for missing outputs only.
    if data.get("key") != key or stats is None or stats != data.get("stats", stats):
        return None
    return Record(stage.name, key, folder, data["summary"], data["outputs_hash"], data.get("outputs", {}),
                  cached=True, seconds=data.get("seconds", 0.0))


def stages_root(cfg: BuildConfig) -> Path:
    return Path(cfg.out) / ".stages"


def run_stage(stage: Stage, session: Session, target: TargetProfile, upstream: dict[str, Record]) -> Record:
    """The stage's record: from the cache, or run now. Under a multi-process launch (processes.py)
    the main process prepares and commits the stage's folder; the stage itself runs on every
    process or on the main one alone, and the others then read its record from the cache."""
    cfg = session.cfg
    key = stage_key(stage, cfg, target, upstream)
    final = stages_root(cfg) / f"{stage.name}-{key}"
    # every process looks at the cache at the same moment: one that looked after the main process had
    # already run and committed the stage would skip the barriers below that the others wait at
    processes.wait()
    record = session._stage_cache.get(final) or _load_record(stage, key, final)
    if record is None:
        partial = final.with_name(final.name + ".partial")
        runs_here = stage.every_process or processes.is_main()
        if processes.is_main():
            _prepare_partial(partial, session.resume)
        if stage.every_process:
            processes.wait()  # the folder is ready before any process writes to it
        if runs_here:
            ctx = StageContext(cfg, target, partial, {n: upstream[n] for n in stage.after}, session)
            t0 = time.perf_counter()
            summary = stage.run(ctx)
            seconds = time.perf_counter() - t0
        if stage.every_process:
            processes.wait()  # every process has finished with the folder before it is committed
        if processes.is_main():
            record = _commit(stage, key, partial, final, summary, seconds)
        processes.wait()
        if record is None:  # the main process ran it: its committed folder is now in the cache
            record = _load_record(stage, key, final)
            if record is None:
                raise RuntimeError(f"stage {stage.name}: the main process left no result at {final}")
    session._stage_cache[final] = record
    return record


def _prepare_partial(partial: Path, resume: bool) -> None:
    if partial.exists() and not resume:
        shutil.rmtree(partial)  # a crashed attempt; without --resume start the stage afresh
    elif partial.exists():
        _drop_leftovers(partial)
    partial.mkdir(parents=True, exist_ok=True)


def _commit(stage: Stage, key: str, partial: Path, final: Path, summary: dict, seconds: float) -> Record:
    """Write the stage file and rename the finished folder into place: the stage is then cached."""
    outputs = _outputs(partial)
    outputs_hash = _digest({"outputs": outputs, "summary": summary})
    atomic.write_json(partial / STAGE_FILE, {"stage": stage.name, "key": key, "summary": summary,
                                             "outputs": outputs, "outputs_hash": outputs_hash,
                                             "stats": _stats(partial, outputs), "seconds": round(seconds, 2)})
    for ckpt in partial.glob("ckpt*"):  # training checkpoints are only for resuming
        shutil.rmtree(ckpt, ignore_errors=True)
    if final.exists():  # an invalid earlier result under the same key (e.g. a deleted output)
        shutil.rmtree(final)
    os.replace(partial, final)
    return Record(stage.name, key, final, summary, outputs_hash, outputs, cached=False, seconds=seconds)


def run_target(stages: list[Stage], session: Session, target: TargetProfile) -> dict[str, Record]:
    records: dict[str, Record] = {}
    for stage in stages:
        label = f"[bold]{stage.name}[/bold] [dim]({target.name})[/dim]"
        session.console.print(f"▶ {label}")
        rec = run_stage(stage, session, target, records)
        note = "cached" if rec.cached else f"{rec.seconds:.1f}s"
        session.console.print(f"  [green]✓[/green] {stage.name} {note}")
        records[stage.name] = rec
    return records


def publish(out: Path, target: TargetProfile, files: dict[str, Path]) -> Path:
    """Assemble OUT/<target>/ from stage outputs (hard links where possible), swapped in whole."""
    final = out / target.name
    staging = out / f".{target.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, src in files.items():
        dst = staging / name
        if src.is_dir():
            shutil.copytree(src, dst, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)
    atomic.replace_dir(staging, final)
    return final


def _link_or_copy(src, dst) -> None:
    if str(src).endswith(".data"):
        # onnx refuses to load external tensor data from a file with more than one hard link (a
        # guard against data files swapped under a model), so ONNX weights are copied, not linked
        shutil.copy2(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
