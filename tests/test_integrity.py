"""`edgedistill verify OUT/T`: the published files against manifest.json, and the parity gate re-run on the folder."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest

from conftest import cli, fast_config
from edgedistill.export.manifest import MANIFEST, check_files, read_manifest
from edgedistill.pipeline import file_sha256


@pytest.fixture
def published(tiny_build, tmp_path):
    """A copy of a finished build's phone-4gb folder, free to tamper with."""
    res, out, _ = tiny_build
    assert res.returncode == 0, res.stderr[-2000:]
    folder = tmp_path / "phone-4gb"
    shutil.copytree(out / "phone-4gb", folder)
    return folder


def test_the_manifest_lists_every_published_file(published):
    manifest = read_manifest(published)
    listed = {f["path"] for f in manifest["files"]}
    on_disk = {p.relative_to(published).as_posix() for p in published.rglob("*") if p.is_file()}
    assert on_disk - listed == {MANIFEST, "report.md", "report.html"}
    assert {"model-q4_0.gguf", "onnx-int4/model.onnx", "student/model.safetensors", "report.json"} <= listed
    for f in manifest["files"]:
        assert f["sha256"] == file_sha256(published / f["path"]) and f["bytes"] == (published / f["path"]).stat().st_size
    assert check_files(published) == []


def test_an_untouched_folder_verifies_and_the_gate_reruns(published):
    res = cli("verify", published, "--no-progress", "--json")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads(res.stdout)
    assert result["ok"] and not result["problems"]
    assert set(result["artifacts"]) == {"gguf-q4_0", "gguf-q8_0", "onnx-int4", "onnx-int8"}
    for r in result["artifacts"].values():
        assert r["ran"] and r["now"]["weights_ok"]
        # same files, same runtime, same tokens: the figures the build recorded come back
        assert r["now"]["kl"] == pytest.approx(r["recorded"]["kl"], rel=1e-3, abs=1e-9)


def test_tampered_missing_resized_and_added_files_are_each_named(published):
    gguf_file = published / "model-q8_0.gguf"
    data = bytearray(gguf_file.read_bytes())
    data[-5] ^= 0xFF  # a weight byte: same size, other contents
    gguf_file.write_bytes(bytes(data))
    (published / "student" / "config.json").unlink()
    with open(published / "onnx-int8" / "genai_config.json", "a") as f:
        f.write(" ")
    (published / "onnx-int4" / "extra.onnx").write_bytes(b"not in the build")

    res = cli("verify", published, "--no-progress")
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-2000:]
    out = res.stdout
    assert "model-q8_0.gguf: contents changed" in out
    assert "student/config.json: missing" in out
    assert "onnx-int8/genai_config.json: size" in out
    assert "onnx-int4/extra.onnx: not in the manifest" in out
    assert "NOT VERIFIED" in out
    # with the student damaged no artifact's gate is run: it would check against the wrong model
    result = json.loads(cli("verify", published, "--no-progress", "--json").stdout)
    assert not any(r["ran"] for r in result["artifacts"].values())


def test_a_reweighted_artifact_with_a_rewritten_manifest_fails_the_rerun_gate(published):
    """Hashes only prove the files are the ones the manifest lists; the re-run gate proves they are
    the weights the student was trained to: here someone edited a scale and updated the manifest."""
    path = published / "model-q4_0.gguf"
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.1.attn_output.weight")
    with open(path, "r+b") as f:  # the first block's fp16 scale, times 1.5
        f.seek(tensor.data_offset)
        d = np.frombuffer(f.read(2), np.float16)[0]
        f.seek(tensor.data_offset)
        f.write(np.float16(d * 1.5).tobytes())
    manifest = json.loads((published / MANIFEST).read_text())
    for f in manifest["files"]:
        if f["path"] == "model-q4_0.gguf":
            f["sha256"] = file_sha256(path)
    (published / MANIFEST).write_text(json.dumps(manifest))

    res = cli("verify", published, "--no-progress", "--json")
    assert res.returncode == 1
    result = json.loads(res.stdout)
    assert not result["problems"]
    bad = result["artifacts"]["gguf-q4_0"]
    assert bad["ran"] and not bad["ok"] and not bad["now"]["weights_ok"]
    assert {c["name"] for c in bad["checks"] if not c["ok"]} >= {"parity_weights"}
    assert all(r["ok"] for fmt, r in result["artifacts"].items() if fmt != "gguf-q4_0")


