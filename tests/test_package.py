"""`edgedistill package`: app layouts, the package manifest, refusal of a tampered build, size limits, web split."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import cli
from typer.testing import CliRunner

from edgedistill import package as pk
from edgedistill.cli import app as cli_app
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


def package_manifest(out: Path, pkg: dict) -> dict:
    """The package manifest as written, which must be what package_app returned."""
    written = json.loads((out / pkg["model_dir"] / pk.PACKAGE_MANIFEST).read_text())
    assert written == json.loads(json.dumps(pkg))
    return written


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry under folder with its bytes (None for a folder): to show a folder was left as it was."""
    return {p.relative_to(folder).as_posix(): None if p.is_dir() else p.read_bytes() for p in folder.rglob("*")}


EXPECTED_DIR = {"android": "app/src/main/assets/{name}", "ios": "{name}.bundle", "web": "models/{name}"}


@pytest.mark.parametrize("app", ["android", "ios", "web"])
def test_each_app_gets_its_layout_with_hashes_template_and_context(built, tmp_path, app):
    out = tmp_path / "pkg"
    where, pkg = pk.package_app(built, app, out=out)
    name = f"{TARGET}-q4_0"
    assert where == out and pkg["model_dir"] == EXPECTED_DIR[app].format(name=name) and pkg["name"] == name
    mdir = out / pkg["model_dir"]
    pkg = package_manifest(out, pkg)

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
    # the root marker names the package manifest: what lets a later run replace this folder
    assert (out / pk.MARKER).read_text().strip() == f"{pkg['model_dir']}/{pk.PACKAGE_MANIFEST}"
    assert sorted(p.name for p in out.iterdir()) == sorted([pk.MARKER, "README.md", pkg["model_dir"].split("/")[0]])


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
    _, pkg = pk.package_app(built, "android", out=out, limit_bytes=1000)
    pack = pk.pack_name(f"{TARGET}-q4_0")
    assert pkg["layout"] == "install-time-asset-pack" and pkg["size_check"]["over"]
    assert pkg["model_dir"] == f"{pack}/src/main/assets/{TARGET}-q4_0"
    assert (out / pkg["model_dir"] / "model-q4_0.gguf").is_file() and not (out / "app").exists()
    gradle = (out / pack / "build.gradle.kts").read_text()
    assert 'id("com.android.asset-pack")' in gradle and f'packName.set("{pack}")' in gradle
    assert 'deliveryType.set("install-time")' in gradle
    pkg = package_manifest(out, pkg)
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
    _, pkg = pk.package_app(built, "web", out=out, limit_bytes=limit)
    assert pkg["layout"] == "static-split"
    mdir = out / pkg["model_dir"]
    (entry,) = package_manifest(out, pkg)["files"]
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


def test_over_the_ceiling_says_what_to_do_instead_and_exits_1(built, tmp_path, monkeypatch):
    web = pk.PLATFORMS["web"]
    monkeypatch.setitem(pk.PLATFORMS, "web", dataclasses.replace(web, ceiling=dataclasses.replace(web.ceiling, bytes=2000)))
    # in-process, so the lowered ceiling applies; over the ceiling the package cannot ship: exit 1
    res = CliRunner().invoke(cli_app, ["package", str(built), "--app", "web", "--out", str(tmp_path / "web"),
                                       "--limit-mb", "1"])
    assert res.exit_code == 1, res.output
    assert "over the ceiling" in res.output and "llama-gguf-split" in res.output
    pkg = json.loads(next((tmp_path / "web").glob(f"models/*/{pk.PACKAGE_MANIFEST}")).read_text())  # still written
    check = pkg["size_check"]
    assert check["over_ceiling"] is True and check["verdict"] == "over the ceiling"
    assert "llama-gguf-split" in check["advice"]


def test_repackaging_replaces_the_earlier_package(built, tmp_path):
    out = tmp_path / "pkg"
    _, first = pk.package_app(built, "android", out=out)
    _, second = pk.package_app(built, "android", fmt="gguf-q8_0", out=out)
    assert not (out / first["model_dir"]).exists() and (out / second["model_dir"] / "model-q8_0.gguf").is_file()
    _, third = pk.package_app(built, "web", fmt="onnx-int4", out=out)  # another app's layout replaces it too
    assert sorted(p.name for p in out.iterdir()) == [pk.MARKER, "README.md", "models"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]  # no .old or .partial left
    (tmp_path / "empty").mkdir()
    pk.package_app(built, "ios", out=tmp_path / "empty")  # an empty folder is used as it is
    assert (tmp_path / "empty" / pk.MARKER).is_file()


def test_bad_inputs_are_refused_with_what_is_available(built, copy, tmp_path):
    with pytest.raises(UserError, match="android, ios, web"):
        pk.package_app(built, "windows", out=tmp_path / "x")
    with pytest.raises(UserError, match="gguf-q4_0.*onnx-int8|onnx-int8.*gguf-q4_0"):
        pk.package_app(built, "web", fmt="gguf-q5_k", out=tmp_path / "x")
    with pytest.raises(UserError, match="inside the build folder"):
        pk.package_app(built, "web", out=built / "pkg")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an edgedistill package.*choose an empty or new folder"):
        pk.package_app(built, "web", out=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="not a folder"):
        pk.package_app(built, "web", out=tmp_path / "mine" / "notes.txt")
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


