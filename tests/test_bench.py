"""`edgedistill bench`: the noise-aware regression rule on synthetic samples, comparability, bad input,
and real runs through the CLI: a re-run of the same configuration passes, a genuinely slowed
environment (the same artifact and protocol, its process sharing one core with two busy loops)
is caught with the decode metric flagged."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli
from edgedistill import bench
from edgedistill.export.gguf import export_gguf

# ---- (a) the rule, on synthetic samples


def test_a_shift_beyond_tolerance_and_outside_the_baseline_range_is_a_regression():
    base = [100, 104, 97, 102, 110]
    slower = [70, 74, 68, 72, 71]  # decode tok/s: higher is better
    c = bench.compare_samples(base, slower, "higher", 10.0)
    assert c["verdict"] == "regression", c
    assert c["change_pct"] == pytest.approx((71 - 102) / 102 * 100)
    # a lower-is-better metric (TTFT ms) that grew
    assert bench.compare_samples([50, 52, 49], [80, 78, 85], "lower", 10.0)["verdict"] == "regression"


def test_noise_is_not_a_regression():
    base = [100, 104, 97, 102, 110]
    assert bench.compare_samples(base, [98, 103, 95, 101, 106], "higher", 10.0)["verdict"] == "ok"
    # 20% worse, but inside a wide baseline range: the baseline's own spread explains it
    c = bench.compare_samples([60, 100, 140, 90, 120], [80, 75, 85], "higher", 10.0)
    assert c["worse_pct"] == pytest.approx(20.0) and c["verdict"] == "ok" and "noise" in c["why"]
    # outside a tight range but within the tolerance: peak RSS up 3%
    c = bench.compare_samples([200.0, 200.1, 200.0], [206.0, 206.1, 206.0], "lower", 10.0)
    assert c["verdict"] == "ok" and "within 10%" in c["why"]
    # faster is never a regression
    assert bench.compare_samples(base, [150, 160, 155], "higher", 10.0)["verdict"] == "improved"
    assert bench.compare_samples(base, [], "higher", 10.0)["verdict"] == "n/a"


def _run(sha="a" * 64, **changes):
    """A synthetic bench run record, as `--save` writes it."""
    run = {
        "schema": bench.SCHEMA, "created": "2026-11-22T00:00:00Z",
        "fingerprint": {"cpu_model": "AMD EPYC", "cpu_flags": ["avx2"], "machine": "x86_64", "logical_cores": 2,
                        "physical_cores": 2, "usable_cores": 2, "cpu_quota": None, "os": "Linux", "python": "3.11.7",
                        "versions": {"llama_cpp": "0.3.36", "onnxruntime": "1.32.0"}, "threads": 2,
                        "edgedistill": "0.1.0"},
        "protocol": {"prompt_tokens": 64, "new_tokens": 32, "repeats": 5, "runs_per_process": 3, "threads": 2,
                     "prompt_rule": bench.PROMPT_RULE, "what": "synthetic"},
        "artifacts": [{"file": "model-q8_0.gguf", "format": "gguf-q8_0", "bytes": 1, "sha256": sha,
                       "samples": {"load_s": [0.2, 0.21, 0.19], "ttft_ms": [50, 52, 49],
                                   "prefill_tok_s": [1280, 1230, 1306], "decode_tok_s": [400, 410, 390],
                                   "peak_rss_mb": [180, 180, 180]}}],
    }
    for path, value in changes.items():
        section, key = path.split("__")
        run[section][key] = value
    return run


def test_a_different_artifact_machine_or_protocol_is_not_comparable():
    base = _run()
    [c] = bench.compare(base, _run(sha="b" * 64), 10.0)
    assert c["verdict"] == "not comparable" and "a different artifact: sha256 aaaaaaaaaaaa" in c["reasons"][0]
    assert {m["verdict"] for m in c["metrics"].values()} == {"not comparable"}
    [c] = bench.compare(base, _run(fingerprint__cpu_model="Intel Xeon"), 10.0)
    assert c["verdict"] == "not comparable" and "a different machine: cpu_model" in c["reasons"][0]
    [c] = bench.compare(base, _run(protocol__new_tokens=64), 10.0)
    assert c["verdict"] == "not comparable" and "a different protocol: new_tokens 32" in c["reasons"][0]
    # the same artifact, machine and protocol with fewer threads and a new runtime: comparable, noted
    new = _run(protocol__threads=1)
    new["fingerprint"]["versions"] = {"llama_cpp": "0.3.40", "onnxruntime": "1.32.0"}
    new["artifacts"][0]["samples"]["decode_tok_s"] = [200, 210, 190]
    [c] = bench.compare(base, new, 10.0)
    assert c["verdict"] == "regression" and c["regressed"] == ["decode_tok_s"]
    assert "threads 2 -> 1" in c["notes"] and "llama_cpp 0.3.36 -> 0.3.40" in c["notes"]


# ---- bad input: one line, exit 2, nothing measured or written


@pytest.fixture(scope="module")
def artifact(tiny_teacher_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "tiny-q8_0.gguf"
    export_gguf(tiny_teacher_dir, path, "gguf-q8_0")
    return path


def _cli_in_process(capsys, *args) -> tuple[int, str, str]:
    """`edgedistill ARGS` through the CLI's own main() (its exit-code mapping), without a new interpreter."""
    from edgedistill import cli as climod

    argv, sys.argv = sys.argv, ["edgedistill", *map(str, args)]
    try:
        climod.main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_exit_2(result, *words: str) -> None:
    code, _, stderr = result
    assert code == 2, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    for w in words:
        assert w in stderr, stderr


