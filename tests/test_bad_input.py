"""The bad-input matrix through the real CLI: one clear line on stderr, exit 2, no traceback, and
nothing written that looks finished (for input checked up front: nothing written at all).

Cases tested elsewhere: missing teacher, unknown target, out-of-range tau/alpha/compression, hub id
offline (test_cli_e2e.test_bad_input_is_one_line_and_exit_2), unsupported architecture
(test_cli_e2e.test_unsupported_architecture_lists_supported), impossible budgets
(test_cli_e2e.test_an_impossible_budget_fails_before_any_work_and_names_it), profile and config
files (test_targets, test_fuzz), prompt files line by line (test_data.test_user_file_errors).
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY_STUDENT, build_until, cli, fast_config, smollm2_gguf_path
from edgedistill.targets import TARGETS_DIR


def _copy_teacher(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def no_weights(tmp, teacher):
    d = tmp / "no-weights"
    d.mkdir()
    shutil.copy(teacher / "config.json", d)
    return ["--teacher", d]


def truncated_safetensors(tmp, teacher):
    d = _copy_teacher(teacher, tmp / "truncated")
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return ["--teacher", d]


def corrupt_safetensors(tmp, teacher):
    d = _copy_teacher(teacher, tmp / "corrupt")
    w = d / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[8:40] = b"x" * 32  # the JSON header
    w.write_bytes(bytes(data))
    return ["--teacher", d]


def truncated_gguf(tmp, teacher):
    g = tmp / "cut.gguf"
    with open(smollm2_gguf_path(), "rb") as f:
        g.write_bytes(f.read(100_000))  # inside the tokenizer's metadata
    return ["--teacher", g]


def not_gguf(tmp, teacher):
    g = tmp / "model.gguf"
    g.write_text("hello")
    return ["--teacher", g]


def too_large_teacher(tmp, teacher):
    """A config whose model would need terabytes: refused from the config, before any weight is read."""
    d = tmp / "huge"
    d.mkdir()
    cfg = json.loads((teacher / "config.json").read_text())
    cfg.update(hidden_size=16384, intermediate_size=65536, num_hidden_layers=200, num_attention_heads=128,
               num_key_value_heads=8)
    (d / "config.json").write_text(json.dumps(cfg))
    save_file({"placeholder": torch.zeros(1)}, d / "model.safetensors")
    return ["--teacher", d]


def bad_profile_value(tmp, teacher):
    text = (TARGETS_DIR / "phone-4gb.toml").read_text().replace('name = "phone-4gb"', 'name = "my-phone"')
    lines = [("ram_gb = -4" if ln.startswith("ram_gb") else ln) for ln in text.splitlines()]
    p = tmp / "my-phone.toml"
    p.write_text("\n".join(lines) + "\n")
    return ["--teacher", teacher, "--target", p]


def _prompts(name: str, content: bytes):
    def make(tmp, teacher):
        p = tmp / name
        p.write_bytes(content)
        return ["--teacher", teacher, "--prompts", p]
    return make


def unwritable_out(tmp, teacher):
    # an existing folder no process may create files in, root included (chmod does not stop root)
    return ["--teacher", teacher, "--out", "/proc/self"]


CASES = [
    (no_weights, "has no model weights"),
    (truncated_safetensors, "is not a readable safetensors file"),
    (corrupt_safetensors, "is not a readable safetensors file"),
    (truncated_gguf, "cut.gguf"),
    (not_gguf, "is not a GGUF file"),
    (too_large_teacher, "try --teacher-bits 8 or 4 (pip install 'edgedistill[lowmem]')"),
    (bad_profile_value, "ram_gb"),
    (_prompts("empty.jsonl", b""), "empty.jsonl: file is empty"),
    (_prompts("latin.txt", "caf\xe9\n".encode("latin-1")), "latin.txt:1: not valid UTF-8"),
    (_prompts("bad.jsonl", b'{"prompt": "ok"}\n{"prompt": \n'), "bad.jsonl:2: malformed JSON"),
    (unwritable_out, "is not writable"),
]


@pytest.mark.parametrize("make, needle", CASES, ids=[c[0].__name__ if c[0].__name__ != "make" else c[1].split(":")[0]
                                                     for c in CASES])
def test_bad_input_is_one_clear_line_exit_2_and_writes_nothing(make, needle, tmp_path, tiny_teacher_dir):
    args = make(tmp_path, tiny_teacher_dir)
    out = tmp_path / "out"
    if "--out" not in args:
        args += ["--out", out]
    before = sorted(Path(args[args.index("--out") + 1]).iterdir()) if Path(args[args.index("--out") + 1]).is_dir() else None
    res = cli("build", *args, "--student", TINY_STUDENT, "--no-progress")
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert needle in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    given = Path(args[args.index("--out") + 1])
    assert (sorted(given.iterdir()) if given.is_dir() else None) == before, "input is checked before anything is written"


def _limited(cfg: Path, limit: int, *extra: str) -> subprocess.CompletedProcess:
    """A build under a file size limit (RLIMIT_FSIZE), which stands in for a full disk: writes past it
    fail with EFBIG, as they fail with ENOSPC on a full disk."""
    def limit_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return subprocess.run([sys.executable, "-m", "edgedistill.cli", "build", "--config", str(cfg), "--no-progress",
                           *extra], capture_output=True, text=True, timeout=900, preexec_fn=limit_files)


def _says_disk_full(res: subprocess.CompletedProcess, out: Path) -> None:
    assert res.returncode == 2, res.stderr[-2000:]
    assert "the disk is full" in res.stderr and "--resume" in res.stderr and "Traceback" not in res.stderr
    assert not (out / "phone-4gb").exists()
    assert all(d.name.endswith(".partial") or (d / "stage.json").is_file() for d in (out / ".stages").iterdir())


def test_a_full_disk_is_exit_2_and_resumable(tmp_path, tiny_teacher_dir, small_prompts):
    """Two places: the teacher's snapshot (safetensors keeps the errno) and a training checkpoint
    (torch.save's writer drops it; the trainer says what it was)."""
    out = tmp_path / "out"
    cfg = fast_config(tmp_path, out, tiny_teacher_dir, small_prompts)
    _says_disk_full(_limited(cfg, 1 << 20), out)  # the 13 MB teacher snapshot
    # past the teacher (no limit), then the first checkpoint under a limit its optimizer state exceeds
    build_until(cfg, lambda: any((out / ".stages").glob("distill-*.partial")), signal.SIGKILL, "--resume")
    full = _limited(cfg, 10 << 20, "--resume")
    _says_disk_full(full, out)
    assert "training checkpoint" in full.stderr

    res = cli("build", "--config", cfg, "--no-progress", "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "phone-4gb" / "manifest.json").is_file()
