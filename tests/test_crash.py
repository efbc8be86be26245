"""Crash safety: a build killed at any stage and resumed ends with the artifacts of an uninterrupted build.

The kill points are found by watching the build's own folders (no hooks in the code under test):
a stage's `.partial` folder appearing, the first training checkpoint, the first exported file.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import build_until, fast_config
from edgedistill.export.manifest import MANIFEST, check_files, read_manifest

STEPS = 120  # long enough that training outlasts the test's polling by seconds


def _config(tmp: Path, out: Path, teacher: Path, prompts: Path) -> Path:
    cfg = fast_config(tmp, out, teacher, prompts)
    cfg.write_text(cfg.read_text().replace("steps = 4\n", f"steps = {STEPS}\n").replace(
        "checkpoint_every = 2\n", "checkpoint_every = 10\n"))
    return cfg


def _partial(out: Path, stage: str):
    return lambda: any((out / ".stages").glob(f"{stage}-*.partial"))


def _checkpoint_at_least(out: Path, step: int):
    def reached() -> bool:
        for meta in (out / ".stages").glob("distill-*.partial/ckpt/meta.json"):
            try:
                if json.loads(meta.read_text())["state"]["step"] >= step:
                    return True
            except (OSError, ValueError):  # being swapped in right now
                pass
        return False
    return reached


def _first_export_file(out: Path):
    return lambda: any(p.is_file() for p in (out / ".stages").glob("export-*.partial/**/*"))


def _nothing_looks_finished(out: Path) -> None:
    """After a kill: no published target folder, and every stage folder is complete or marked partial."""
    assert not (out / "phone-4gb").exists()
    for d in (out / ".stages").iterdir():
        assert d.name.endswith(".partial") or (d / "stage.json").is_file(), d.name


def _artifact_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every published file but the reports (they hold timings and the date)."""
    return {f["path"]: f["sha256"] for f in read_manifest(folder)["files"] if f["path"] != "report.json"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_teacher_dir, small_prompts):
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "out"
    res = subprocess.run([sys.executable, "-m", "edgedistill.cli", "build", "--config",
                          str(_config(tmp, out, tiny_teacher_dir, small_prompts)), "--no-progress"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return _artifact_hashes(out / "phone-4gb")


def test_killed_at_every_stage_and_resumed_gives_identical_artifacts(tmp_path, tiny_teacher_dir, small_prompts,
                                                                     reference):
    out = tmp_path / "out"
    cfg = _config(tmp_path, out, tiny_teacher_dir, small_prompts)
    kill_points = [
        ("loading the teacher", _partial(out, "teacher")),
        ("generating data", _partial(out, "data")),
        ("mid-training, after the first checkpoint", _checkpoint_at_least(out, 10)),
        ("mid-training, later", _checkpoint_at_least(out, 60)),
        ("mid-export", _first_export_file(out)),
        ("verifying", _partial(out, "verify")),
        ("measuring", _partial(out, "profile")),
    ]
    for i, (where, reached) in enumerate(kill_points):
        res = build_until(cfg, reached, signal.SIGKILL, *(["--resume"] if i else []))
        assert res.returncode == -signal.SIGKILL, (where, res.stderr[-2000:])
        _nothing_looks_finished(out)
    res = subprocess.run([sys.executable, "-m", "edgedistill.cli", "build", "--config", str(cfg), "--no-progress",
                          "--resume"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "cached" in res.stderr  # the stages finished before the last kill were not run again
    resumed = _artifact_hashes(out / "phone-4gb")
    print(json.dumps({"kill_points": [w for w, _ in kill_points], "files": len(resumed),
                      "sha256": {k: v for k, v in resumed.items() if "/" not in k}}, indent=1))  # for the record (-s)
    assert resumed == reference
    assert check_files(out / "phone-4gb") == []
    assert not list(out.rglob("*.partial")) and not list(out.rglob(".*.partial"))


def test_ctrl_c_stops_at_a_checkpoint_and_says_how_to_resume(tmp_path, tiny_teacher_dir, small_prompts, reference):
    out = tmp_path / "out"
    cfg = _config(tmp_path, out, tiny_teacher_dir, small_prompts)
    res = build_until(cfg, _checkpoint_at_least(out, 10), signal.SIGINT)
    assert res.returncode == 130, res.stderr[-2000:]
    assert "--resume" in res.stderr and "checkpoint saved" in res.stderr and "Traceback" not in res.stderr
    _nothing_looks_finished(out)
    # the checkpoint is the step it stopped at, not the last periodic one
    stopped = int(re.search(r"stopped after step (\d+) of", res.stderr).group(1))
    meta = json.loads(next((out / ".stages").glob("distill-*.partial/ckpt/meta.json")).read_text())
    assert 10 <= stopped < STEPS and meta["state"]["step"] == stopped
    res = subprocess.run([sys.executable, "-m", "edgedistill.cli", "build", "--config", str(cfg), "--no-progress",
                          "--resume"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "phone-4gb" / MANIFEST).is_file()
    assert _artifact_hashes(out / "phone-4gb") == reference
