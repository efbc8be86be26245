"""`edgedistill package OUT/T --app android|ios|web`: one artifact of a verified build, laid out for an app.

The package is a folder to copy into an app project or onto a static host:
- android: `app/src/main/assets/<name>/` (base module), or over Google Play's base-module limit an
  install-time asset pack module `<pack>/` (`build.gradle.kts` + `src/main/assets/<name>/`);
- ios: `<name>.bundle/`, a resource folder to add to the Xcode target (On-Demand Resources notes
  when over the App Store's cellular download limit);
- web: `models/<name>/` for a page to fetch, files over the per-file limit split into byte ranges.

Beside the model files lies `edgedistill-package.json` (format, runtime, context, chat template,
every file with its size and sha256, the size limit checked and the verdict); `README.md` at the
package root says how to load the files on that platform, and `.edgedistill-package` there marks the
folder as one a later run may replace (no other folder is). A size over a limit is advice, not an
error: the package is written in the platform's fallback layout and the verdict says what to do;
over the platform's ceiling the CLI exits 1. An artifact that failed the build's parity gate is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from edgedistill import atomic
from edgedistill.errors import UserError
from edgedistill.export.manifest import MANIFEST, require_verified
from edgedistill.formats import FORMATS

PACKAGE_MANIFEST = "edgedistill-package.json"
# at the package root, naming PACKAGE_MANIFEST: what lets a later run replace the folder (_not_a_package)
MARKER = ".edgedistill-package"
ASSET_PACK_FILE = "build.gradle.kts"
PACKAGE_VERSION = 1
README = "README.md"

# Store limits are stated in decimal units; reading them as 10^6 / 10^9 bytes errs on the small side.
MB = 1000 ** 2
GB = 1000 ** 3

# --- platform limits, each with its source ---------------------------------------------------
# Google Play, "Optimize your app's size and stay within Google Play app size limits",
# https://support.google.com/googleplay/android-developer/answer/9859372 : base module 200 MB,
# each asset pack 1.5 GB, all modules + install-time asset packs 4 GB, on-demand/fast-follow 4 GB,
# all of them *compressed download* sizes. Quantized weights barely compress, so the raw file size
# is what we check (a close upper bound of what Play Console will compute).
PLAY_BASE_MODULE_BYTES = 200 * MB
PLAY_ASSET_PACK_BYTES = 1500 * MB
# App Store: apps over 200 MB need Wi-Fi (or the user's consent, iOS 13+) to download over cellular.
# Apple states the limit exists but not its figure ("Reducing your app's size",
# https://developer.apple.com/documentation/xcode/reducing-your-app-s-size); the 200 MB figure is
# from https://simplymac.com/ios/ios-app-size-limits ("Over-the-Air Download Limit ... 200MB").
APP_STORE_CELLULAR_BYTES = 200 * MB
# App Store Connect Help, "Maximum build file sizes",
# https://developer.apple.com/help/app-store-connect/reference/maximum-build-file-sizes :
# iOS 9.0+ maximum uncompressed app size 4 GB. Beyond it the model cannot ship inside the app.
APP_STORE_MAX_APP_BYTES = 4 * GB
# App Store Connect Help, "On-demand resources size limits",
# https://developer.apple.com/help/app-store-connect/reference/on-demand-resources-size-limit :
# each thinned asset pack (one per tag or more) 512 MB before iOS 18, 8 GB from iOS 18.
ODR_ASSET_PACK_BYTES = 512 * MB
# Web: wllama (llama.cpp in WebAssembly), README at https://github.com/ngxson/wllama : "Max file size
# is 2GB, due to size restriction of ArrayBuffer", and its advice to split models into chunks of
# 512 MB (`llama-gguf-split --split-max-size 512M`), which also download in parallel. We split every
# file over 512 MB: parts that size download, resume and cache (Cache API) one by one. A static host
# may cap files lower: Cloudflare Pages at 25 MiB per file (https://developers.cloudflare.com/pages/
# platform/limits/); pass --limit-mb for such a host. The 2 GB stays a ceiling for the joined file:
# wllama's wasm32 builds cannot load a single GGUF larger than that.
WEB_FILE_BYTES = 512 * MB
WLLAMA_MAX_FILE_BYTES = 2 * GB


@dataclass(frozen=True)
class Limit:
    bytes: int
    what: str  # what is limited, in words
    source: str  # where the figure comes from


@dataclass(frozen=True)
class Platform:
    """What an app platform expects: where the model goes, which size it checks, what to do when over."""

    name: str
    measure: str  # "total": the bytes of all model files | "largest": the largest single file
    limit: Limit  # within it, the plain layout
    ceiling: Limit  # over it, the fallback layout cannot ship the model either
    fits: str  # layout names, recorded in the package manifest
    over: str
    advice_fits: str
    advice_over: str
    advice_ceiling: str


PLATFORMS: dict[str, Platform] = {p.name: p for p in (
    Platform(
        "android", "total",
        Limit(PLAY_BASE_MODULE_BYTES, "Google Play's base-module download size",
              "https://support.google.com/googleplay/android-developer/answer/9859372"),
        Limit(PLAY_ASSET_PACK_BYTES, "Google Play's size of one asset pack",
              "https://support.google.com/googleplay/android-developer/answer/9859372"),
        fits="base-module-assets", over="install-time-asset-pack",
        advice_fits="copy app/ into your Android project; the model ships in the base module",
        advice_over="written as the install-time asset pack `{pack}`: copy {pack}/ into your project, "
                    "include(\":{pack}\") in settings.gradle.kts and add assetPacks += listOf(\":{pack}\") "
                    "to app/build.gradle.kts (README.md; set deliveryType to \"on-demand\" to fetch it on first use)",
        advice_ceiling="no single asset pack can hold it: download the model from your own server on first "
                       "run (`--app web` writes hashed parts for that) or package a smaller format",
    ),
    Platform(
        "ios", "total",
        Limit(APP_STORE_CELLULAR_BYTES, "the App Store's cellular (over-the-air) download limit",
              "https://simplymac.com/ios/ios-app-size-limits"),
        Limit(APP_STORE_MAX_APP_BYTES, "the App Store's maximum app size",
              "https://developer.apple.com/help/app-store-connect/reference/maximum-build-file-sizes"),
        fits="bundle-resources", over="bundle-resources-on-demand",
        advice_fits="add {bundle} to your Xcode target (Copy Bundle Resources)",
        advice_over="add {bundle} to your Xcode target and tag its files as On-Demand Resources "
                    "(tag \"{name}\"), or download it with Background Assets, so the app itself stays "
                    "under the cellular limit (README.md)",
        advice_ceiling="it cannot ship inside the app: host it as On-Demand Resources / Background Assets "
                       "or on your own server, or package a smaller format",
    ),
    Platform(
        "web", "largest",
        Limit(WEB_FILE_BYTES, "the web's per-file limit (wllama's advice for model files)",
              "https://github.com/ngxson/wllama"),
        Limit(WLLAMA_MAX_FILE_BYTES, "wllama's 2 GB model-file limit (browser ArrayBuffer)",
              "https://github.com/ngxson/wllama"),
        fits="static", over="static-split",
        advice_fits="serve the folder as static files; the page fetches {model_dir}/",
        advice_over="files over the limit are split into byte-range parts listed in {manifest} with "
                    "their sha256; the page fetches, checks and joins them into one Blob (README.md)",
        advice_ceiling="the joined file is over 2 GB, which wllama's wasm32 builds cannot load: shard it "
                       "with llama.cpp's llama-gguf-split instead, or package a smaller format",
    ),
)}


@dataclass(frozen=True)
class SizeCheck:
    measured: str  # which bytes were compared
    bytes: int
    limit: Limit
    ceiling: Limit

    @property
    def over(self) -> bool:
        return self.bytes > self.limit.bytes

    @property
    def over_ceiling(self) -> bool:
        return self.bytes > self.ceiling.bytes

    @property
    def verdict(self) -> str:
        if self.over_ceiling:
            return "over the ceiling"
        return "over the limit" if self.over else "fits"

    def record(self, advice: str) -> dict:
        return {"measured": self.measured, "bytes": self.bytes,
                "limit_bytes": self.limit.bytes, "limit": self.limit.what, "limit_source": self.limit.source,
                "ceiling_bytes": self.ceiling.bytes, "ceiling": self.ceiling.what,
                "ceiling_source": self.ceiling.source,
                "over": self.over, "over_ceiling": self.over_ceiling, "verdict": self.verdict, "advice": advice}


# --- inputs --------------------------------------------------------------------------------------

def parity_ok(artifact: dict) -> bool:
    """Whether the build's parity gate passed for the artifact (a manifest without `ok` predates it)."""
    return (artifact.get("parity") or {}).get("ok", True) is True


