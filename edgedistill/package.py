"""`edgedistill package OUT/T --app android|ios|web`: one artifact of a verified build, laid out for an app.

The package is a folder to copy into an app project or onto a static host:
- android: `app/src/main/assets/<name>/` (base module), or over Google Play's base-module limit an
  install-time asset pack module `<pack>/` (`build.gradle.kts` + `src/main/assets/<name>/`);
- ios: `<name>.bundle/`, a resource folder to add to the Xcode target (On-Demand Resources notes
  when over the App Store's cellular download limit);
- web: `models/<name>/` for a page to fetch, files over the per-file limit split into byte ranges.

Beside the model files lies `edgedistill-package.json` (format, runtime, context, chat template,
every file with its size and sha256, the size limit checked and the verdict); `README.md` at the
package root says how to load the files on that platform. A size over a limit is advice, not an
error: the package is written in the platform's fallback layout and the verdict says what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from edgedistill import atomic
from edgedistill.errors import UserError
from edgedistill.export.manifest import require_verified
from edgedistill.formats import FORMATS

PACKAGE_MANIFEST = "edgedistill-package.json"
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


@dataclass(frozen=True)
class PackageResult:
    out: Path
    app: str
    target: str
    format: str
    name: str
    layout: str
    model_dir: str  # relative to out
    files: int  # files written in model_dir
    total_bytes: int
    check: SizeCheck
    advice: str


# --- inputs --------------------------------------------------------------------------------------

def _pick_artifact(manifest: dict, fmt: str | None) -> dict:
    artifacts = manifest.get("artifacts") or []
    have = [a["format"] for a in artifacts]
    if not artifacts:
        raise UserError("the build's manifest.json lists no artifacts; rebuild the target")
    if fmt is None:
        # llama.cpp runs on Android, iOS and in the browser, so a GGUF is the default everywhere
        gguf = [a for a in artifacts if _runtime(a) == "llamacpp"]
        return (gguf or artifacts)[0]
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; this build has: {', '.join(have)}")
    for a in artifacts:
        if a["format"] == fmt:
            return a
    raise UserError(f"this build did not produce {fmt}; it has: {', '.join(have)}")


def _runtime(artifact: dict) -> str | None:
    fmt = FORMATS.get(artifact["format"])
    return artifact.get("runtime") or (fmt.runtime if fmt else None)


def _artifact_files(manifest: dict, artifact: dict) -> list[dict]:
    """The build manifest's entries for the artifact: the file itself, or every file of its folder."""
    name = artifact["file"]
    entries = [e for e in manifest["files"] if e["path"] == name or e["path"].startswith(name + "/")]
    if not entries:
        raise UserError(f"manifest.json lists no files for {name}; rebuild the target")
    return entries


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
    path = folder / artifact["file"]
    own = _gguf_string(path, "tokenizer.chat_template") if path.is_file() else _template_in(path)
    student = manifest.get("student")
    return own or (_template_in(folder / student) if student else None)


def _context(folder: Path, artifact: dict) -> int | None:
    if artifact.get("context"):
        return int(artifact["context"])
    report = folder / "report.json"  # listed in the manifest, so verified with the rest
    if report.is_file():
        return json.loads(report.read_text(encoding="utf-8")).get("student", {}).get("context")
    return None


def _tokenizer(artifact: dict, files: list[dict]) -> str | list[str]:
    if _runtime(artifact) == "llamacpp":
        return f"inside {artifact['file']} (tokenizer.ggml.*)"
    return [e["path"].split("/", 1)[1] for e in files if "tokenizer" in e["path"].rsplit("/", 1)[-1]]


# --- names and places ----------------------------------------------------------------------------

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise UserError(f"--name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


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
                        f"manifest.json; choose a folder outside it")
    if out_r in folder_r.parents:
        raise UserError(f"--out {out} contains the build folder {folder}; choose another folder")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_package(out))):
        raise UserError(f"{out} exists and is not an edgedistill package; remove it or choose another --out")


def _is_package(folder: Path) -> bool:
    """An earlier package, which may be replaced: its manifest where one of the layouts puts it."""
    # globs of fixed depth: --out pointed at a big folder by mistake must not be walked whole
    return any(any(folder.glob(f"{where}/{PACKAGE_MANIFEST}"))
               for where in ("*/src/main/assets/*", "*.bundle", "models/*"))


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


