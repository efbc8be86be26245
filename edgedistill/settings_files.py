"""Reading hand-edited settings files (build configs, target profiles): TOML or YAML text to plain data.

Everything a hand-edited or damaged file can hold ends in a one-line UserError naming the file and,
where there is one, the line: bytes that are not UTF-8, syntax errors, nesting deep enough to exhaust
the parser's recursion, numbers too long to convert, unknown or invalid fields, NaN and infinity.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
from pathlib import Path
from typing import Optional, get_args

import yaml
from pydantic import BaseModel, ValidationError

from edgedistill.errors import UserError


MAX_SETTINGS_BYTES = 1 << 20  # real ones are a few KB; this refuses a model or a log passed by mistake
MAX_NESTING = 32  # the schemas nest 3 deep; far deeper only happens in a damaged file
_INT64 = 2**63


def read_settings_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read the {what}: {e.strerror}") from None
    if len(raw) > MAX_SETTINGS_BYTES:
        raise UserError(f"{path}: {len(raw)} bytes is too large for a {what}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}, line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None


def parse_toml(text: str, source: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        line, problem = _toml_error_line(str(e), text)
        raise UserError(f"{source}{_at(line)}: not valid TOML: {_one_line(problem)}") from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise UserError(f"{source}{_at(_deep_toml_line(text))}: not valid TOML: nested too deeply") from None
    except ValueError as e:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        long = re.search(r"\d{1000,}", text)
        line = text.count("\n", 0, long.start()) + 1 if long else None
        raise UserError(f"{source}{_at(line)}: not valid TOML: {_short(str(e), 80)}") from None


def _toml_error_line(message: str, text: str) -> tuple[Optional[int], str]:
    # tomllib (3.11) puts the position only in the message: "... (at line 3, column 7)"
    m = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message, re.S)
    if m:
        return int(m[2]), f"{m[1]} (column {m[3]})"
    m = re.fullmatch(r"(.*) \(at end of document\)", message, re.S)
    if m:
        return text.count("\n") + 1, f"{m[1]} at the end of the file"
    return None, message


def _deep_toml_line(text: str) -> Optional[int]:
    """The line where arrays and inline tables first nest deeper than MAX_NESTING; strings and comments skipped."""
    depth, line, i, quote = 0, 1, 0, ""
    while i < len(text):
        c = text[i]
        if c == "\n":
            line += 1
        if quote:
            if c == "\\" and quote[0] == '"':
                i += 1
                line += text[i:i + 1] == "\n"
            elif text.startswith(quote, i):
                i += len(quote) - 1
                quote = ""
        elif c == "#":
            end = text.find("\n", i)
            i = len(text) if end < 0 else end - 1
        elif c in "\"'":
            quote = c * 3 if text.startswith(c * 3, i) else c
            i += len(quote) - 1
        elif c in "[{":
            depth += 1
            if depth > MAX_NESTING:
                return line
        elif c in "]}":
            depth = max(depth - 1, 0)
        i += 1
    return None


class _SafeLoader(yaml.SafeLoader):
    """yaml.safe_load's loader (plain data only: no tags that build Python objects), whose value errors
    carry the line. PyYAML's own converters raise bare ValueError/AttributeError for "2001-02-30",
    "!!int x" and the like."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, AttributeError, OverflowError) as e:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read value {_short(str(node.value), 30)!r}: {_short(str(e), 80)}",
                node.start_mark) from None

    def construct_mapping(self, node, deep=False):
        # PyYAML keeps the last of two equal keys; TOML refuses them, and so does a config here.
        seen = set()
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is set twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, source: str):
    try:
        _check_yaml_events(text, source)
        return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "cannot parse"
        line = mark.line + 1 if mark else None
        raise UserError(f"{source}{_at(line)}: not valid YAML: {_one_line(problem)}") from None
    except yaml.reader.ReaderError as e:  # a control character or bad encoding; it knows only the offset
        line = text.count("\n", 0, e.position) + 1
        code = e.character if isinstance(e.character, int) else ord(e.character[:1] or "\0")
        raise UserError(f"{source}, line {line}: not valid YAML: {e.reason} (U+{code:04X})") from None
    except yaml.YAMLError as e:
        raise UserError(f"{source}: not valid YAML: {_short(_one_line(str(e)), 120)}") from None