def _pick_artifact(manifest: dict, fmt: str | None) -> dict:
    artifacts = manifest.get("artifacts") or []
    have = [str(a.get("format")) for a in artifacts]
    if not artifacts:
        raise UserError(f"the build's {MANIFEST} lists no artifacts; rebuild the target")
    if fmt is None:
        # llama.cpp runs on Android, iOS and in the browser, so a GGUF is the default everywhere
        gguf = [a for a in artifacts if a.get("runtime") == "llamacpp"]
        artifact = (gguf or artifacts)[0]
    elif fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; this build has: {', '.join(have)}")
    else:
        artifact = next((a for a in artifacts if a.get("format") == fmt), None)
        if artifact is None:
            raise UserError(f"this build did not produce {fmt}; it has: {', '.join(have)}")
    if artifact.get("format") not in FORMATS or artifact.get("runtime") not in _RUNTIME_NOTE:
        raise UserError(f"the build's {MANIFEST} lists an artifact of format {artifact.get('format')!r} and "
                        f"runtime {artifact.get('runtime')!r}, which have no app layout here; rebuild the target")
    return artifact


def _check_parity(folder: Path, manifest: dict, artifact: dict) -> None:
    if parity_ok(artifact):
        return
    passed = [a["format"] for a in manifest["artifacts"] if parity_ok(a) and a is not artifact]
    raise UserError(f"{artifact['format']} failed the build's parity gate: its runtime does not compute what the "
                    f"student was trained to, so it is not packaged. `edgedistill verify {folder}` shows the "
                    f"figures; rebuild the target" + (f", or package --format {passed[0]}" if passed else ""))