def test_bad_input_is_one_line_and_exit_2(artifact, tmp_path, capsys):
    save = tmp_path / "saved.json"
    res = cli("bench", tmp_path / "missing.gguf", "--save", save)  # once through the real console script path
    _one_line_exit_2((res.returncode, res.stdout, res.stderr), "artifact not found")

    def bench_cli(*args):
        return _cli_in_process(capsys, "bench", *args)

    (tmp_path / "broken.json").write_text('{"schema": "edgedistill-bench/1", "artifacts": [')
    _one_line_exit_2(bench_cli(artifact, "--baseline", tmp_path / "broken.json", "--save", save),
                     "broken.json", "line 1", "not valid JSON")
    (tmp_path / "other.json").write_text('{"some": "json"}')
    _one_line_exit_2(bench_cli(artifact, "--baseline", tmp_path / "other.json"), "not an edgedistill bench result")
    (tmp_path / "bad-samples.json").write_text(json.dumps(
        {**_run(), "artifacts": [{"file": "x.gguf", "sha256": "a", "samples": {"decode_tok_s": "fast"}}]}))
    _one_line_exit_2(bench_cli(artifact, "--baseline", tmp_path / "bad-samples.json"), "samples.decode_tok_s")
    _one_line_exit_2(bench_cli(artifact, "--baseline", tmp_path / "none.json"), "baseline not found")
    (tmp_path / "not.gguf").write_bytes(b"GGUF\x03\x00")
    _one_line_exit_2(bench_cli(tmp_path / "not.gguf"), "not.gguf")
    _one_line_exit_2(bench_cli(artifact, "--threads", "0"), "--threads")
    _one_line_exit_2(bench_cli(artifact, "--prompt-tokens", "2040", "--new-tokens", "32"), "context")
    _one_line_exit_2(bench_cli(artifact, "--save", tmp_path / "no-such-dir" / "b.json"), "does not exist")
    assert not save.exists()


# ---- (b) real runs through the CLI
# Every run is pinned to one CPU (taskset -c N): on this project's shared 2-core host that is what
# makes back-to-back runs repeatable (unpinned, other jobs moved the medians by up to 70% between
# runs a minute apart, and llama.cpp's prefill, which ignores --threads and uses both cores, had
# 1-second stalls; pinned, decode moved by at most 24%).
# The slowed environment is the same pinned command under a CPU quota of a quarter: its process
# group runs 10 ms of every 40 ms (SIGSTOP/SIGCONT, what a cgroup's cpu.max = "10000 40000" does to a
# container). The artifact, protocol and options are the same. Busy loops sharing the CPU were the
# first choice, but their effect shrinks when other jobs already load that CPU (3 of 3 runs missed
# decode at load average 6.7, 6 of 6 caught at 5); a quota slows the run 4x whatever else runs.
# Fewer threads (2 -> 1) is no slowdown here at all: with other jobs on the second core, 2 threads
# decoded slower than 1 (50 vs 150-340 tok/s for a 55 MB model).
# Tolerance 50%: in 8 trials of this test's three runs (load average 4.6-4.9), the re-run was up to 24%
# worse in decode and 36% in load time (TTFT up to 50%, inside the baseline's range), the quota run
# 68-76% worse in decode and 169-322% in load time. At 50%: 0 of 8 re-runs flagged, 8 of 8 quota runs
# caught; at the default 10%: 2 of 8 re-runs flagged (load time, TTFT), 8 of 8 caught.
TOLERANCE = "50"
QUOTA_RUN_S, QUOTA_STOP_S = 0.010, 0.030


def _bench(artifact: Path, tmp_path: Path, *args, quota: bool = False, json_out: bool = True):
    """`edgedistill bench ARTIFACT [--json] ARGS` pinned to one CPU; (exit code, stderr, stdout parsed if --json)."""
    cmd = [sys.executable, "-m", "edgedistill.cli", "bench", str(artifact), *(["--json"] if json_out else []),
           *map(str, args)]
    cpu = min(os.sched_getaffinity(0))
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
                                start_new_session=True)  # its own process group: the bench and its children
        try:
            while quota and proc.poll() is None:
                _signal_group(proc.pid, signal.SIGSTOP)
                time.sleep(QUOTA_STOP_S)
                _signal_group(proc.pid, signal.SIGCONT)
                time.sleep(QUOTA_RUN_S)
            proc.wait(timeout=600)
        finally:
            _signal_group(proc.pid, signal.SIGCONT)
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
    stderr = err.read_text()
    assert proc.returncode in (0, 1, 2) and "Traceback" not in stderr, stderr
    text = out.read_text()
    return proc.returncode, stderr, (json.loads(text) if text.strip() else {}) if json_out else text


