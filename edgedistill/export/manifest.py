"""`manifest.json`: what a published OUT/<target>/ folder holds, file by file, and the check that it still does.

The manifest lists every published file with its size and sha256, and each artifact with its
format and how its weights are quantized (so `edgedistill verify` can re-run the parity gate on
the folder alone). The renderings `report.md` and `report.html` are left out: `edgedistill report`
rewrites them from report.json, which is listed.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from edgedistill.errors import UserError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
# files of a published folder the manifest does not list: itself, and what is re-rendered from report.json
UNLISTED = frozenset({MANIFEST, "report.md", "report.html"})


@dataclass(frozen=True)
class FileProblem:
    path: str  # relative to the folder
    problem: str  # "missing" | "size" | "sha256" | "unlisted"
    detail: str

    def __str__(self) -> str:
        return f"{self.path!r}: {self.detail}" if not self.path.isprintable() else f"{self.path}: {self.detail}"


def folder_sha256(file_hashes: dict[str, str]) -> str:
    """One sha256 for an artifact folder (ONNX): over each file's relative path and sha256, in order.
    report.json, manifest.json and `edgedistill bench` name a folder artifact by this digest."""
    import hashlib

    h = hashlib.sha256()
    for rel, digest in sorted(file_hashes.items()):
        h.update(f"{rel}:{digest}\n".encode())
    return h.hexdigest()


def artifact_sha256(path: Path) -> str:
    """An artifact's sha256: a file's own, a folder's folder_sha256."""
    from edgedistill.pipeline import file_sha256

    if path.is_file():
        return file_sha256(path)
    return folder_sha256({f.relative_to(path).as_posix(): file_sha256(f) for f in path.rglob("*") if f.is_file()})


def file_entry(path: str, sha256: str, size: int) -> dict:
    return {"path": path, "bytes": size, "sha256": sha256}


def entries(sources: dict[str, Path], known_sha256: dict[Path, str] | None = None) -> list[dict]:
    """File entries for the folder publish() lays out from `sources` (published name -> file or folder).

    known_sha256 holds hashes the pipeline already computed for stage outputs (by absolute path),
    so a multi-gigabyte artifact is not read twice.
    """
    from edgedistill.pipeline import file_sha256

    known = known_sha256 or {}
    out = []
    for name, src in sorted(sources.items()):
        files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src]
        for f in files:
            rel = name if f == src else f"{name}/{f.relative_to(src).as_posix()}"
            out.append(file_entry(rel, known.get(f.resolve()) or file_sha256(f), f.stat().st_size))
    return out


def read_manifest(folder: Path) -> dict:
    """The folder's manifest, checked as untrusted input: a missing, unreadable, older or malformed
    manifest (a path that is absolute, climbs out with "..", repeats; a size or hash of the wrong
    kind) is bad input (UserError), before any listed path is touched."""
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise UserError(f"{folder} is not a folder; pass a build's OUT/<target> folder")
    if not path.is_file():
        raise UserError(f"{folder} has no {MANIFEST}; pass a build's OUT/<target> folder")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{path} is not valid JSON ({_one_line(e)}); the folder cannot be verified") from None
    if not isinstance(manifest, dict) or manifest.get("manifest_version") != MANIFEST_VERSION:
        raise UserError(f"{path} is not a version-{MANIFEST_VERSION} edgedistill manifest; rebuild the target "
                        f"with this edgedistill")
    problem = _schema_problem(manifest)
    if problem:
        raise UserError(f"{path} is malformed: {problem}; the folder cannot be verified")
    return manifest