def _parts(path) -> tuple[str, ...]:
    """A manifest path's parts: relative, '/'-separated, no empty, '.' or '..' part; else UserError."""
    parts = tuple(path.split("/")) if isinstance(path, str) else ("",)
    if any(p in ("", ".", "..") for p in parts):
        raise UserError(f"the build's {MANIFEST} lists the path {path!r}, which is not a plain relative path; "
                        f"the manifest is damaged: rebuild the target")
    return parts


def _inside(base: Path, rel: str) -> Path:
    """base/rel, refused unless it resolves (symlinks followed) to a path inside base."""
    path = base / rel
    if not path.resolve().is_relative_to(base.resolve()):
        raise UserError(f"{rel!r} leads outside {base} (a link or a crafted path); nothing was packaged. "
                        f"Rebuild the target")
    return path


def _artifact_files(manifest: dict, artifact: dict) -> list[tuple[dict, str]]:
    """The build manifest's entries for the artifact (the file itself, or every file of its folder),
    each with its path relative to the model folder: the file's name, or its path inside the folder."""
    own = _parts(artifact["file"])
    out = []
    for entry in manifest["files"]:
        parts = _parts(entry["path"])
        if parts == own:
            out.append((entry, own[-1]))
        elif parts[:len(own)] == own:
            out.append((entry, "/".join(parts[len(own):])))
    if not out:
        raise UserError(f"{MANIFEST} lists no files for {artifact['file']}; rebuild the target")
    return out


