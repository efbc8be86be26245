"""The real `edgedistill` CLI end to end on a tiny random teacher: every artifact built and loaded in its runtime."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from safetensors.torch import save_file

from edgedistill.targets import TARGETS_DIR

from conftest import TINY_STUDENT, cli, fast_config  # noqa: E402


def test_build_succeeds_and_writes_every_artifact(tiny_build):
    res, out, _ = tiny_build
    assert res.returncode == 0, res.stderr[-3000:]
    for target in ("phone-4gb", "rpi5-8gb"):
        folder = out / target
        report = json.loads((folder / "report.json").read_text())
        assert report["schema_version"] == 1 and report["target"] == target and report["ok"] is True
        formats = {a["format"] for a in report["artifacts"]}
        assert formats == {"gguf-q4_0", "gguf-q8_0", "onnx-int4", "onnx-int8"}
        for art in report["artifacts"]:
            path = folder / art["file"]
            assert path.exists(), art["file"]
            # each artifact was loaded in its real runtime: parity and host timings exist
            assert 0.0 <= art["parity"]["top1_agreement"] <= 1.0 and art["parity"]["kl"] >= 0.0
            assert art["host"]["decode_tok_s"] > 0 and art["host"]["peak_rss_mb"] > 0
            assert art["projected"]["decode_tok_s"] > 0 and art["checks"]
        assert (folder / "report.md").is_file() and (folder / "report.html").is_file()
        manifest = json.loads((folder / "manifest.json").read_text())
        assert {f["file"] for f in manifest["artifacts"]} == {a["file"] for a in report["artifacts"]}
        assert (folder / "student" / "config.json").is_file()
        # the published ONNX folder and the stage's own copy both load with their external data
        onnx.load(str(folder / "onnx-int4" / "model.onnx"))
        onnx.load(str(next((out / ".stages").glob("export-*/onnx-int4/model.onnx"))))
    assert not list(out.rglob("*.partial")), "a finished build leaves no partial files"


def test_second_target_reuses_the_shared_stages(tiny_build):
    res, out, _ = tiny_build
    # both targets share teacher, data, and (same explicit shape) the student: one stage folder each
    for stage in ("teacher", "data", "init", "distill"):
        assert len(list((out / ".stages").glob(f"{stage}-*"))) == 1, stage


def test_rerun_is_fully_cached_and_identical(tiny_build):
    res, out, cfg = tiny_build
    before = json.loads((out / "phone-4gb" / "manifest.json").read_text())
    again = cli("build", "--config", cfg, "--no-progress")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count("cached") >= 10
    after = json.loads((out / "phone-4gb" / "manifest.json").read_text())
    assert before["files"] == after["files"]


def test_written_config_replays(tiny_build):
    _, out, _ = tiny_build
    written = out / "build-config.toml"
    assert written.is_file()
    res = cli("build", "--config", written, "--dry-run")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "plan for phone-4gb" in res.stderr and "cached" in res.stderr


def test_inspect_describes_artifacts(tiny_build):
    _, out, _ = tiny_build
    res = cli("inspect", out / "phone-4gb" / "model-q4_0.gguf")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["architecture"] == "llama" and info["tensor_types"].get("Q4_0", 0) > 0 and info["layers"] == 2
    res = cli("inspect", out / "phone-4gb" / "onnx-int4")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["kv_cache"] is True and 4 in info["weight_bits"]


def test_a_failed_budget_exits_1_and_the_report_says_why(tmp_path, tiny_teacher_dir, small_prompts, tiny_build):
    _, shared_out, _ = tiny_build
    profile = (TARGETS_DIR / "phone-4gb.toml").read_text()
    profile = profile.replace('name = "phone-4gb"', 'name = "impossible-phone"')
    lines = [ln if not ln.startswith("min_decode_tok_s") else "min_decode_tok_s = 1e9  # test: unreachable"
             for ln in profile.splitlines()]
    custom = tmp_path / "impossible-phone.toml"
    custom.write_text("\n".join(lines) + "\n")
    cfg = fast_config(tmp_path, shared_out, tiny_teacher_dir, small_prompts, targets=(str(custom),))
    res = cli("build", "--config", cfg, "--no-progress")
    assert res.returncode == 1, res.stderr[-3000:]
    report = json.loads((shared_out / "impossible-phone" / "report.json").read_text())
    assert report["ok"] is False
    failed = [c for a in report["artifacts"] for c in a["checks"] if not c["ok"]]
    assert failed and all(c["name"] == "decode_tok_s" for c in failed)
    assert "decode" in res.stderr


def test_learned_scales_and_asymmetric_onnx_blocks_pass_the_gate(tmp_path, tiny_teacher_dir, small_prompts):
    out = tmp_path / "out"
    cfg = fast_config(tmp_path, out, tiny_teacher_dir, small_prompts)
    res = cli("build", "--config", cfg, "--no-progress", "--learn-scales", "--onnx-block-size", "64",
              "--onnx-asymmetric", "--onnx-int8-per-channel")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "phone-4gb" / "student" / "quant_scales.safetensors").is_file()
    report = json.loads((out / "phone-4gb" / "report.json").read_text())
    for art in report["artifacts"]:
        gate = [c for c in art["checks"] if c["name"].startswith("parity_")]
        assert len(gate) == 3 and all(c["ok"] for c in gate), (art["file"], gate)
        assert art["parity"]["weights"]["max_abs_diff"] == 0.0
    info = json.loads((out / "phone-4gb" / "onnx-int4" / "edgedistill_onnx.json").read_text())
    assert info["symmetric"] is False and info["block_size"] == 64


def test_a_corrupted_artifact_fails_the_parity_gate_with_exit_1(tmp_path, tiny_teacher_dir, small_prompts, tiny_build):
    import shutil

    import gguf
    import numpy as np

    _, shared_out, _ = tiny_build
    out = tmp_path / "out"
    shutil.copytree(shared_out / ".stages", out / ".stages")
    # verify must look at the file again, and report must read the new verdict (stage keys follow the
    # config, not the files)
    for stale in [*(out / ".stages").glob("verify-*"), *(out / ".stages").glob("report-*")]:
        shutil.rmtree(stale)
    # the export phone-4gb published (the shared folder also holds other targets' exports)
    published = shared_out / "phone-4gb" / "model-q4_0.gguf"
    export = next(p.parent.name for p in (shared_out / ".stages").glob("export-*/model-q4_0.gguf")
                  if p.samefile(published))
    path = out / ".stages" / export / "model-q4_0.gguf"
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.1.attn_output.weight")
    with open(path, "r+b") as f:  # the first block's fp16 scale, scaled by 1.5
        f.seek(tensor.data_offset)
        d = np.frombuffer(f.read(2), np.float16)[0]
        f.seek(tensor.data_offset)
        f.write(np.float16(d * 1.5).tobytes())
    # as if the exporter itself had written the wrong scale: the stage record vouches for the file (an
    # edit after the stage finished would be caught by the cache and the stage run again)
    record = out / ".stages" / export / "stage.json"
    meta = json.loads(record.read_text())
    st = path.stat()
    meta["stats"]["model-q4_0.gguf"] = [st.st_size, st.st_mtime_ns]
    record.write_text(json.dumps(meta))
    cfg = fast_config(tmp_path, out, tiny_teacher_dir, small_prompts)
    res = cli("build", "--config", cfg, "--no-progress")
    assert res.returncode == 1, res.stderr[-3000:]
    report = json.loads((out / "phone-4gb" / "report.json").read_text())
    failed = {(a["format"], c["name"]) for a in report["artifacts"] for c in a["checks"] if not c["ok"]}
    assert ("gguf-q4_0", "parity_weights") in failed and all(fmt == "gguf-q4_0" for fmt, _ in failed)
    assert "o_proj" in res.stderr and "parity" in (out / "phone-4gb" / "report.md").read_text()


@pytest.mark.parametrize("args, needle", [
    (["build", "--teacher", "/no/such/folder", "--dry-run"], "teacher not found"),
    (["build", "--target", "phone-4g", "--dry-run"], "did you mean phone-4gb"),
    (["build", "--temperature", "0", "--dry-run"], "temperature"),
    (["build", "--alpha", "1.5", "--dry-run"], "alpha"),
    (["build", "--compression", "0.5", "--dry-run"], "compression"),
    (["inspect", "README.md"], "neither a GGUF"),
    (["build", "--teacher", "someorg/some-model", "--dry-run"], "cannot fetch hub model"),
    (["build", "--student", "layers=2,hidden=oops", "--dry-run"], "--student takes"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, tmp_path):
    res = cli(*args, "--out", tmp_path / "o") if args[0] == "build" else cli(*args)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert needle in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_usage_errors_exit_2_with_usage():
    res = cli("build", "--bogus")
    assert res.returncode == 2 and "No such option" in res.stderr and "Traceback" not in res.stderr


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    save_file({"placeholder": torch.zeros(1)}, tmp_path / "model.safetensors")
    res = cli("build", "--teacher", tmp_path, "--dry-run", "--out", tmp_path / "o")
    assert res.returncode == 2, res.stderr
    assert "unsupported teacher architecture 'gpt2'" in res.stderr and "Llama" in res.stderr


def test_targets_lists_every_profile():
    res = cli("targets")
    assert res.returncode == 0
    for name in ("phone-4gb", "phone-8gb", "phone-12gb", "iphone-8gb", "rpi5-8gb", "jetson-orin-nano-8gb",
                 "laptop-16gb", "browser-wasm", "wearable-1gb"):
        assert name in res.stdout
    one = cli("targets", "wearable-1gb")
    assert one.returncode == 0 and json.loads(one.stdout)["name"] == "wearable-1gb"


def test_a_gguf_teacher_file_is_accepted(tiny_teacher_dir, tmp_path):
    from edgedistill.export.gguf import export_gguf

    gguf = tmp_path / "tiny-teacher-q8_0.gguf"
    export_gguf(tiny_teacher_dir, gguf, "gguf-q8_0")
    res = cli("build", "--teacher", gguf, "--student", TINY_STUDENT, "--target", "rpi5-8gb", "--dry-run",
              "--out", tmp_path / "o")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "teacher tiny-teacher-q8_0" in res.stderr and "plan for rpi5-8gb" in res.stderr


def test_an_impossible_budget_fails_before_any_work_and_names_it(tmp_path, tiny_teacher_dir):
    profile = (TARGETS_DIR / "wearable-1gb.toml").read_text().replace('name = "wearable-1gb"', 'name = "tiny-disk"')
    lines = [ln if not ln.startswith("artifact_gb") else "artifact_gb = 1e-6  # test: 1 kB" for ln in profile.splitlines()]
    custom = tmp_path / "tiny-disk.toml"
    custom.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o"
    res = cli("build", "--teacher", tiny_teacher_dir, "--target", custom, "--out", out, "--no-progress")
    assert res.returncode == 2, res.stderr
    assert "artifact" in res.stderr and "over by" in res.stderr and "Traceback" not in res.stderr
    assert not list(out.glob(".stages/*")), "nothing may run before the plan is known to fit"
