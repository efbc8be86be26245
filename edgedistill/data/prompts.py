"""Prompt sets: the bundled JSONL prompts, user-supplied prompt/text files, and a stratified split."""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from edgedistill.errors import UserError

USER_TEXT = "user_text"
"""Category of raw text items: the student trains on the text itself, the teacher does not answer it."""

USER_CATEGORY = "user"
"""Default category of user prompts given as ``messages`` or ``prompt``."""

ROLES = ("system", "user", "assistant")


@dataclass
class Prompt:
    id: str
    category: str
    messages: list[dict] = field(default_factory=list)

    @property
    def is_text(self) -> bool:
        """True for a raw text item (category ``user_text``): its text is ``messages[0]['content']``."""
        return self.category == USER_TEXT

    @property
    def text(self) -> str:
        return self.messages[0]["content"]


def _check_messages(messages, where: str) -> list[dict]:
    """Validate a chat; returns clean ``{"role", "content"}`` dicts. Raises UserError naming ``where``."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    clean = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: message {k} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: message {k} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise UserError(f"{where}: message {k} has empty or non-string 'content'")
        clean.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" for m in clean):
        raise UserError(f"{where}: 'messages' has no user message")
    if clean[-1]["role"] == "system":
        raise UserError(f"{where}: 'messages' must end with a user (or assistant) message, not system")
    return clean


def _parse_bundled_line(line: str, where: str) -> Prompt:
    obj = json.loads(line)
    return Prompt(id=obj["id"], category=obj["category"], messages=_check_messages(obj["messages"], where))


def load_bundled() -> list[Prompt]:
    """All bundled prompts (``edgedistill/data/prompts/*.jsonl``), in file-name then line order."""
    folder = resources.files("edgedistill.data").joinpath("prompts")
    out: list[Prompt] = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".jsonl"):
            continue
        for n, line in enumerate(entry.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                out.append(_parse_bundled_line(line, f"{entry.name}:{n}"))
    return out


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"{path}: prompt file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise UserError(f"{path}: file is empty")
    return text


def _load_jsonl(path: Path, text: str) -> list[Prompt]:
    out: list[Prompt] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        pid = obj.get("id", f"{path.stem}-{n:05d}")
        if not isinstance(pid, str) or not pid:
            raise UserError(f"{where}: 'id' must be a non-empty string")
        if pid in seen:
            raise UserError(f"{where}: duplicate id {pid!r} (first on line {seen[pid]})")
        seen[pid] = n
        category = obj.get("category", USER_CATEGORY)
        if not isinstance(category, str) or not category:
            raise UserError(f"{where}: 'category' must be a non-empty string")
        if "messages" in obj:
            messages = _check_messages(obj["messages"], where)
        elif "prompt" in obj:
            if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
                raise UserError(f"{where}: 'prompt' must be a non-empty string")
            messages = [{"role": "user", "content": obj["prompt"]}]
        elif "text" in obj:
            if not isinstance(obj["text"], str) or not obj["text"].strip():
                raise UserError(f"{where}: 'text' must be a non-empty string")
            messages, category = [{"role": "user", "content": obj["text"]}], USER_TEXT
        else:
            raise UserError(f"{where}: missing field: each line needs one of 'messages', 'prompt' or 'text'")
        out.append(Prompt(id=pid, category=category, messages=messages))
    return out


def _load_txt(path: Path, text: str) -> list[Prompt]:
    paragraphs = [p.strip() for p in re.split(r"\n[ \t\r]*\n", text.replace("\r\n", "\n"))]
    return [Prompt(id=f"{path.stem}-{k:05d}", category=USER_TEXT, messages=[{"role": "user", "content": p}])
            for k, p in enumerate((p for p in paragraphs if p), 1)]


def load_user_file(path: Path) -> list[Prompt]:
    """Prompts or text from a user file.

    ``.jsonl``: one object per line, ``{"messages": [...]}``, ``{"prompt": "..."}`` or ``{"text": "..."}``
    (optional ``id`` and ``category``; text items get category ``user_text``). A ``messages`` chat that ends
    with an assistant message carries its own answer. ``.txt``: each blank-line separated paragraph is one
    ``user_text`` item. Any problem raises UserError with one line naming the file and line.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".txt"):
        raise UserError(f"{path}: unsupported prompt file type {path.suffix or '(none)'!r}; use .jsonl or .txt")
    text = _read_text(path)
    prompts = _load_jsonl(path, text) if suffix == ".jsonl" else _load_txt(path, text)
    if not prompts:
        raise UserError(f"{path}: file is empty")
    return prompts


def split(prompts: list[Prompt], heldout_fraction: float, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """Deterministic split into (train, held_out), stratified by category.

    Each category gives ``round(fraction * n)`` prompts to held-out, at least one (so every category is
    represented) and, when it has two or more, at most ``n - 1`` (so it stays in train too). The choice
    depends only on the ids, categories and seed, not on the input order; both lists keep input order.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if heldout_fraction == 0.0:
        return list(prompts), []
    by_cat: dict[str, list[str]] = defaultdict(list)
    for p in prompts:
        by_cat[p.category].append(p.id)
    held: set[tuple[str, str]] = set()
    for cat in sorted(by_cat):
        ids = sorted(by_cat[cat])
        random.Random(f"{seed}:{cat}").shuffle(ids)
        k = max(1, round(heldout_fraction * len(ids)))
        if len(ids) > 1:
            k = min(k, len(ids) - 1)
        held.update((cat, i) for i in ids[:k])
    train = [p for p in prompts if (p.category, p.id) not in held]
    heldout = [p for p in prompts if (p.category, p.id) in held]
    return train, heldout