def _gguf_string(path: Path, key: str) -> str | None:
    import gguf

    field = gguf.GGUFReader(path).fields.get(key)
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _template_in(folder: Path) -> str | None:
    """A HF folder's chat template: chat_template.jinja (newer transformers) or tokenizer_config.json."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        template = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def chat_template(folder: Path, manifest: dict, artifact: dict) -> str | None:
    """The template the app should format chats with: the artifact's own first, then the student's."""
    path = _inside(folder, "/".join(_parts(artifact["file"])))
    own = _gguf_string(path, "tokenizer.chat_template") if path.is_file() else _template_in(path)
    student = manifest.get("student")
    return own or (_template_in(_inside(folder, "/".join(_parts(student)))) if student else None)


def _tokenizer(artifact: dict, rels: list[str]) -> str | list[str]:
    if artifact["runtime"] == "llamacpp":
        return f"inside {artifact['file']} (tokenizer.ggml.*)"
    return [rel for rel in rels if "tokenizer" in rel.rsplit("/", 1)[-1]]


# --- names and places ----------------------------------------------------------------------------

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_NAME_RULE = "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise UserError(f"--name {name!r}: {_NAME_RULE}")
    return name


def _check_target(target) -> str:
    """The build's target name, which names the default package folder and model name."""
    if not isinstance(target, str) or not _NAME.match(target):
        raise UserError(f"the build's {MANIFEST} names the target {target!r}, which cannot name a package folder "
                        f"({_NAME_RULE}); pass --out and --name, or rebuild the target")
    return target


def pack_name(name: str) -> str:
    """An asset-pack module name: Gradle and Play accept letters, digits and underscores, starting with a letter."""
    pack = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return pack if pack[0].isalpha() else f"model_{pack}"


def default_out(folder: Path, target: str, app: str) -> Path:
    # beside the build folder, never inside it: a file added there would fail its manifest
    return Path(folder).parent / f"package-{target}-{app}"


def _check_out(out: Path, folder: Path) -> None:
    out_r, folder_r = out.resolve(), folder.resolve()
    if out_r == folder_r or folder_r in out_r.parents:
        raise UserError(f"--out {out} is inside the build folder {folder}, which would then no longer match its "
                        f"{MANIFEST}; choose a folder outside it")
    if out_r in folder_r.parents:
        raise UserError(f"--out {out} contains the build folder {folder}; choose another folder")
    if out.is_symlink() or out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a link or a file, not a folder; choose an empty or new folder")
    if out.exists():
        stranger = _not_a_package(out)
        if stranger:
            raise UserError(f"--out {out} exists and is not an edgedistill package ({stranger}), so it is not "
                            f"replaced; choose an empty or new folder")


def _not_a_package(out: Path) -> str | None:
    """None if `out` is empty or holds an earlier package and nothing else, which may be replaced;
    otherwise what is there that a package does not write.

    A package's root has MARKER, naming its package manifest; the files a package writes are that
    manifest, the files it lists, README.md and the asset pack's build.gradle.kts. The package's
    `app/` copied into an Android project carries the manifest but not the marker, and whatever
    else the folder holds (the project's code) is found before anything is removed.
    """
    top = sorted(p.name for p in out.iterdir())
    if not top:
        return None
    if MARKER not in top:
        return f"no {MARKER} at its root"
    try:
        rel = (out / MARKER).read_text(encoding="utf-8").strip()
        _parts(rel)
        pkg = json.loads(_inside(out, rel).read_text(encoding="utf-8"))
        mdir = rel.rpartition("/")[0]
        ours = {MARKER, README, rel} | {f"{mdir}/{p['path']}" for f in pkg["files"] for p in f.get("parts", [f])}
        if pkg.get("layout") == PLATFORMS["android"].over:
            ours.add(f"{rel.split('/')[0]}/{ASSET_PACK_FILE}")
    except (OSError, ValueError, UserError, KeyError, TypeError, AttributeError):
        return f"its {MARKER} does not name a readable package manifest"
    dirs = {"/".join(f.split("/")[:i]) for f in ours for i in range(1, f.count("/") + 1)}
    # top-down, each folder checked before it is entered: a folder of the user's is never walked
    for root, subdirs, files in os.walk(out):
        for entry in subdirs + files:
            path = Path(root) / entry
            rel_entry = path.relative_to(out).as_posix()
            if path.is_symlink() or rel_entry not in (dirs if entry in subdirs else ours):
                return f"{rel_entry} is not from a package"
    return None


