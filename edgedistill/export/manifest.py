"""`manifest.json`: what a published OUT/<target>/ folder holds, file by file, and the check that it still does.

The manifest lists every published file with its size and sha256, and each artifact with its
format and how its weights are quantized (so `edgedistill verify` can re-run the parity gate on
the folder alone). The renderings `report.md` and `report.html` are left out: `edgedistill report`
rewrites them from report.json, which is listed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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
        return f"{self.path}: {self.detail}"


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
    """The folder's manifest; a missing, unreadable or older manifest is bad input (UserError)."""
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise UserError(f"{folder} is not a folder; pass a build's OUT/<target> folder")
    if not path.is_file():
        raise UserError(f"{folder} has no {MANIFEST}; pass a build's OUT/<target> folder")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); the folder cannot be verified") from None
    if not isinstance(manifest, dict) or manifest.get("manifest_version") != MANIFEST_VERSION:
        raise UserError(f"{path} is not a version-{MANIFEST_VERSION} edgedistill manifest; rebuild the target "
                        f"with this edgedistill")
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(f, dict) and {"path", "bytes", "sha256"} <= f.keys()
                                              for f in files):
        raise UserError(f"{path} has no valid file list; the folder cannot be verified")
    return manifest


def check_files(folder: Path, manifest: dict | None = None) -> list[FileProblem]:
    """Every listed file present with its size and sha256, and no file the manifest does not list.

    Sizes are compared first, so a truncated or grown file is named without hashing it.
    """
    from edgedistill.pipeline import file_sha256

    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    problems, listed = [], set()
    for entry in manifest["files"]:
        rel = entry["path"]
        listed.add(rel)
        path = folder / rel
        if not path.is_file():
            problems.append(FileProblem(rel, "missing", "missing"))
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            problems.append(FileProblem(rel, "size", f"size {size:,} bytes, manifest says {entry['bytes']:,}"))
        elif file_sha256(path) != entry["sha256"]:
            problems.append(FileProblem(rel, "sha256", "contents changed (sha256 differs from the manifest)"))
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in listed and rel not in UNLISTED:
            problems.append(FileProblem(rel, "unlisted", "not in the manifest (added after the build)"))
    return problems


def require_verified(folder: Path) -> dict:
    """The manifest of a folder whose files all verify; otherwise a UserError naming what does not."""
    manifest = read_manifest(folder)
    problems = check_files(folder, manifest)
    if problems:
        shown = "; ".join(map(str, problems[:3])) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise UserError(f"{folder} does not match its {MANIFEST}: {shown}. Rebuild the target, or run "
                        f"`edgedistill verify {folder}` for the full list")
    return manifest