def _check_yaml_events(text: str, source: str) -> None:
    """Refuse, before PyYAML's recursive composer runs, what would exhaust its recursion (deep nesting)
    or blow up after it (aliases: a few lines of "&a [*a, *a]" expand to billions of items)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):  # the parser keeps its own stack: no recursion
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            raise UserError(f"{source}, line {line}: YAML aliases (*{event.anchor}) are not supported in a config")
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_NESTING:
                raise UserError(f"{source}, line {line}: not valid YAML: nested too deeply")
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1


def settings_error(e: ValidationError, model: type[BaseModel], source: str, text: str, yaml_file: bool) -> UserError:
    """One line for the first problem pydantic found: the file, the line, the field, what is wrong."""
    errors = e.errors()
    # A misspelt field also shows up as the real one "missing": report the unknown name first.
    unknown = [x for x in errors if x["type"] == "extra_forbidden"]
    err = (unknown or errors)[0]
    loc = tuple(err["loc"])
    field = ".".join(str(p) for p in loc)
    line = _at(line_of(text, loc, yaml_file))
    if unknown:
        known = known_fields(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known here: {', '.join(known)}"
        return UserError(f"{source}{line}: unknown field {field!r}; {hint}")
    if err["type"] == "missing":
        return UserError(f"{source}: missing field {field!r}")
    got = f" (got {_short(repr(err['input']), 40)})" if "input" in err and loc else ""
    where = f"field {field!r}: " if field else ""
    return UserError(f"{source}{line}: {where}{_one_line(err['msg'])}{got}")


def check_numbers(data, source: str, text: str, yaml_file: bool, loc: tuple = ()) -> None:
    """NaN and infinity pass pydantic's bounds (inf > 0) and integers past 64 bits pass `int`; neither is a
    setting anyone means, and both break the arithmetic downstream. Give it the validated model's dump:
    pydantic also makes them from text ("1e400", "inf")."""
    if isinstance(data, dict):
        for k, v in data.items():
            check_numbers(v, source, text, yaml_file, loc + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            check_numbers(v, source, text, yaml_file, loc + (i,))
    elif isinstance(data, float) and not math.isfinite(data) or isinstance(data, int) and abs(data) >= _INT64:
        field = ".".join(str(p) for p in loc)
        what = "a finite number" if isinstance(data, float) else "within 64-bit integers"
        raise UserError(f"{source}{_at(line_of(text, loc, yaml_file))}: field {field!r}: must be {what} "
                        f"(got {_short(repr(data), 40)})")


def known_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        sub = model.model_fields.get(str(part))
        nested = [t for t in (sub.annotation, *get_args(sub.annotation)) if _is_model(t)] if sub else []
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def _is_model(t) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def line_of(text: str, loc: tuple, yaml_file: bool) -> Optional[int]:
    """The line that sets the field at `loc`, or failing that its nearest parent (a list item: the list)."""
    for n in range(len(loc), 0, -1):
        line = _yaml_line(text, loc[:n]) if yaml_file else _toml_line(text, loc[:n])
        if line:
            return line
    return None


_TOML_KEY = r"""(?:[A-Za-z0-9_-]+|"[^"\n]*"|'[^'\n]*')"""
_TOML_DOTTED = rf"{_TOML_KEY}(?:\s*\.\s*{_TOML_KEY})*"


def _toml_line(text: str, loc: tuple) -> Optional[int]:
    want = tuple(str(p) for p in loc)
    table: Optional[tuple] = ()
    for n, line in enumerate(text.splitlines(), 1):
        if m := re.match(rf"\s*\[\s*({_TOML_DOTTED})\s*\]", line):
            table = _toml_key_parts(m[1])
            if table == want:
                return n
        elif re.match(r"\s*\[\[", line):
            table = None  # an array of tables: no field of the schemas lives in one
        elif table is not None and (m := re.match(rf"\s*({_TOML_DOTTED})\s*=", line)):
            if table + _toml_key_parts(m[1]) == want:
                return n
    return None


def _toml_key_parts(key: str) -> tuple:
    return tuple(p.strip().strip("\"'") for p in re.findall(rf"{_TOML_KEY}", key))


def _yaml_line(text: str, loc: tuple) -> Optional[int]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)  # nesting was bounded by _check_yaml_events
    except yaml.YAMLError:
        return None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            hits = [(k, v) for k, v in node.value if str(k.value) == str(part)]
            if not hits:
                return None
            key, node = hits[-1]
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return None
    return line if loc else None


def _at(line: Optional[int]) -> str:
    return f", line {line}" if line else ""


def _one_line(s: str) -> str:
    return " ".join(s.split())


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[:n - 3] + "..."


def read_json(path: Path, label: str):
    """A JSON file given by the user or found beside an artifact; every way it can be broken is one
    UserError starting with `label` (e.g. the path)."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{label}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{label}, line {e.lineno}: not valid JSON: {e.msg}") from None
    except RecursionError:  # json recurses once per nested array or object
        raise UserError(f"{label}: not valid JSON: nested too deeply") from None
    except ValueError as e:  # a number longer than Python converts (sys.get_int_max_str_digits)
        raise UserError(f"{label}: not valid JSON: {str(e)[:80]}") from None