def model_dir(app: str, layout: str, name: str) -> str:
    if app == "android":
        return (f"{pack_name(name)}/src/main/assets/{name}" if layout == PLATFORMS["android"].over
                else f"app/src/main/assets/{name}")
    if app == "ios":
        return f"{name}.bundle"
    return f"models/{name}"


# --- copying -------------------------------------------------------------------------------------

def copy_range(src: Path, dst: Path, start: int = 0, length: int | None = None, also=None) -> tuple[str, int]:
    """Copy `length` bytes of src from `start` (all by default) to a new file: its sha256 and size.

    `also`, a hashlib object, is fed the same bytes: the whole file's hash while its parts are written.
    """
    h, done, chunk = hashlib.sha256(), 0, 1 << 20
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        fin.seek(start)
        while length is None or done < length:
            block = fin.read(chunk if length is None else min(chunk, length - done))
            if not block:
                break
            h.update(block)
            if also is not None:
                also.update(block)
            fout.write(block)
            done += len(block)
    return h.hexdigest(), done


def split_ranges(size: int, part_bytes: int) -> list[tuple[int, int]]:
    """(offset, length) of consecutive parts of at most part_bytes covering `size` bytes."""
    part_bytes = max(1, part_bytes)
    return [(off, min(part_bytes, size - off)) for off in range(0, size, part_bytes)]


def _copy_entry(folder: Path, entry: dict, rel: str, staging: Path, mdir: str, split_over: int | None) -> dict:
    """Copy one build file into staging/mdir/rel (or its parts); the package manifest's entry for it.

    The whole file's hash must still be the build manifest's: it was verified moments ago, so a
    difference means the file changed while we copied it. Every path is checked to resolve inside
    the build folder (source) and the staging folder (copy), whatever the manifest says.
    """
    src = _inside(folder, entry["path"])
    target = _inside(staging, f"{mdir}/{rel}")
    target.parent.mkdir(parents=True, exist_ok=True)
    if split_over is None or entry["bytes"] <= split_over:
        sha, size = copy_range(src, target)
        _same(entry, sha, size)
        return {"path": rel, "bytes": size, "sha256": sha}
    parts, whole = [], hashlib.sha256()
    ranges = split_ranges(entry["bytes"], split_over)
    for i, (offset, length) in enumerate(ranges, 1):
        part_rel = f"{rel}.part-{i:03d}-of-{len(ranges):03d}"  # not gguf-split's -00001-of-00003.gguf
        sha, size = copy_range(src, _inside(staging, f"{mdir}/{part_rel}"), offset, length, also=whole)
        parts.append({"path": part_rel, "offset": offset, "bytes": size, "sha256": sha})
    total = sum(p["bytes"] for p in parts)
    _same(entry, whole.hexdigest(), total)
    return {"path": rel, "bytes": total, "sha256": whole.hexdigest(), "parts": parts}


def _same(entry: dict, sha: str, size: int) -> None:
    if sha != entry["sha256"] or size != entry["bytes"]:
        raise UserError(f"{entry['path']} changed while it was being packaged; run the command again")


# --- the package ---------------------------------------------------------------------------------

def size_check(platform: Platform, files: list[dict], limit_bytes: int | None = None) -> SizeCheck:
    if platform.measure == "largest":
        measured, size = "largest model file", max(e["bytes"] for e in files)
    else:
        measured, size = "all model files", sum(e["bytes"] for e in files)
    limit = platform.limit
    if limit_bytes is not None:
        limit = replace(limit, bytes=int(limit_bytes), what="the limit given with --limit-mb", source="--limit-mb")
    return SizeCheck(measured, size, limit, platform.ceiling)


def _advice(platform: Platform, check: SizeCheck, **names) -> str:
    """What to do with the package, in one line; the figures are in the size check beside it."""
    text = (platform.advice_ceiling if check.over_ceiling else platform.advice_over if check.over
            else platform.advice_fits)
    return text.format(**names)


def limit_bytes_of(limit_mb: float | None) -> int | None:
    """--limit-mb in bytes; a UserError unless it is a positive finite number."""
    if limit_mb is None:
        return None
    if not math.isfinite(limit_mb) or limit_mb <= 0:
        raise UserError(f"--limit-mb {limit_mb}: must be a positive finite number of MB")
    return max(1, round(limit_mb * MB))