def _copy_entry(folder: Path, entry: dict, rel: str, dest: Path, split_over: int | None) -> dict:
    """Copy one build file into dest/rel (or its parts); the package manifest's entry for it.

    The whole file's hash must still be the build manifest's: it was verified moments ago, so a
    difference means the file changed while we copied it.
    """
    src = folder / entry["path"]
    target = dest / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    if split_over is None or entry["bytes"] <= split_over:
        sha, size = copy_range(src, target)
        _same(entry, sha, size)
        return {"path": rel, "bytes": size, "sha256": sha}
    parts, whole = [], hashlib.sha256()
    ranges = split_ranges(entry["bytes"], split_over)
    for i, (offset, length) in enumerate(ranges, 1):
        part_rel = f"{rel}.part-{i:03d}-of-{len(ranges):03d}"  # not gguf-split's -00001-of-00003.gguf
        sha, size = copy_range(src, dest / part_rel, offset, length, also=whole)
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


def package_app(folder: Path, app: str, fmt: str | None = None, out: Path | None = None, name: str | None = None,
                limit_bytes: int | None = None) -> PackageResult:
    """Write the app package for one artifact of the verified build folder `folder`; see the module doc."""
    folder = Path(folder)
    if app not in PLATFORMS:
        raise UserError(f"unknown app {app!r}; choose one of: {', '.join(PLATFORMS)}")
    if limit_bytes is not None and limit_bytes <= 0:
        raise UserError("--limit-mb must be greater than 0")
    manifest = require_verified(folder)  # first: a tampered build folder is refused before anything is written
    platform = PLATFORMS[app]
    artifact = _pick_artifact(manifest, fmt)
    if _runtime(artifact) not in _RUNTIME_NOTE:
        raise UserError(f"{artifact['format']} runs in {_runtime(artifact)!r}, which has no app layout here")
    target = manifest.get("target") or folder.name
    name = _check_name(name or f"{target}-{artifact['format'].split('-', 1)[1]}")
    out = Path(out) if out else default_out(folder, target, app)
    _check_out(out, folder)

    entries = _artifact_files(manifest, artifact)
    check = size_check(platform, entries, limit_bytes)
    layout = platform.over if check.over else platform.fits
    mdir = model_dir(app, layout, name)
    names = {"pack": pack_name(name), "bundle": f"{name}.bundle", "name": name, "model_dir": mdir,
             "manifest": PACKAGE_MANIFEST}
    advice = _advice(platform, check, **names)

    staging = out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    try:
        staging.mkdir(parents=True)
        dest = staging / mdir
        # only the web splits: an app store takes one big file, a browser and a static host may not
        split_over = check.limit.bytes if app == "web" and check.over else None
        prefix = artifact["file"] + "/"
        files = [_copy_entry(folder, e, e["path"].removeprefix(prefix), dest, split_over) for e in entries]
        pkg = {
            "package_version": PACKAGE_VERSION, "app": app, "target": target,
            "teacher": manifest.get("teacher"), "config_hash": manifest.get("config_hash"),
            "edgedistill_version": manifest.get("edgedistill_version"),
            "format": artifact["format"], "runtime": _runtime(artifact),
            "artifact": artifact["file"], "context": _context(folder, artifact),
            "chat_template": chat_template(folder, manifest, artifact),
            "tokenizer": _tokenizer(artifact, entries),
            "layout": layout, "model_dir": mdir,
            "files": files, "total_bytes": sum(f["bytes"] for f in files),
            "size_check": check.record(advice),
        }
        atomic.write_json(dest / PACKAGE_MANIFEST, pkg)
        _write_extras(staging, app, layout, pkg, names)
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return PackageResult(out=out, app=app, target=target, format=artifact["format"], name=name, layout=layout,
                         model_dir=mdir, files=sum(len(f.get("parts", [f])) for f in files),
                         total_bytes=pkg["total_bytes"], check=check, advice=advice)


def _swap_in(staging: Path, out: Path) -> None:
    """Replace `out` with the finished staging folder (pipeline.publish's pattern)."""
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def _write_extras(root: Path, app: str, layout: str, pkg: dict, names: dict) -> None:
    if layout == "install-time-asset-pack":
        atomic.write_text(root / names["pack"] / "build.gradle.kts", ASSET_PACK_GRADLE.format(**names))
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


def describe(result: PackageResult) -> list[str]:
    """What the CLI prints: where the package is, what went in, and the size verdict with what to do."""
    c = result.check
    return [
        f"packaged {result.format} from {result.target} for {result.app} in {result.out}",
        f"  {result.model_dir}/: {result.files} file{'s' * (result.files != 1)}, {human(result.total_bytes)} "
        f"({result.layout})",
        f"  size: {human(c.bytes)} ({c.measured}) against {c.limit.what}, {human(c.limit.bytes)}: {c.verdict}",
        f"  next: {result.advice}",
    ]
