"""`edgedistill package`: app layouts, the package manifest, refusal of a tampered build, size limits, web split."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import cli

from edgedistill import package as pk
from edgedistill.errors import UserError

TARGET = "phone-4gb"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tiny_build) -> Path:
    """The shared published folder; read only (tests that change it work on a copy)."""
    res, out, _ = tiny_build
    folder = out / TARGET
    assert (folder / "manifest.json").is_file(), res.stderr[-2000:]
    return folder


@pytest.fixture
def copy(built, tmp_path) -> Path:
    dst = tmp_path / "build" / TARGET
    shutil.copytree(built, dst)  # real copies, never hard links into the shared build
    return dst


def build_manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def package_manifest(out: Path, result: pk.PackageResult) -> dict:
    return json.loads((out / result.model_dir / pk.PACKAGE_MANIFEST).read_text())


EXPECTED_DIR = {"android": "app/src/main/assets/{name}", "ios": "{name}.bundle", "web": "models/{name}"}


@pytest.mark.parametrize("app", ["android", "ios", "web"])
def test_each_app_gets_its_layout_with_hashes_template_and_context(built, tmp_path, app):
    out = tmp_path / "pkg"
    result = pk.package_app(built, app, out=out)
    name = f"{TARGET}-q4_0"
    assert result.model_dir == EXPECTED_DIR[app].format(name=name)
    mdir = out / result.model_dir
    pkg = package_manifest(out, result)

    assert (pkg["app"], pkg["target"], pkg["format"], pkg["runtime"]) == (app, TARGET, "gguf-q4_0", "llamacpp")
    artifact = next(a for a in build_manifest(built)["artifacts"] if a["format"] == "gguf-q4_0")
    assert pkg["context"] == artifact["context"] > 0
    assert "<|im_start|>" in pkg["chat_template"]  # the GGUF's tokenizer.chat_template
    assert [f["path"] for f in pkg["files"]] == ["model-q4_0.gguf"]
    for f in pkg["files"]:
        copied = mdir / f["path"]
        assert copied.stat().st_size == f["bytes"] and sha256(copied) == f["sha256"] == artifact["sha256"]
        assert copied.stat().st_nlink == 1  # a copy an app project may edit, not a link into the build
    assert sorted(p.name for p in mdir.iterdir()) == sorted(["model-q4_0.gguf", pk.PACKAGE_MANIFEST])
    assert pkg["total_bytes"] == artifact["bytes"]
    check = pkg["size_check"]
    assert check["over"] is False and check["verdict"] == "fits" and check["limit_bytes"] == pk.PLATFORMS[app].limit.bytes
    assert check["limit_source"].startswith("https://")
    readme = (out / "README.md").read_text()
    assert {"android": "context.assets.open", "ios": "Bundle.main.url", "web": "wllama.loadModel"}[app] in readme
    assert not list(tmp_path.glob(".pkg*"))  # no staging folder left beside it


def test_cli_packages_onnx_for_ios_beside_the_build(copy):
    res = cli("package", copy, "--app", "ios", "--format", "onnx-int4")
    assert res.returncode == 0, res.stderr
    out = copy.parent / f"package-{TARGET}-ios"
    assert str(out) in res.stdout.replace("\n", "") and "fits" in res.stdout
    bundle = out / f"{TARGET}-int4.bundle"
    pkg = json.loads((bundle / pk.PACKAGE_MANIFEST).read_text())
    assert pkg["runtime"] == "ort" and "tokenizer.json" in pkg["tokenizer"]
    assert pkg["chat_template"] == (copy / "student" / "chat_template.jinja").read_text()
    listed = {f["path"] for f in pkg["files"]}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= listed
    assert all(sha256(bundle / f["path"]) == f["sha256"] for f in pkg["files"])
    assert "bundle.bundlePath" in (out / "README.md").read_text()  # onnxruntime-genai opens the folder


def _refused(res, out: Path, *names: str) -> None:
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for name in names:
        assert name in lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no staging left


def test_cli_refuses_a_build_whose_gguf_was_changed(copy):
    gguf = copy / "model-q4_0.gguf"
    data = bytearray(gguf.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the sha256 can tell
    gguf.write_bytes(bytes(data))
    _refused(cli("package", copy, "--app", "android"), copy.parent / f"package-{TARGET}-android", "model-q4_0.gguf")


def test_cli_refuses_a_build_with_an_unlisted_file(copy, tmp_path):
    (copy / "onnx-int4" / "extra.onnx").write_bytes(b"not from the build")
    _refused(cli("package", copy, "--app", "web", "--out", tmp_path / "web"), tmp_path / "web", "onnx-int4/extra.onnx")


def test_over_the_base_module_limit_android_writes_an_asset_pack(built, tmp_path):
    out = tmp_path / "pkg"
    result = pk.package_app(built, "android", out=out, limit_bytes=1000)
    pack = pk.pack_name(f"{TARGET}-q4_0")
    assert result.layout == "install-time-asset-pack" and result.check.over
    assert result.model_dir == f"{pack}/src/main/assets/{TARGET}-q4_0"
    assert (out / result.model_dir / "model-q4_0.gguf").is_file() and not (out / "app").exists()
    gradle = (out / pack / "build.gradle.kts").read_text()
    assert 'id("com.android.asset-pack")' in gradle and f'packName.set("{pack}")' in gradle
    assert 'deliveryType.set("install-time")' in gradle
    pkg = package_manifest(out, result)
    assert pkg["layout"] == "install-time-asset-pack" and pkg["size_check"]["over"] is True
    assert f'include(":{pack}")' in pkg["size_check"]["advice"]
    assert f'include(":{pack}")' in (out / "README.md").read_text()


def test_cli_over_the_cellular_limit_ios_says_on_demand_resources(built, tmp_path):
    out = tmp_path / "ios"
    res = cli("package", built, "--app", "ios", "--out", out, "--limit-mb", "0.5")
    assert res.returncode == 0, res.stderr  # advice, not an error
    assert "over the limit" in res.stdout and "On-Demand Resources" in res.stdout
    readme = (out / "README.md").read_text()
    assert "NSBundleResourceRequest" in readme and "Background Assets" in readme
    pkg = json.loads((out / f"{TARGET}-q4_0.bundle" / pk.PACKAGE_MANIFEST).read_text())
    assert pkg["layout"] == "bundle-resources-on-demand" and pkg["size_check"]["limit_bytes"] == 500_000


def test_web_split_parts_join_back_to_the_artifact(built, tmp_path):
    size = (built / "model-q4_0.gguf").stat().st_size
    limit = size // 3 + 1
    out = tmp_path / "web"
    result = pk.package_app(built, "web", out=out, limit_bytes=limit)
    assert result.layout == "static-split"
    mdir = out / result.model_dir
    (entry,) = package_manifest(out, result)["files"]
    assert entry["path"] == "model-q4_0.gguf" and not (mdir / "model-q4_0.gguf").exists()
    parts = entry["parts"]
    assert len(parts) == 3 and all(p["bytes"] <= limit for p in parts)
    assert [p["offset"] for p in parts] == [0, parts[0]["bytes"], parts[0]["bytes"] + parts[1]["bytes"]]
    joined = b"".join((mdir / p["path"]).read_bytes() for p in parts)
    assert all(sha256(mdir / p["path"]) == p["sha256"] for p in parts)
    assert hashlib.sha256(joined).hexdigest() == entry["sha256"] == sha256(built / "model-q4_0.gguf")
    assert len(joined) == entry["bytes"] == size
    assert "new Blob(parts)" in (out / "README.md").read_text()


def test_split_ranges_cover_every_byte_once():
    assert pk.split_ranges(10, 4) == [(0, 4), (4, 4), (8, 2)]
    assert pk.split_ranges(8, 4) == [(0, 4), (4, 4)]
    assert pk.split_ranges(3, 10) == [(0, 3)]


def test_over_the_ceiling_says_what_to_do_instead(built, tmp_path, monkeypatch):
    web = pk.PLATFORMS["web"]
    monkeypatch.setitem(pk.PLATFORMS, "web", dataclasses.replace(web, ceiling=dataclasses.replace(web.ceiling, bytes=2000)))
    result = pk.package_app(built, "web", out=tmp_path / "web", limit_bytes=1_000_000)
    assert result.check.over_ceiling and result.check.verdict == "over the ceiling"
    assert "llama-gguf-split" in result.advice
    assert (tmp_path / "web" / result.model_dir / pk.PACKAGE_MANIFEST).is_file()  # still written


def test_repackaging_replaces_the_earlier_package(built, tmp_path):
    out = tmp_path / "pkg"
    first = pk.package_app(built, "android", out=out)
    second = pk.package_app(built, "android", fmt="gguf-q8_0", out=out)
    assert not (out / first.model_dir).exists() and (out / second.model_dir / "model-q8_0.gguf").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]  # no .old or .partial left


def test_bad_inputs_are_refused_with_what_is_available(built, copy, tmp_path):
    with pytest.raises(UserError, match="android, ios, web"):
        pk.package_app(built, "windows", out=tmp_path / "x")
    with pytest.raises(UserError, match="gguf-q4_0.*onnx-int8|onnx-int8.*gguf-q4_0"):
        pk.package_app(built, "web", fmt="gguf-q5_k", out=tmp_path / "x")
    with pytest.raises(UserError, match="inside the build folder"):
        pk.package_app(built, "web", out=built / "pkg")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an edgedistill package"):
        pk.package_app(built, "web", out=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="--name"):
        pk.package_app(built, "web", out=tmp_path / "x", name="../escape")

    # a build without onnx-int8: the format exists, this build did not produce it
    manifest = build_manifest(copy)
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["format"] != "onnx-int8"]
    manifest["files"] = [f for f in manifest["files"] if not f["path"].startswith("onnx-int8/")]
    shutil.rmtree(copy / "onnx-int8")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="did not produce onnx-int8; it has: gguf-q4_0"):
        pk.package_app(copy, "android", fmt="onnx-int8", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()
