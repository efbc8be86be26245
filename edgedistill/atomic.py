"""Whole-file writes: a temporary name beside the target, flushed to disk, then renamed over it.

A reader (or a build resumed after a crash) sees either the old file or the complete new one,
never a half-written file that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path` to write; on success it is renamed over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def replace_dir(staging: Path, final: Path) -> None:
    """Put the finished folder `staging` in the place of `final` (which need not exist yet).

    os.replace renames a folder over a missing or empty one only, so an existing `final` is first
    renamed aside to a `.old` sibling, then `staging` takes its name, then the old one is removed.
    Both renames are atomic: a reader sees the old folder, the new one or (for a moment between the
    renames) none, never a half-written one. The `.old` name is unique to this call, so a folder of
    the user's that happens to be named like it is never removed (a crash between the renames leaves
    the previous folder there, for a person to find); if the second rename fails, the old folder is
    put back.
    """
    staging, final = Path(staging), Path(final)
    old = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.old")
    moved = final.exists() or final.is_symlink()
    if moved:
        os.replace(final, old)
    try:
        os.replace(staging, final)
    except BaseException:
        if moved:
            os.replace(old, final)
        raise
    if old.is_symlink():
        old.unlink()  # a link is removed, never followed: what it pointed to is not ours to delete
    elif moved:
        shutil.rmtree(old, ignore_errors=True)