def package_app(folder: Path, app: str, fmt: str | None = None, out: Path | None = None, name: str | None = None,
                limit_bytes: int | None = None) -> tuple[Path, dict]:
    """Write the app package for one artifact of the verified build folder `folder`; see the module doc.

    Returns the package folder and its package manifest (what edgedistill-package.json holds).
    """
    folder = Path(folder)
    if app not in PLATFORMS:
        raise UserError(f"unknown app {app!r}; choose one of: {', '.join(PLATFORMS)}")
    if limit_bytes is not None and limit_bytes <= 0:
        raise UserError("--limit-mb must be a positive finite number of MB")
    manifest = require_verified(folder)  # first: a tampered build folder is refused before anything is written
    platform = PLATFORMS[app]
    artifact = _pick_artifact(manifest, fmt)
    _check_parity(folder, manifest, artifact)
    target = manifest.get("target") or folder.name
    if name is None or out is None:  # the target names the defaults: blame the manifest, not --name
        _check_target(target)
    name = _check_name(name or f"{target}-{artifact['format'].split('-', 1)[1]}")
    out = Path(os.path.abspath(out or default_out(folder, target, app)))
    _check_out(out, folder)

    entries = _artifact_files(manifest, artifact)
    check = size_check(platform, [e for e, _ in entries], limit_bytes)
    layout = platform.over if check.over else platform.fits
    mdir = model_dir(app, layout, name)
    names = {"pack": pack_name(name), "bundle": f"{name}.bundle", "name": name, "model_dir": mdir,
             "manifest": PACKAGE_MANIFEST}
    advice = _advice(platform, check, **names)

    staging = out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    try:
        staging.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"cannot write the package at --out {out}: {e.strerror or e}; choose another folder") from None
    try:
        # only the web splits: an app store takes one big file, a browser and a static host may not
        split_over = check.limit.bytes if app == "web" and check.over else None
        files = [_copy_entry(folder, e, rel, staging, mdir, split_over) for e, rel in entries]
        pkg = {
            "package_version": PACKAGE_VERSION, "app": app, "target": target, "name": name,
            "teacher": manifest.get("teacher"), "config_hash": manifest.get("config_hash"),
            "edgedistill_version": manifest.get("edgedistill_version"),
            "format": artifact["format"], "runtime": artifact["runtime"],
            "artifact": artifact["file"], "context": artifact.get("context"),
            "chat_template": chat_template(folder, manifest, artifact),
            "tokenizer": _tokenizer(artifact, [rel for _, rel in entries]),
            "layout": layout, "model_dir": mdir,
            "files": files, "total_bytes": sum(f["bytes"] for f in files),
            "size_check": check.record(advice),
        }
        atomic.write_json(staging / mdir / PACKAGE_MANIFEST, pkg)
        atomic.write_text(staging / MARKER, f"{mdir}/{PACKAGE_MANIFEST}\n")
        _write_extras(staging, app, layout, pkg, names)
        try:
            atomic.replace_dir(staging, out)
        except OSError as e:
            raise UserError(f"cannot put the package at --out {out}: {e.strerror or e}; choose another "
                            f"folder") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out, pkg


def _write_extras(root: Path, app: str, layout: str, pkg: dict, names: dict) -> None:
    if layout == "install-time-asset-pack":
        atomic.write_text(root / names["pack"] / ASSET_PACK_FILE, ASSET_PACK_GRADLE.format(**names))
    atomic.write_text(root / README, readme(app, layout, pkg, names))


# --- the README snippet per platform -------------------------------------------------------------

ASSET_PACK_GRADLE = """\
// Play Asset Delivery pack written by `edgedistill package`: the model is over the base module's
// size limit. "install-time" ships it with the app; "on-demand" keeps the install small and the
// app fetches it with AssetPackManager before first use (see README.md).
plugins {{
    id("com.android.asset-pack")
}}

assetPack {{
    packName.set("{pack}")
    dynamicDelivery {{
        deliveryType.set("install-time")
    }}
}}
"""