def _refused_in_place(res, *names: str) -> str:
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def test_an_android_project_holding_a_copied_package_is_never_replaced(built, tmp_path):
    pkg_dir = tmp_path / "pkg"
    pk.package_app(built, "android", out=pkg_dir)
    # as the package README says: app/ copied over the user's project
    project = tmp_path / "MyApp"
    (project / "app" / "src" / "main" / "java").mkdir(parents=True)
    (project / "app" / "src" / "main" / "java" / "Main.kt").write_text("fun main() {}\n")
    (project / "settings.gradle.kts").write_text('include(":app")\n')
    shutil.copytree(pkg_dir / "app", project / "app", dirs_exist_ok=True)
    before = tree(project)
    line = _refused_in_place(cli("package", built, "--app", "android", "--out", project),
                             "not an edgedistill package", "choose an empty or new folder")
    assert pk.MARKER in line
    assert tree(project) == before
    # the whole package copied in, marker and all: the project's own files still keep it
    shutil.copytree(pkg_dir, project, dirs_exist_ok=True)
    before = tree(project)
    _refused_in_place(cli("package", built, "--app", "android", "--out", project), "settings.gradle.kts")
    assert tree(project) == before
    # the package folder itself used as the project: a file added under app/ keeps it too
    (pkg_dir / "app" / "src" / "main" / "java").mkdir()
    (pkg_dir / "app" / "src" / "main" / "java" / "Main.kt").write_text("fun main() {}\n")
    before = tree(pkg_dir)
    with pytest.raises(UserError, match="app/src/main/java is not from a package"):
        pk.package_app(built, "android", out=pkg_dir)
    assert tree(pkg_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MyApp", "pkg"]


def _rewrite_manifest(folder: Path, change) -> None:
    manifest = build_manifest(folder)
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))  # manifest.json itself is not hashed


def test_a_crafted_manifest_path_writes_nothing_outside_the_package(copy, tmp_path):
    """`onnx-int8//abs/path` once lost its prefix and became /abs/path: the copy went there."""
    escaped = tmp_path / "ESCAPED.txt"
    crafted = f"onnx-int8/{escaped}"  # onnx-int8//tmp/.../ESCAPED.txt
    inside = copy / "onnx-int8" / str(escaped).lstrip("/")
    inside.parent.mkdir(parents=True)
    inside.write_text("from the build")
    entry = {"bytes": inside.stat().st_size, "sha256": sha256(inside)}
    plain = inside.relative_to(copy).as_posix()
    # listed both ways, so the file checks pass: only the path handling is left to stop it
    _rewrite_manifest(copy, lambda m: m["files"].extend([{"path": crafted, **entry}, {"path": plain, **entry}]))
    out = tmp_path / "pkg"
    res = cli("package", copy, "--app", "web", "--format", "onnx-int8", "--out", out)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert not escaped.exists() and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"]


def test_a_build_file_linked_to_outside_the_build_is_not_read(copy, tmp_path):
    outside = tmp_path / "outside.json"
    tokenizer = copy / "onnx-int4" / "tokenizer.json"
    shutil.copyfile(tokenizer, outside)  # same bytes, so its hash still matches
    tokenizer.unlink()
    tokenizer.symlink_to(outside)
    with pytest.raises(UserError):
        pk.package_app(copy, "web", fmt="onnx-int4", out=tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()


def test_an_artifact_that_failed_parity_is_not_packaged(copy, tmp_path):
    def fail(manifest):
        next(a for a in manifest["artifacts"] if a["format"] == "gguf-q4_0")["parity"]["ok"] = False
    _rewrite_manifest(copy, fail)
    out = tmp_path / "pkg"
    _refused(cli("package", copy, "--app", "android", "--out", out), out, "gguf-q4_0", "parity",
             "does not compute what the student was trained to", f"edgedistill verify {copy}")
    pk.package_app(copy, "android", fmt="gguf-q8_0", out=out)  # the others still package


def test_a_target_name_that_cannot_name_a_folder_blames_the_manifest(copy, tmp_path):
    _rewrite_manifest(copy, lambda m: m.update(target="my phone"))  # a path part, but no folder or Gradle name
    with pytest.raises(UserError, match="manifest.json names the target 'my phone'") as e:
        pk.package_app(copy, "web")
    assert "--name '" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"]
    out, pkg = pk.package_app(copy, "web", out=tmp_path / "pkg", name="mine")  # no default needed: fine
    assert pkg["model_dir"] == "models/mine" and out == tmp_path / "pkg"


@pytest.mark.parametrize("limit", ["nan", "inf", "0", "-1"])
def test_cli_refuses_a_limit_that_is_not_a_positive_finite_number(built, tmp_path, limit):
    out = tmp_path / "pkg"
    _refused(cli("package", built, "--app", "web", "--out", out, "--limit-mb", limit), out,
             "--limit-mb", "positive finite number")


def test_cli_refuses_an_out_where_no_folder_can_be_made(built):
    line = _refused_in_place(cli("package", built, "--app", "web", "--out", "/proc/self/pkg"), "--out /proc/self/pkg")
    assert "choose another folder" in line