def _schema_problem(m: dict) -> str | None:
    files = m.get("files")
    if not isinstance(files, list) or not files:
        return "no file list"
    seen = set()
    for i, f in enumerate(files):
        if not isinstance(f, dict) or not isinstance(f.get("path"), str):
            return f"file entry {i} has no path"
        rel = f["path"]
        if not safe_relative(rel):
            return f"file entry {i} has the path {rel!r}, which is not a plain path inside the folder"
        if rel in seen:
            return f"{rel!r} is listed twice"
        seen.add(rel)
        if type(f.get("bytes")) is not int or f["bytes"] < 0:
            return f"{rel!r} has no valid size"
        if not isinstance(f.get("sha256"), str) or not _SHA256.fullmatch(f["sha256"]):
            return f"{rel!r} has no valid sha256"
    for key in ("student", "target"):
        if not isinstance(m.get(key), str) or not safe_relative(m[key]) or "/" in m[key]:
            return f"no valid {key!r}"
    parity = m.get("parity")
    if not isinstance(parity, dict) or not isinstance(parity.get("tokens_file"), str) or parity["tokens_file"] not in seen:
        return "no listed parity tokens file"
    if not isinstance(m.get("artifacts"), list):
        return "no artifact list"
    for a in m["artifacts"]:
        if not isinstance(a, dict) or not all(isinstance(a.get(k), str) for k in ("file", "format", "runtime")):
            return "an artifact entry without file, format and runtime"
        if not under(a["file"], seen) or not isinstance(a.get("quant"), dict) or not isinstance(a.get("parity"), dict):
            return f"artifact {a['file']!r} is not listed, or has no quantization or parity record"
    if not under(m["student"], seen):
        return "the student folder is not listed"
    return None


_SHA256 = re.compile(r"[0-9a-f]{64}")


def safe_relative(rel: str) -> bool:
    """A path that names something inside the folder on every platform: relative, no empty, "." or
    ".." parts, no backslash or NUL, written the one canonical way."""
    if not rel or "\\" in rel or "\0" in rel or rel.startswith("/") or PurePosixPath(rel).as_posix() != rel:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def under(prefix: str, paths) -> bool:
    """Whether `prefix` is one of `paths` or a folder holding one of them."""
    return any(p == prefix or p.startswith(prefix + "/") for p in paths)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:160]


def check_files(folder: Path, manifest: dict | None = None) -> list[FileProblem]:
    """Every listed file present as a plain file with its size and sha256, and nothing else in the folder.

    Sizes are compared first, so a truncated or grown file is named without hashing it. Links are
    problems wherever they are: a link can point outside the folder, so its target was never built.
    """
    from edgedistill.pipeline import file_sha256

    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    present = _walk(folder)
    problems, listed = [], set()
    for entry in manifest["files"]:
        rel = entry["path"]
        listed.add(rel)
        kind = present.get(rel)
        if kind is None:
            problems.append(FileProblem(rel, "missing", "missing"))
        elif kind != "file":
            problems.append(FileProblem(rel, kind, f"a {kind}, not the file the build wrote"))
        elif (size := (folder / rel).stat().st_size) != entry["bytes"]:
            problems.append(FileProblem(rel, "size", f"size {size:,} bytes, manifest says {entry['bytes']:,}"))
        elif file_sha256(folder / rel) != entry["sha256"]:
            problems.append(FileProblem(rel, "sha256", "contents changed (sha256 differs from the manifest)"))
    for rel, kind in sorted(present.items()):
        if rel in listed or rel in UNLISTED or kind == "folder":
            continue
        what = "not in the manifest (added after the build)" if kind == "file" else f"a {kind} the build did not write"
        problems.append(FileProblem(rel, "unlisted", what))
    return problems


def _walk(folder: Path) -> dict[str, str]:
    """Every entry under `folder` by relative path: "file", "folder", "link" or "special"; links
    are not followed (os.walk does not descend into a linked folder either)."""
    found = {}
    for root, dirs, files in os.walk(folder):
        base = Path(root)
        for name in dirs + files:
            path = base / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                found[rel] = "link"
            elif path.is_dir():
                found[rel] = "folder"
            else:
                found[rel] = "file" if path.is_file() else "special"
    return found


def require_verified(folder: Path) -> dict:
    """The manifest of a folder whose files all verify; otherwise a UserError naming what does not."""
    manifest = read_manifest(folder)
    problems = check_files(folder, manifest)
    if problems:
        shown = "; ".join(map(str, problems[:3])) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise UserError(f"{folder} does not match its {MANIFEST}: {shown}. Rebuild the target, or run "
                        f"`edgedistill verify {folder}` for the full list")
    return manifest