_RUNTIME_NOTE = {
    "llamacpp": "Load it with llama.cpp (`llama_model_load_from_file`); the tokenizer and chat template are "
                "inside the GGUF.",
    "ort": "Load the folder with onnxruntime-genai (`Model(path)`, `Tokenizer(model)`); format chats with the "
           "`chat_template` in `{manifest}`.",
}
# onnxruntime-genai has no browser build: on the web an ONNX artifact runs in onnxruntime-web, and
# the page writes the token loop itself
_WEB_RUNTIME_NOTE = {
    "llamacpp": "Load it with wllama (llama.cpp in WebAssembly); the tokenizer and chat template are inside "
                "the GGUF.",
    "ort": "onnxruntime-genai has no browser build: load `model.onnx` with onnxruntime-web (check that your "
           "build runs the MatMulNBits operator) and run the generation loop in the page, with `genai_config.json` "
           "for the inputs and KV cache and `tokenizer.json` for a tokenizer such as transformers.js.",
}
_WEB_LOAD = {
    "llamacpp": 'await wllama.loadModel([await blobOf("{first}")], {{ n_ctx: pkg.context }});',
    "ort": 'const bytes = async (p) => new Uint8Array(await (await blobOf(p)).arrayBuffer());\n'
           'const session = await ort.InferenceSession.create(await bytes("{first}"), {{\n'
           '  externalData: [{{ path: "{first}.data", data: await bytes("{first}.data") }}] }});',
}

_SNIPPETS = {
    "base-module-assets": """\
Copy `app/` over your Android project. Assets are not files, and the runtime opens a path, so
copy them out once:

```kotlin
val dir = File(context.filesDir, "{name}").apply {{ mkdirs() }}
for (f in context.assets.list("{name}")!!) File(dir, f).takeIf {{ !it.exists() }}?.let {{ out ->
    context.assets.open("{name}/$f").use {{ it.copyTo(out.outputStream()) }}
}}
val modelPath = {kt_model}
```

Large model files copy faster stored uncompressed: `androidResources {{ noCompress += "{ext}" }}` in
`app/build.gradle.kts`.
""",
    "install-time-asset-pack": """\
The model is over {limit}, so it is an asset pack module, `{pack}/`. Copy it into your
project, then:

```kotlin
// settings.gradle.kts
include(":{pack}")
// app/build.gradle.kts
android {{ assetPacks += listOf(":{pack}") }}
```

An install-time pack is read like the app's own assets: copy `context.assets.open("{name}/{first}")`
(and the other files) to `context.filesDir` once and load from there. For an on-demand pack (change
`deliveryType` in `{pack}/build.gradle.kts`), fetch it and load it in place:

```kotlin
val manager = AssetPackManagerFactory.getInstance(context)
manager.fetch(listOf("{pack}"))  // wait for AssetPackStatus.COMPLETED with registerListener
val dir = manager.getPackLocation("{pack}")!!.assetsPath() + "/{name}"
val modelPath = {kt_model}
```
""",
    "bundle-resources": """\
Drag `{bundle}` into your Xcode project (a folder reference, in Copy Bundle Resources), then:

```swift
let bundle = Bundle(url: Bundle.main.url(forResource: "{name}", withExtension: "bundle")!)!
let modelPath = {swift_model}
```
""",
    "bundle-resources-on-demand": """\
Drag `{bundle}` into your Xcode project (a folder reference). The model is over {limit}:
tag the bundle as On-Demand Resources (tag `{name}`) so the app
installs over cellular and the model follows when asked for, or move it to Background Assets,
which Apple now recommends over On-Demand Resources. Before iOS 18 one ODR asset pack holds at
most {odr_pack} (8 GB from iOS 18).

```swift
let request = NSBundleResourceRequest(tags: ["{name}"])
try await request.beginAccessingResources()  // keep `request` alive while the model is in use
let bundle = Bundle(url: request.bundle.url(forResource: "{name}", withExtension: "bundle")!)!
let modelPath = {swift_model}
```
""",
    "static": """\
Serve this folder as static files.{split_note} The page fetches each file, checks its sha256 and
loads it:

```js
const base = "{model_dir}/";
const pkg = await (await fetch(base + "{manifest}")).json();
async function blobOf(path) {{  // one file of the package as one Blob; a split file's parts joined
  const entry = pkg.files.find((f) => f.path === path);
  const parts = await Promise.all((entry.parts || [entry]).map(async (p) => {{
    const buf = await (await fetch(base + p.path)).arrayBuffer();
    const hex = [...new Uint8Array(await crypto.subtle.digest("SHA-256", buf))]
      .map((b) => b.toString(16).padStart(2, "0")).join("");
    if (hex !== p.sha256) throw new Error(`${{p.path}}: sha256 differs from the package manifest`);
    return buf;
  }}));
  return new Blob(parts);
}}
{load}
```
""",
}
_SPLIT_NOTE = (" Files over the per-file limit are split into byte ranges (`parts` in `{manifest}`, each with "
               "its sha256); join them into ONE Blob, since wllama reads several Blobs as llama-gguf-split "
               "shards, which these parts are not.")