def test_files_only_skips_the_gate(published):
    (published / "report.json").write_text("{}")
    res = cli("verify", published, "--files-only", "--no-progress")
    assert res.returncode == 1 and "report.json: size" in res.stdout and "parity gate" not in res.stdout


@pytest.mark.parametrize("make, needle", [
    (lambda d: None, "has no manifest.json"),
    (lambda d: (d / MANIFEST).write_text("{not json"), "is not valid JSON"),
    (lambda d: (d / MANIFEST).write_text('{"files": []}'), "is not a version-2 edgedistill manifest"),
])
def test_a_folder_that_is_not_a_build_is_exit_2(tmp_path, make, needle):
    make(tmp_path)
    res = cli("verify", tmp_path)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_an_in_place_edit_of_a_published_file_does_not_poison_the_cache(tiny_build, tmp_path, tiny_teacher_dir,
                                                                        small_prompts):
    """Published files are hard links to the stage outputs, so an in-place edit reaches the cache; the
    next build must notice (size/mtime against stage.json) and rebuild, not publish the edited file."""
    _, shared_out, _ = tiny_build
    out = tmp_path / "out"
    shutil.copytree(shared_out / ".stages", out / ".stages")  # copy2 keeps the mtimes: all cached
    cfg = fast_config(tmp_path, out, tiny_teacher_dir, small_prompts, targets=("phone-4gb", "rpi5-8gb"))
    first = cli("build", "--config", cfg, "--no-progress")
    assert first.returncode == 0 and "export 0" not in first.stderr, first.stderr[-2000:]
    published = out / "phone-4gb" / "model-q8_0.gguf"
    original = file_sha256(published)
    with open(published, "r+b") as f:  # as gguf's own metadata editor does: in place
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")
    again = cli("build", "--config", cfg, "--no-progress")
    assert again.returncode == 0, again.stderr[-2000:]
    assert check_files(out / "phone-4gb") == []
    assert file_sha256(out / "phone-4gb" / "model-q8_0.gguf") == original


@pytest.mark.parametrize("mutate, needle", [
    (lambda m: m["files"][0].update(path="../outside"), "not a plain path inside the folder"),
    (lambda m: m["files"][0].update(path="/etc/passwd"), "not a plain path inside the folder"),
    (lambda m: m["files"][0].update(path="student//config.json"), "not a plain path inside the folder"),
    (lambda m: m["files"].append(dict(m["files"][0])), "is listed twice"),
    (lambda m: m["files"][0].update(bytes="1"), "has no valid size"),
    (lambda m: m["files"][0].update(sha256="abc"), "has no valid sha256"),
    (lambda m: m.pop("student"), "no valid 'student'"),
    (lambda m: m["artifacts"][0].update(file="elsewhere.gguf"), "is not listed"),
])
def test_a_malformed_manifest_is_bad_input_not_a_crash(published, mutate, needle):
    manifest = json.loads((published / MANIFEST).read_text())
    mutate(manifest)
    (published / MANIFEST).write_text(json.dumps(manifest))
    for args in (["--files-only"], []):
        res = cli("verify", published, *args)
        assert res.returncode == 2, res.stderr[-2000:]
        assert "is malformed" in res.stderr and needle in res.stderr and "Traceback" not in res.stderr


def test_links_and_edited_reports_are_named(published, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("not built")
    (published / "student" / "extra.txt").symlink_to(outside)
    (published / "onnx-int4" / "linked").symlink_to(tmp_path)
    md = published / "report.md"
    md.write_text(md.read_text().replace("PASS", "PASS (edited)") + "\nall good\n")
    res = cli("verify", published, "--files-only", "--no-progress")
    assert res.returncode == 1, res.stdout[-2000:]
    assert "student/extra.txt: a link the build did not write" in res.stdout
    assert "onnx-int4/linked: a link the build did not write" in res.stdout
    assert "report.md: differs from what report.json renders to" in res.stdout