def _signal_group(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_a_rerun_passes_and_a_slowed_environment_is_caught(artifact, tmp_path):
    base_file, rerun_file = tmp_path / "baseline.json", tmp_path / "rerun.json"
    protocol = ["--threads", "1", "--new-tokens", "64", "--tolerance", TOLERANCE]
    # A baseline and the same configuration re-run right after it: no regression (exit 0), shown as the
    # table. The host is shared: another job can stall one run, or shift the machine's speed between two
    # runs for minutes (CI once saw TTFT 51% slower and decode 52% faster on a re-run, both trials
    # against one baseline). So a trial is a fresh baseline and its re-run, back to back, and the test
    # fails when 3 trials all do: the rule held is "a re-run passes", not "every run is quiet".
    for _trial in range(3):
        code, err, out = _bench(artifact, tmp_path, *protocol, "--repeats", "5", "--save", base_file)
        assert code == 0 and out["comparison"] is None, err
        saved = json.loads(base_file.read_text())
        code, err, out = _bench(artifact, tmp_path, *protocol, "--repeats", "5", "--baseline", base_file,
                                "--save", rerun_file, json_out=False)
        [c] = bench.compare(saved, json.loads(rerun_file.read_text()), float(TOLERANCE))  # what the CLI computed
        if code == 0:
            break
    assert code == 0 and c["verdict"] == "ok" and c["regressed"] == [], _table(c)
    assert saved["schema"] == bench.SCHEMA and saved["protocol"]["threads"] == 1
    assert saved["fingerprint"]["cpu_model"] and saved["fingerprint"]["versions"]["llama_cpp"]
    assert saved["fingerprint"]["usable_cores"] == 1
    [art] = saved["artifacts"]
    assert art["sha256"] == bench.artifact_sha256(artifact) and art["format"] == "gguf-q8_0"
    assert len(art["samples"]["decode_tok_s"]) == 5 * bench.RUNS_PER_PROCESS and len(art["samples"]["load_s"]) == 5
    assert len(art["processes"]) == 5 and all(len(p["runs"]) == bench.RUNS_PER_PROCESS for p in art["processes"])
    for label in ("load time", "time to first token", "prefill", "decode", "peak RSS", "baseline median [min-max]",
                  "new median [min-max]", "change", "verdict", "machine: ", "threads 1", "rule: ", "no regression"):
        assert label in out, out

    # the same artifact, protocol and options under a quarter-CPU quota: exit 1, its speed flagged. Which
    # speed figures: each one the quota moved out of the baseline's range. A baseline run stalled by
    # another job on this shared host widens one figure's range (seen once in CI: decode min 475 tok/s
    # beside a median of 3060), and the rule then rightly leaves that figure alone; the others catch it.
    code, err, out = _bench(artifact, tmp_path, *protocol, "--repeats", "2", "--baseline", base_file, quota=True)
    [c] = out["comparison"]
    flagged = {"decode_tok_s", "prefill_tok_s", "ttft_ms"} & set(c["regressed"])
    assert code == 1 and flagged, _table(c)
    assert err.startswith("regression: tiny-q8_0.gguf:")
    assert c["notes"] == ["repeats 5 -> 2"]  # nothing else differs: same machine, threads, versions

    # a baseline of another artifact: measured and shown, but no verdict (exit 2, one line)
    other = copy.deepcopy(saved)
    other["artifacts"][0]["sha256"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    code, err, out = _bench(artifact, tmp_path, *protocol, "--repeats", "1", "--baseline", tmp_path / "other.json",
                            "--save", tmp_path / "new.json")
    assert code == 2 and out["comparison"][0]["verdict"] == "not comparable"
    assert err.strip().startswith("not comparable with the baseline") and "sha256 000000000000" in err
    assert len(err.strip().splitlines()) == 1
    assert (tmp_path / "new.json").is_file()  # the figures were measured and saved all the same


def _table(c: dict) -> str:
    return "\n".join(f"{k}: {m['verdict']} {m.get('change_pct')} base {m['baseline']} new {m['new']}"
                     for k, m in c["metrics"].items())


def test_an_artifact_has_one_sha256_in_bench_report_and_manifest(tiny_build):
    """A baseline names its artifact by the digest the build published, so a user can match the two."""
    res, out, _ = tiny_build
    assert res.returncode == 0, res.stderr[-3000:]
    folder = out / "phone-4gb"
    report = json.loads((folder / "report.json").read_text())
    manifest = {a["file"]: a["sha256"] for a in json.loads((folder / "manifest.json").read_text())["artifacts"]}
    kinds = set()
    for art in report["artifacts"]:
        path = folder / art["file"]
        kinds.add(path.is_dir())
        assert bench.artifact_sha256(path) == art["sha256"] == manifest[art["file"]], art["file"]
    assert kinds == {True, False}  # GGUF files and ONNX folders both