def readme(app: str, layout: str, pkg: dict, names: dict) -> str:
    first = next((f["path"] for f in pkg["files"] if f["path"].endswith((".gguf", ".onnx"))), pkg["files"][0]["path"])
    stem, _, ext = first.rpartition(".")
    runtime = pkg["runtime"]
    sc = pkg["size_check"]
    fields = {**names, "first": first, "stem": stem, "ext": ext, "limit": sc["limit"],
              "odr_pack": human(ODR_ASSET_PACK_BYTES),
              # llama.cpp opens the GGUF file, onnxruntime-genai the folder
              "kt_model": f'"$dir/{first}"' if runtime == "llamacpp" else '"$dir"',
              "swift_model": (f'bundle.url(forResource: "{stem}", withExtension: "{ext}")!.path'
                              if runtime == "llamacpp" else "bundle.bundlePath")}
    fields["split_note"] = _SPLIT_NOTE.format(**fields) if layout == "static-split" else ""
    fields["load"] = _WEB_LOAD[runtime].format(**fields)
    note = (_WEB_RUNTIME_NOTE if app == "web" else _RUNTIME_NOTE)[runtime].format(**fields)
    snippet = _SNIPPETS["static" if app == "web" else layout].format(**fields)
    return "\n".join([
        f"# {names['name']}: {pkg['format']} for {app}",
        "",
        f"Packaged by `edgedistill package` from the `{pkg['target']}` build (teacher `{pkg['teacher']}`). "
        f"The model files are in `{pkg['model_dir']}/`, listed with their sizes and sha256 in "
        f"`{PACKAGE_MANIFEST}` beside them, with the context length ({pkg['context']}) and the chat template.",
        "",
        note,
        "",
        snippet.rstrip(),
        "",
        f"Size: {human(sc['bytes'])} ({sc['measured']}) against {sc['limit']}, {human(sc['limit_bytes'])} "
        f"(source: {sc['limit_source']}): {sc['verdict']}. {sc['advice'][0].upper()}{sc['advice'][1:]}.",
        "",
    ])


def human(n: int) -> str:
    for unit, size in (("GB", GB), ("MB", MB), ("kB", 1000)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def describe(out: Path, pkg: dict) -> list[str]:
    """What the CLI prints: where the package is, what went in, and the size verdict with what to do."""
    sc = pkg["size_check"]
    n = sum(len(f.get("parts", [f])) for f in pkg["files"])
    ceiling = f" ({sc['ceiling']}, {human(sc['ceiling_bytes'])})" if sc["over_ceiling"] else ""
    return [
        f"packaged {pkg['format']} from {pkg['target']} for {pkg['app']} in {out}",
        f"  {pkg['model_dir']}/: {n} file{'s' * (n != 1)}, {human(pkg['total_bytes'])} ({pkg['layout']})",
        f"  size: {human(sc['bytes'])} ({sc['measured']}) against {sc['limit']}, {human(sc['limit_bytes'])}: "
        f"{sc['verdict']}{ceiling}",
        f"  next: {sc['advice']}",
    ]
