"""The build report: report.json is the source of truth; report.md and report.html are rendered from it.

Every field, its unit and whether it is measured or projected: docs/report-schema.md (schema_version 1;
adding a field keeps the version, renaming or removing one bumps it). Rendering reads report.json alone
and is deterministic: `edgedistill report` writes the same bytes again and `edgedistill verify` relies
on that. report.html is one offline file: CSS and inline SVG plots, no scripts, no external requests.

A build of several targets also gets OUT/comparison.md and OUT/comparison.html, rendered from the
target folders' report.json files.

Renderers tolerate missing optional fields (an older or hand-made report): missing_fields() names what
DESIGN.md's minimum schema lacks, _normalize() fills the rest with None/{}.
"""

from __future__ import annotations

import copy
import html
import json
import math
from pathlib import Path

from edgedistill import atomic
from edgedistill.budget import fmt_num, fmt_pct
from edgedistill.errors import UserError
from edgedistill.export.manifest import MANIFEST, MANIFEST_VERSION, entries

SCHEMA_VERSION = 1
JSON_NAME, MD_NAME, HTML_NAME = "report.json", "report.md", "report.html"
COMPARISON_MD, COMPARISON_HTML = "comparison.md", "comparison.html"

_REQUIRED = (
    "schema_version", "target", "ok", "teacher.id", "teacher.params", "student.params",
    *(f"student.shape.{k}" for k in ("layers", "hidden", "intermediate", "heads", "kv_heads")),
    "quality.teacher", "quality.student_init", "quality.student", "artifacts",
)
_REQUIRED_ARTIFACT = (
    "file", "format", "bytes", "sha256", "parity.top1_agreement", "parity.kl",
    *(f"host.{k}" for k in ("decode_tok_s", "prefill_tok_s", "ttft_ms", "peak_rss_mb")),
    *(f"projected.{k}" for k in ("decode_tok_s", "ttft_ms", "footprint_mb", "energy_j_per_100_tokens")),
    "checks", "ok",
)
_QUALITY_ORDER = ("top1_agreement", "kl", "perplexity")
_QUALITY_COLS = (("teacher", "Teacher"), ("student_init", "Untrained student"), ("student", "Distilled student"))
_CHECK_TITLES = {
    "footprint_mb": "Memory footprint", "artifact_mb": "Artifact size", "decode_tok_s": "Decode speed",
    "ttft_ms": "Time to first token", "energy_j_per_100_tokens": "Energy per 100 tokens",
    "battery_pct_per_hour": "Battery per hour of chat",
    "parity_weights": "Parity: weights vs fake-quant (max abs diff)", "parity_top1": "Parity: runtime top-1 agreement",
    "parity_kl": "Parity: runtime KL to fake-quant",
}


# ----------------------------------------------------------------------------------------- public API


def write_reports(report: dict, out_dir: Path) -> None:
    """Write report.json atomically, then render report.md and report.html from it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = _clean(report)
    data.setdefault("schema_version", SCHEMA_VERSION)
    atomic.write_text(out_dir / JSON_NAME, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    render(out_dir)


def render(out_dir: Path) -> None:
    """(Re-)render report.md and report.html from the report.json in `out_dir`."""
    out_dir = Path(out_dir)
    report = load_report(out_dir)
    atomic.write_text(out_dir / MD_NAME, to_markdown(report))
    atomic.write_text(out_dir / HTML_NAME, to_html(report))


def render_all(path: Path) -> list[Path]:
    """`edgedistill report PATH`: re-render one OUT/T folder, or every target folder under OUT and, when
    there are several, OUT/comparison.md and .html. The files written, in order."""
    path = Path(path)
    if (path / JSON_NAME).is_file() or path.suffix == ".json":
        folder = path if path.is_dir() else path.parent
        render(folder)
        return [folder / MD_NAME, folder / HTML_NAME]
    folders = target_folders(path)
    if not folders:
        raise UserError(f"no report found: {path} holds no {JSON_NAME}, and no target folder under it does")
    written = []
    for folder in folders:
        render(folder)
        written += [folder / MD_NAME, folder / HTML_NAME]
    return written + render_comparison(path)


def target_folders(out: Path) -> list[Path]:
    """The target folders of a build's OUT folder (each holds a report.json), by name."""
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / JSON_NAME).is_file())


def render_comparison(out: Path) -> list[Path]:
    """OUT/comparison.md and OUT/comparison.html across the target folders, when there are at least two."""
    reports = [load_report(f) for f in target_folders(out)]
    if len(reports) < 2:
        return []
    atomic.write_text(Path(out) / COMPARISON_MD, comparison_markdown(reports))
    atomic.write_text(Path(out) / COMPARISON_HTML, comparison_html(reports))
    return [Path(out) / COMPARISON_MD, Path(out) / COMPARISON_HTML]


def load_report(path: Path) -> dict:
    """report.json from a folder or a file path."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / JSON_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no report found: {path}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a report (expected a JSON object)")
    return data


def missing_fields(report: dict) -> list[str]:
    """Dotted paths of the DESIGN.md minimum schema that `report` lacks (empty when complete)."""
    missing = [p for p in _REQUIRED if not _has(report, p)]
    for i, art in enumerate(report.get("artifacts") or []):
        missing += [f"artifacts[{i}].{p}" for p in _REQUIRED_ARTIFACT if not _has(art, p)]
        for j, chk in enumerate(art.get("checks") or []):
            missing += [f"artifacts[{i}].checks[{j}].{k}" for k in ("name", "value", "limit", "ok", "basis")
                        if k not in chk]
    return missing


# -------------------------------------------------------------------------------------------- helpers


def _has(d, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return False
        d = d[part]
    return True


def _clean(obj):
    """JSON-safe copy: numpy scalars and arrays to Python, Paths to str, NaN/inf to None."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump()
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_clean(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return _clean(obj.tolist())
    if hasattr(obj, "item"):
        return _clean(obj.item())
    return str(obj)


def _num(x) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, (int, float)) and math.isfinite(x):
        return float(x)
    return None


def _f(x, unit: str = "") -> str:
    v = _num(x)
    if v is None:
        return "n/a" if x is None else str(x)
    return f"{fmt_num(v)} {unit}".strip()


def _mb(nbytes) -> str:
    v = _num(nbytes)
    return "n/a" if v is None else f"{fmt_num(v / 1e6)} MB"


def _params(n) -> str:
    v = _num(n)
    return "n/a" if v is None else f"{fmt_num(v / 1e6)}M"


def _pct(x) -> str:
    v = _num(x)
    return "n/a" if v is None else f"{fmt_num(100 * v)}%"


def _verdict(ok) -> str:
    return "PASS" if ok is True else ("FAIL" if ok is False else "n/a")


def _normalize(report: dict) -> dict:
    """A copy with every field the renderers read present (missing optional fields become None/{})."""
    r = copy.deepcopy(report) if isinstance(report, dict) else {}
    r.setdefault("schema_version", SCHEMA_VERSION)
    r.setdefault("target", "unknown target")
    r.setdefault("ok", None)
    r["teacher"] = {"id": None, "params": None, **(r.get("teacher") or {})}
    student = {"params": None, **(r.get("student") or {})}
    student["shape"] = {k: None for k in ("layers", "hidden", "intermediate", "heads", "kv_heads")} | (
        student.get("shape") or {})
    r["student"] = student
    q = r.get("quality") or {}
    r["quality"] = {k: (q.get(k) or {}) for k, _ in _QUALITY_COLS} | {k: v for k, v in q.items()
                                                                      if k not in dict(_QUALITY_COLS)}
    arts = []
    for a in r.get("artifacts") or []:
        a = {"file": "?", "format": "?", "bytes": None, "sha256": None, "ok": None, "memory_tier": None, **a}
        for key in ("parity", "host", "projected", "footprint", "host_validation", "quality"):
            a[key] = a.get(key) or {}
        a["checks"] = [c for c in (a.get("checks") or []) if isinstance(c, dict)]
        arts.append(a)
    r["artifacts"] = arts
    for key in ("target_profile", "host", "timings_s", "calibration"):
        r[key] = r.get(key) or {}
    r["calibration"]["host"] = r["calibration"].get("host") or {}
    r["notes"] = r.get("notes") or []
    r["progressive"] = [s for s in (r.get("progressive") or []) if isinstance(s, dict)]
    return r


def _shape_text(s: dict) -> str:
    sh = s["shape"]
    parts = [f"{sh['layers']} layers" if sh["layers"] is not None else None,
             f"hidden {sh['hidden']}" if sh["hidden"] is not None else None,
             f"intermediate {sh['intermediate']}" if sh["intermediate"] is not None else None,
             f"{sh['heads']} heads" if sh["heads"] is not None else None,
             f"{sh['kv_heads']} KV heads" if sh["kv_heads"] is not None else None]
    parts = [p for p in parts if p]
    return f"{_params(s['params'])} params" + (": " + ", ".join(parts) if parts else "")


def _parity_text(p: dict) -> str:
    """One paragraph: the runtime against the fake-quant student, and the weights against its weights."""
    text = (f"Parity in its runtime with the PyTorch fake-quant student ({p.get('reference') or 'same format'}): "
            f"top-1 agreement {_pct(p.get('top1_agreement'))}, KL {_f(p.get('kl'))}"
            + (f" over {p['positions']} held-out positions" if p.get("positions") else ""))
    if p.get("weights_only_reference"):
        w = p["weights_only_reference"]
        text += (f"; against fake-quant weights alone (activations not modelled): top-1 {_pct(w['top1_agreement'])}, "
                 f"KL {_f(w['kl'])}")
    floor = p.get("noise_floor")
    if floor:
        text += (f"; the reference against itself under last-bit perturbations, the worst of "
                 f"{len(floor.get('realisations') or [floor])} (its noise floor: the runtime rounds activations to "
                 f"int8): top-1 {_pct(floor['top1_agreement'])}, KL {_f(floor['kl'])}")
    weights = p.get("weights") or {}
    if weights.get("tensors_compared"):
        text += (f". Weights read back from the file: {weights['tensors_compared']} tensors, largest difference "
                 f"{_f(weights['max_abs_diff'])} from the fake-quant weights")
    return text + "."


def _summary_line(r: dict) -> tuple[str, list[str]]:
    checks = [c for a in r["artifacts"] for c in a["checks"]]
    failed = [f"{a['file']}: {c.get('message') or c.get('name')}" for a in r["artifacts"] for c in a["checks"]
              if not c.get("ok")]
    if r["ok"] is True:
        return f"PASS: every check met on {r['target']} ({len(checks)} checks: budgets and parity).", []
    if r["ok"] is False:
        return f"FAIL: {len(failed)} of {len(checks)} checks failed on {r['target']}.", failed
    return f"No verdict recorded for {r['target']}.", failed


_OP_SIGNS = {"<=": "\u2264", ">=": "\u2265"}


def _check_row(c: dict) -> list[str]:
    unit = c.get("unit") or ""
    op = _OP_SIGNS.get(c.get("op"), c.get("op") or "")
    return [_CHECK_TITLES.get(c.get("name"), str(c.get("name"))) + f" (`{c.get('name')}`)",
            _f(c.get("value"), unit), f"{op} {_f(c.get('limit'), unit)}".strip(),
            fmt_pct(_num(c.get("margin_pct"))), str(c.get("basis") or "n/a"),
            _check_word(c)]


def _check_word(c: dict) -> str:
    """ok, FAIL, or FLAG: a failure-mode flag raised but passed as a warning (budget.failure_flags)."""
    return ("FLAG" if c.get("raised") else "ok") if c.get("ok") else "FAIL"


def _check_class(c: dict) -> str:
    return ("warn" if c.get("raised") else "pass") if c.get("ok") else "fail"


def _host_rows(h: dict) -> list[list[str]]:
    stats = h.get("stats") or {}

    def spread(key, unit):
        s = stats.get(key) or {}
        if _num(s.get("min")) is None or _num(s.get("max")) is None:
            return ""
        return f" (min {fmt_num(s['min'])}, max {fmt_num(s['max'])} {unit})"

    rows = [["Decode", _f(h.get("decode_tok_s"), "tok/s") + spread("decode_tok_s", "tok/s")],
            ["Prefill", _f(h.get("prefill_tok_s"), "tok/s") + spread("prefill_tok_s", "tok/s")],
            ["Time to first token", _f(h.get("ttft_ms"), "ms") + spread("ttft_ms", "ms")],
            ["Peak RSS", _f(h.get("peak_rss_mb"), "MB")]]
    if _num(h.get("baseline_rss_mb")) is not None:
        rows.append(["RSS before loading", _f(h.get("baseline_rss_mb"), "MB")])
    if _num(h.get("load_s")) is not None:
        rows.append(["Load time", _f(h.get("load_s"), "s")])
    if h.get("n_threads") is not None:
        rows.append(["Threads", str(h["n_threads"])])
    return rows


def _projected_rows(p: dict, fp: dict) -> list[list[str]]:
    rows = [["Decode", _f(p.get("decode_tok_s"), "tok/s")],
            ["Prefill", _f(p.get("prefill_tok_s"), "tok/s")],
            ["Time to first token", _f(p.get("ttft_ms"), "ms")],
            ["Memory footprint", _f(p.get("footprint_mb"), "MB")],
            ["Energy per 100 tokens", _f(p.get("energy_j_per_100_tokens"), "J")]]
    if "battery_pct_per_hour" in p:
        bat = p.get("battery_pct_per_hour")
        rows.append(["Battery per hour of chat", "n/a (mains powered)" if bat is None else _f(bat, "%")])
    if fp:
        rows.append(["Footprint breakdown", f"weights {_f(fp.get('weights_mb'), 'MB')} + KV cache "
                     f"{_f(fp.get('kv_cache_mb'), 'MB')} + runtime {_f(fp.get('overhead_mb'), 'MB')}"])
    if "max_context" in fp:
        mc = fp.get("max_context")
        rows.append(["Largest context within the memory budget",
                     "not bounded by memory (no KV cache)" if mc is None else f"{mc} tokens"
                     + (f" (budget {_f(fp.get('budget_mb'), 'MB')})" if fp.get("budget_mb") is not None else "")])
    return rows + _energy_rows(p.get("energy") or {})


def _energy_rows(en: dict) -> list[list[str]]:
    """Energy figures: J/token and watts always; battery figures on battery power; the bottom-up cross-check."""
    if not en:
        return []
    rows = [["Energy per token", _f(en.get("j_per_token"), "J")], ["Active power", _f(en.get("watts"), "W")]]
    if en.get("powered") == "battery":
        rows += [["Battery per 1,000 generated tokens", _f(en.get("battery_pct_per_1000_tokens"), "%")]]
    else:
        rows += [["Battery", "n/a (mains powered: J/token and watts only)"]]
    bu = en.get("bottom_up")
    if bu:
        verdict = ("consistent: below the top-down figure" if bu.get("consistent")
                   else "INCONSISTENT: above the top-down figure; the profile's power cannot move these bytes at this speed")
        rows.append(["Energy per token, bottom-up", f"{_f(bu.get('j_per_token'), 'J')} (DRAM "
                     f"{_f(bu.get('memory_j_per_token'), 'J')} + arithmetic {_f(bu.get('compute_j_per_token'), 'J')}; "
                     f"{_f(bu.get('watts_at_projected_speed'), 'W')} at the projected speed; top-down is "
                     f"{fmt_num(_num(bu.get('top_down_over_bottom_up')))}x this; {verdict})"])
    return rows


_MODEL_LABELS = {"decode": "Decode", "prefill": "Prefill"}


def _host_checks(artifacts: list[dict]):
    """(artifact, model label, figures) per artifact with a host check and speed model: one model's
    measured and predicted tok/s, signed error, verdict and efficiencies, out of its host_validation."""
    for a in artifacts:
        v = a["host_validation"]
        if not v:
            continue
        for m, label in _MODEL_LABELS.items():
            yield a, label, {"measured": (v.get("measured") or {}).get(f"{m}_tok_s"),
                             "predicted": (v.get("predicted") or {}).get(f"{m}_tok_s"),
                             "error": _num((v.get("error_pct") or {}).get(m)),
                             "trusted": bool((v.get("trusted") or {}).get(m)),
                             "assumed": _num((v.get("assumed_efficiency") or {}).get(m)),
                             "implied": _num((v.get("implied_efficiency") or {}).get(m))}


def _validation_rows(artifacts: list[dict]) -> list[list[str]]:
    """Per artifact and speed model: measured on the host, predicted by the model on the host, signed error."""
    return [[a["file"], label, _f(x["measured"], "tok/s"), _f(x["predicted"], "tok/s"), fmt_pct(x["error"]),
             f"{fmt_num(x['assumed'])} / {fmt_num(x['implied'])}", "yes" if x["trusted"] else "NO"]
            for a, label, x in _host_checks(artifacts)]


def _validation_basis(artifacts: list[dict]) -> str | None:
    """How the model was run on the host: the first artifact's account (every artifact's says the same)."""
    return next((a["host_validation"]["basis"] for a in artifacts if a["host_validation"].get("basis")), None)


_VALIDATION_HEADERS = ["Artifact", "Model", "Measured on host", "Projected for host", "Error", "Efficiency assumed / implied",
                       "Within bound"]


def _micro_rows(h: dict) -> list[list[str]]:
    """The host's micro-benchmark figures (measured), with their spread."""
    def cell(key, unit):
        s = h.get(key)
        if not isinstance(s, dict):
            return None
        return [f"{_f(s.get('median'), unit)} (min {fmt_num(_num(s.get('min')))}, max {fmt_num(_num(s.get('max')))})"]
    rows = []
    for key, label, unit in (("memory_read_gb_s", "Memory bandwidth, read", "GB/s"),
                             ("memory_copy_gb_s", "Memory bandwidth, copy (read + write)", "GB/s"),
                             ("matmul_fp32_gflop_s", "Matrix throughput, fp32", "GFLOP/s"),
                             ("matmul_int8_gop_s", "Matrix throughput, int8", "GOP/s")):
        c = cell(key, unit)
        if c:
            rows.append([label] + c)
    if h.get("threads") is not None:
        rows.append(["Threads", str(h["threads"])])
    if h.get("compute_kind"):
        rows.append(["Used by the model", f"read bandwidth {_f(h.get('bandwidth_gb_s'), 'GB/s')}, "
                     f"{h['compute_kind']} matmul {_f(h.get('compute_gflops'), 'GOP/s')}"])
    return rows


def _trust_line(r: dict) -> str | None:
    c = r["calibration"]
    if not c.get("message"):
        return None
    return c["message"] + (". Under --strict, figures projected with an untrusted model fail." if r.get("strict") else "")


def _quality_columns(r: dict) -> list[tuple[str, dict]]:
    """(label, figures) for the teacher, the untrained and the distilled student, then each artifact in its runtime."""
    cols = [(label, r["quality"][key]) for key, label in _QUALITY_COLS]
    return cols + [(f"{a['file']} (runtime)", a["quality"]) for a in r["artifacts"] if a["quality"]]


def _quality_rows(cols: list[tuple[str, dict]]) -> list[list[str]]:
    keys = [k for k in _QUALITY_ORDER]
    for _, q in cols:
        keys += [k for k in q if k not in keys]
    rows = []
    for k in keys:
        cells = []
        for _, q in cols:
            v = q.get(k)
            cells.append(_pct(v) if k == "top1_agreement" and _num(v) is not None else _f(v))
        rows.append([k] + cells)
    return rows


def _progressive_rows(stages: list[dict]) -> list[list[str]]:
    rows = []
    for s in stages:
        sh, q = s.get("shape") or {}, s.get("quality") or {}
        shape = ", ".join(f"{k} {sh[k]}" for k in ("layers", "hidden", "intermediate", "heads", "kv_heads")
                          if k in sh)
        rows.append([str(s.get("stage")), _params(s.get("params")), shape or "n/a",
                     "n/a" if s.get("steps") is None else str(s["steps"]),
                     _pct(q.get("top1_agreement")), _f(q.get("kl")), _f(q.get("perplexity"))])
    return rows


_PROGRESSIVE_HEADERS = ["Stage", "Params", "Shape", "Distill steps", "Top-1 agreement", "KL", "Perplexity"]
_PROGRESSIVE_NOTE = ("Each stage was pruned from the one above it and distilled against it; every stage is "
                     "scored against the original teacher on the held-out prompts.")


def _budget_rows(tp: dict) -> list[list[str]]:
    b, d = tp.get("budget") or {}, tp.get("device") or {}
    rows = []
    if b.get("memory_gb") is not None:
        rows.append(["Memory (weights + KV + runtime)", f"\u2264 {fmt_num(b['memory_gb'] * 1000)} MB"])
    if b.get("artifact_gb") is not None:
        rows.append(["Artifact size", f"\u2264 {fmt_num(b['artifact_gb'] * 1000)} MB"])
    if b.get("min_decode_tok_s") is not None:
        rows.append(["Decode", f"\u2265 {fmt_num(b['min_decode_tok_s'])} tok/s"])
    if b.get("max_ttft_s") is not None:
        rows.append(["Time to first token", f"\u2264 {fmt_num(b['max_ttft_s'] * 1000)} ms for "
                     f"{b.get('prompt_tokens', '?')} prompt tokens"])
    if b.get("max_energy_j_per_100_tok") is not None:
        rows.append(["Energy", f"\u2264 {fmt_num(b['max_energy_j_per_100_tok'])} J per 100 tokens"])
    if b.get("max_battery_pct_per_hour") is not None:
        rows.append(["Battery", f"\u2264 {fmt_num(b['max_battery_pct_per_hour'])}% per hour of chat"])
    if tp.get("context") is not None:
        rows.append(["Context", f"{tp['context']} tokens"])
    if d:
        rows.append(["Device model", f"{_f(d.get('bandwidth_gb_s'), 'GB/s')}, "
                     f"{_f(d.get('compute_gflops'), 'GFLOP/s')}, {_f(d.get('active_power_w'), 'W')}, battery "
                     f"{_f(d.get('battery_wh'), 'Wh') if d.get('battery_wh') is not None else 'none (mains)'}"])
    if tp.get("formats"):
        rows.append(["Formats", ", ".join(tp["formats"])])
    return rows


# ------------------------------------------------------------------------------------------- markdown


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(_md_escape(h) for h in headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _overview_rows(r: dict) -> list[list[str]]:
    """The report's head table (teacher, student, compression, target, provenance), for md and html alike."""
    t, s = r["teacher"], r["student"]
    rows = [["Teacher", f"{t['id'] or 'n/a'} ({_params(t['params'])} params)"], ["Student", _shape_text(s)]]
    if _num(t["params"]) and _num(s["params"]):
        rows.append(["Compression", f"{fmt_num(t['params'] / s['params'])}x fewer parameters"])
    if s.get("group_bits"):
        rows.append(["Mixed precision", ", ".join(f"{g} tensors at {b} bits" for g, b in s["group_bits"].items())
                     + " in every artifact; the rest in the artifact's own format"])
    if s.get("plan_why"):
        rows.append(["Why this student", str(s["plan_why"])])
    if r["target_profile"].get("description"):
        rows.append(["Target", r["target_profile"]["description"]])
    for key, label in (("created", "Built"), ("edgedistill_version", "edgedistill"), ("config_hash", "Config hash")):
        if r.get(key):
            rows.append([label, str(r[key])])
    return rows


_ARTIFACT_HEADERS = ["Artifact", "Format", "Size", "Footprint (projected)", "Memory tier", "Largest context (projected)",
                     "Verdict"]


def _artifact_row(a: dict) -> list[str]:
    fp = a["footprint"]
    mc = fp.get("max_context")
    return [a["file"], a["format"], _mb(a["bytes"]), _f(fp.get("total_mb"), "MB"), a["memory_tier"] or "n/a",
            "n/a" if "max_context" not in fp else ("unbounded" if mc is None else f"{mc} tokens"), _verdict(a["ok"])]


_CALIBRATION_NOTE = ("The projection model is run on the build host with the host's own measured memory bandwidth and "
                     "matrix throughput, and its decode and prefill speeds are compared with what the runtimes measured. "
                     "Error = (projected - measured) / measured: + means the model is optimistic.")


def _md_calibration(r: dict) -> list[str]:
    c = r["calibration"]
    vrows = _validation_rows(r["artifacts"])
    if not c["host"] and not vrows:
        return []
    lines = ["## Projection model checked on this host", "", _CALIBRATION_NOTE, ""]
    if c.get("message"):
        lines += [f"**{c['message']}**", ""]
    if c["host"]:
        lines += [_md_table(["Micro-benchmark (measured)", "Value"], _micro_rows(c["host"])), ""]
        if c["host"].get("basis"):
            lines += [f"_How:_ {c['host']['basis']}", ""]
    if vrows:
        lines += [_md_table(_VALIDATION_HEADERS, vrows), ""]
        basis = _validation_basis(r["artifacts"])
        if basis:
            lines += [f"_Model on the host:_ {basis}", ""]
    return lines


def _evaluation_md(r: dict) -> list[str]:
    from edgedistill.evaluate.render import markdown

    return markdown(r.get("evaluation") or {})


def _evaluation_html(r: dict) -> list[str]:
    from edgedistill.evaluate.render import html

    return html(r.get("evaluation") or {})


def to_markdown(report: dict) -> str:
    r = _normalize(report)
    head, failed = _summary_line(r)
    lines = [f"# edgedistill report: {r['target']}", "", f"**{head}**", ""]
    lines += [f"- {m}" for m in failed] + ([""] if failed else [])
    trust = _trust_line(r)
    lines += [f"> {trust}", ""] if trust else []
    lines += [_md_table(["", ""], _overview_rows(r)), ""]
    lines += [f"- {n}" for n in r["notes"]] + ([""] if r["notes"] else [])

    if r["target_profile"]:
        lines += [f"## Budgets of {r['target']}", "", _md_table(["Budget", "Limit"], _budget_rows(r["target_profile"])),
                  ""]

    lines += ["## Artifacts", ""]
    if not r["artifacts"]:
        lines += ["No artifacts were recorded.", ""]
    else:
        lines += [_md_table(_ARTIFACT_HEADERS, [_artifact_row(a) for a in r["artifacts"]]), ""]
    lines += _md_calibration(r)
    for a in r["artifacts"]:
        lines += [f"### {a['file']} ({a['format']}): {_verdict(a['ok'])}", ""]
        if a["sha256"]:
            lines += [f"sha256 `{a['sha256']}`", ""]
        if a["checks"]:
            lines += [_md_table(["Check", "Value", "Limit", "Margin", "Basis", "Result"],
                                [_check_row(c) for c in a["checks"]]), ""]
            lines += [f"- {_check_word(c)}: {c.get('message') or c.get('name')}" for c in a["checks"]]
            lines.append("")
        if a["parity"]:
            lines += [_parity_text(a["parity"]), ""]
        lines += ["Measured on the build host:", "", _md_table(["Figure", "Value"], _host_rows(a["host"])), ""]
        if a["host"].get("basis"):
            lines += [f"_How:_ {a['host']['basis']}", ""]
        lines += [f"Projected on {r['target']}:", "",
                  _md_table(["Figure", "Value"], _projected_rows(a["projected"], a["footprint"])), ""]
        if (a["projected"].get("energy") or {}).get("basis"):
            lines += [f"_Energy:_ {a['projected']['energy']['basis']}", ""]
        if a["projected"].get("basis"):
            lines += [f"_Model:_ {a['projected']['basis']}", ""]
        if a["footprint"].get("basis"):
            lines += [f"_Memory:_ {a['footprint']['basis']}", ""]

    lines += ["## Quality on held-out prompts", ""]
    cols = _quality_columns(r)
    qrows = _quality_rows(cols)
    lines += [_md_table(["Metric"] + [label for label, _ in cols], qrows) if qrows
              else "No quality figures were recorded.", ""]
    lines += _evaluation_md(r)
    if r["progressive"]:
        lines += ["## Progressive compression", "", _PROGRESSIVE_NOTE, "",
                  _md_table(_PROGRESSIVE_HEADERS, _progressive_rows(r["progressive"])), ""]

    if r["host"]:
        h = r["host"]
        rows = [[k, ", ".join(map(str, v)) if isinstance(v, list) else
                 (", ".join(f"{kk} {vv}" for kk, vv in v.items() if vv) if isinstance(v, dict) else str(v))]
                for k, v in h.items() if v not in (None, [], {})]
        lines += ["## Build host", "", _md_table(["", ""], rows), ""]
    if r["timings_s"]:
        rows = [[str(k), _f(v, "s")] for k, v in r["timings_s"].items()]
        total = sum(_num(v) or 0 for v in r["timings_s"].values())
        rows.append(["total", _f(total, "s")])
        lines += ["## Stage timings", "", _md_table(["Stage", "Time"], rows), ""]
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------- html

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:980px;
padding:0 1rem;color:#1f2328;background:#fff}
h1{font-size:1.6rem;margin-bottom:.3rem}h2{margin-top:2.2rem;border-bottom:1px solid #d0d7de;padding-bottom:.2rem}
h3{margin-top:1.6rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem}
th,td{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f6f8fa}
.pass{color:#1a7f37;font-weight:600}.fail{color:#cf222e;font-weight:600}.warn{color:#9a6700;font-weight:600}
.banner{padding:.7rem 1rem;border-radius:6px;margin:1rem 0;font-weight:600}
.banner.pass{background:#dafbe1;border:1px solid #1a7f37}.banner.fail{background:#ffebe9;border:1px solid #cf222e}
.banner.none{background:#f6f8fa;border:1px solid #d0d7de}
.banner.warn{background:#fff8c5;border:1px solid #bf8700;color:#1f2328}
.basis{color:#57606a;font-size:.85rem}
code{font-size:.82rem;background:#f6f8fa;padding:.1rem .3rem;border-radius:4px;word-break:break-all}
svg{display:block;margin:.6rem 0;max-width:100%;height:auto}
svg text{font-family:system-ui,sans-serif}
"""
_GREEN, _RED, _GREY = "#2da44e", "#cf222e", "#8c959f"
_SEGMENTS = (("weights_mb", "weights", "#0969da"), ("kv_cache_mb", "KV cache", "#bf8700"),
             ("overhead_mb", "runtime overhead", "#8c959f"))
_QCOLORS = ("#6e7781", "#d0d7de", "#1a7f37")


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def _html_table(headers: list[str] | None, rows: list[list[str]], raw_cols: tuple[int, ...] = ()) -> str:
    out = ["<table>"]
    if headers:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{c if i in raw_cols else _e(c)}</td>" for i, c in enumerate(row)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _svg_checks(checks: list[dict]) -> str:
    """One row per check: the value as a bar, the limit as a dashed line (log scale when they differ a lot)."""
    if not checks:
        return ""
    row_h, x0, x1, w = 40, 200, 560, 780
    h = row_h * len(checks) + 16
    parts = [f'<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" font-family="system-ui, sans-serif" '
             f'role="img" aria-label="checks: value against limit">']
    for i, c in enumerate(checks):
        y = 8 + i * row_h
        v, lim = _num(c.get("value")), _num(c.get("limit"))
        unit = c.get("unit") or ""
        color = _GREEN if c.get("ok") else _RED
        vals = [x for x in (v, lim) if x is not None and x > 0]
        log = len(vals) == 2 and max(vals) / min(vals) > 20
        if log:
            lo, hi = math.log10(min(vals) / 3), math.log10(max(vals) * 1.5)

            def sx(x, lo=lo, hi=hi):
                return x0 + (x1 - x0) * (math.log10(max(x, 10 ** lo)) - lo) / (hi - lo)
        else:
            top = max(vals) * 1.15 if vals else 1.0

            def sx(x, top=top):
                return x0 + (x1 - x0) * max(0.0, x) / top
        title = _CHECK_TITLES.get(c.get("name"), str(c.get("name")))
        parts.append(f'<text x="0" y="{y + 17}" font-size="13">{_e(title)}</text>')
        parts.append(f'<text x="0" y="{y + 32}" font-size="11" fill="#57606a">{_e(c.get("basis") or "")}'
                     f'{" · log scale" if log else ""}{" · model untrusted on host" if c.get("trusted") is False else ""}</text>')
        parts.append(f'<rect x="{x0}" y="{y + 6}" width="{x1 - x0}" height="22" fill="#f6f8fa"/>')
        if v is not None:
            bw = max(1.0, sx(v) - x0)
            parts.append(f'<rect x="{x0}" y="{y + 6}" width="{bw:.1f}" height="22" fill="{color}">'
                         f'<title>{_e(c.get("message") or "")}</title></rect>')
        if lim is not None:
            lx = sx(lim)
            parts.append(f'<line x1="{lx:.1f}" y1="{y + 1}" x2="{lx:.1f}" y2="{y + 33}" stroke="#1f2328" '
                         f'stroke-width="2" stroke-dasharray="4 3"/>')
        parts.append(f'<text x="{x1 + 8}" y="{y + 17}" font-size="12" fill="{color}">{_e(_f(v, unit))}</text>')
        parts.append(f'<text x="{x1 + 8}" y="{y + 32}" font-size="11" fill="#57606a">'
                     f'limit {_e(_OP_SIGNS.get(c.get("op"), c.get("op") or ""))} {_e(_f(lim, unit))}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _svg_memory(artifacts: list[dict], budget_mb: float | None) -> str:
    """Stacked bars: weights + KV cache + runtime overhead per artifact, with the memory budget as a line."""
    rows = [(a["file"], a["footprint"]) for a in artifacts
            if any(_num(a["footprint"].get(k)) is not None for k, _, _ in _SEGMENTS)]
    if not rows:
        return ""
    row_h, x0, x1, w = 34, 200, 640, 780
    h = 40 + row_h * len(rows) + 10
    totals = [sum(_num(fp.get(k)) or 0 for k, _, _ in _SEGMENTS) for _, fp in rows]
    top = max(totals + ([budget_mb] if budget_mb else [])) * 1.1 or 1.0
    parts = [f'<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" font-family="system-ui, sans-serif" '
             f'role="img" aria-label="memory breakdown">']
    lx = x0
    for _, label, color in _SEGMENTS:
        parts.append(f'<rect x="{lx}" y="6" width="12" height="12" fill="{color}"/>'
                     f'<text x="{lx + 16}" y="16" font-size="12">{_e(label)}</text>')
        lx += 24 + 8 * len(label)
    if budget_mb:
        parts.append(f'<line x1="{lx}" y1="12" x2="{lx + 18}" y2="12" stroke="#1f2328" stroke-width="2" '
                     f'stroke-dasharray="4 3"/><text x="{lx + 22}" y="16" font-size="12">budget</text>')
    for i, ((name, fp), total) in enumerate(zip(rows, totals)):
        y = 32 + i * row_h
        parts.append(f'<text x="0" y="{y + 16}" font-size="12">{_e(name)}</text>')
        x = float(x0)
        for key, label, color in _SEGMENTS:
            v = _num(fp.get(key)) or 0.0
            width = (x1 - x0) * v / top
            if width > 0:
                parts.append(f'<rect x="{x:.1f}" y="{y + 2}" width="{width:.1f}" height="20" fill="{color}">'
                             f'<title>{_e(label)}: {_e(_f(v, "MB"))}</title></rect>')
            x += width
        over = budget_mb is not None and total > budget_mb
        parts.append(f'<text x="{x + 6:.1f}" y="{y + 16}" font-size="12" fill="{_RED if over else "#1f2328"}">'
                     f'{_e(_f(total, "MB"))}</text>')
    if budget_mb:
        bx = x0 + (x1 - x0) * budget_mb / top
        parts.append(f'<line x1="{bx:.1f}" y1="28" x2="{bx:.1f}" y2="{h - 4}" stroke="#1f2328" stroke-width="2" '
                     f'stroke-dasharray="4 3"/>')
        parts.append(f'<text x="{bx - 4:.1f}" y="{h - 6}" font-size="11" text-anchor="end" fill="#57606a">'
                     f'budget {_e(_f(budget_mb, "MB"))}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


_ARTIFACT_COLORS = ("#0969da", "#8250df", "#bf3989", "#bc4c00", "#1b7c83", "#4d2d00")


def _svg_quality(cols: list[tuple[str, dict]]) -> str:
    """One panel per metric: teacher, untrained student, distilled student and each artifact side by side."""
    metrics = [k for k in _QUALITY_ORDER if any(_num(q.get(k)) is not None for _, q in cols)]
    for _, q in cols:
        metrics += [k for k, v in q.items() if k not in metrics and _num(v) is not None and k != "tokens"]
    if not metrics:
        return ""
    colors = list(_QCOLORS) + [_ARTIFACT_COLORS[i % len(_ARTIFACT_COLORS)] for i in range(len(cols) - len(_QCOLORS))]
    bar, gap = (40, 12) if len(cols) <= 3 else (24, 6)
    pw, ph = max(200, 50 + len(cols) * (bar + gap)), 190 if len(cols) <= 3 else 240
    legend_rows = (len(cols) + 2) // 3
    w, h = pw * len(metrics), ph + 20 + 18 * legend_rows
    parts = [f'<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" font-family="system-ui, sans-serif" '
             f'role="img" aria-label="quality: teacher, students and artifacts">']
    for m_i, metric in enumerate(metrics):
        px = m_i * pw
        vals = [_num(q.get(metric)) for _, q in cols]
        top = max([abs(v) for v in vals if v is not None] or [1.0]) * 1.15 or 1.0
        parts.append(f'<text x="{px + pw / 2}" y="16" font-size="13" text-anchor="middle">{_e(metric)}</text>')
        base = ph - 10
        for j, (v, (label, _), color) in enumerate(zip(vals, cols, colors)):
            bx = px + 25 + j * (bar + gap)
            if v is None:
                parts.append(f'<text x="{bx + bar / 2}" y="{base - 4}" font-size="10" text-anchor="middle" '
                             f'fill="#57606a">n/a</text>')
            else:
                bh = (base - (40 if bar > 30 else 90)) * abs(v) / top
                shown = _pct(v) if metric == "top1_agreement" else _f(v)
                parts.append(f'<rect x="{bx}" y="{base - bh:.1f}" width="{bar}" height="{max(bh, 1):.1f}" '
                             f'fill="{color}"><title>{_e(label)}: {_e(shown)}</title></rect>')
                if bar > 30:
                    parts.append(f'<text x="{bx + bar / 2}" y="{base - bh - 4:.1f}" font-size="11" '
                                 f'text-anchor="middle">{_e(shown)}</text>')
                else:  # narrow bars: the label runs up from the bar's top, so neighbours do not overlap
                    tx, ty = bx + bar / 2 + 3, base - bh - 4
                    parts.append(f'<text x="{tx:.1f}" y="{ty:.1f}" font-size="9" transform="rotate(-90 {tx:.1f} '
                                 f'{ty:.1f})">{_e(shown)}</text>')
        parts.append(f'<line x1="{px + 20}" y1="{base}" x2="{px + pw - 20}" y2="{base}" stroke="#8c959f"/>')
    for i, ((label, _), color) in enumerate(zip(cols, colors)):
        lx, ly = 10 + (i % 3) * 260, ph + 8 + 18 * (i // 3)
        parts.append(f'<rect x="{lx}" y="{ly}" width="12" height="12" fill="{color}" stroke="#8c959f"/>'
                     f'<text x="{lx + 16}" y="{ly + 10}" font-size="12">{_e(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _svg_validation(artifacts: list[dict], bound_pct: float | None) -> str:
    """Per artifact and speed model: measured (solid) and projected-for-host (outlined) tok/s, and the error."""
    rows = []
    for a, label, x in _host_checks(artifacts):
        meas, pred = _num(x["measured"]), _num(x["predicted"])
        if meas is not None or pred is not None:
            rows.append((f"{a['file']} {label.lower()}", meas, pred, x["error"], x["trusted"]))
    if not rows:
        return ""
    row_h, x0, x1, w = 34, 200, 520, 820
    h = 30 + row_h * len(rows)
    parts = [f'<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" font-family="system-ui, sans-serif" '
             f'role="img" aria-label="projection model on the host: measured vs projected">',
             f'<rect x="{x0}" y="6" width="12" height="12" fill="#57606a"/><text x="{x0 + 16}" y="16" font-size="12">'
             f'measured on host</text><rect x="{x0 + 140}" y="6" width="12" height="12" fill="none" stroke="#0969da" '
             f'stroke-width="2"/><text x="{x0 + 156}" y="16" font-size="12">projected for host</text>']
    for i, (name, meas, pred, err, ok) in enumerate(rows):
        y = 26 + i * row_h
        top = max(x for x in (meas, pred, 1e-12) if x is not None) * 1.05  # each row on its own scale
        parts.append(f'<text x="0" y="{y + 17}" font-size="12">{_e(name)}</text>')
        if meas is not None:
            parts.append(f'<rect x="{x0}" y="{y + 4}" width="{max(1.0, (x1 - x0) * meas / top):.1f}" height="12" '
                         f'fill="#57606a"><title>measured {_e(_f(meas, "tok/s"))}</title></rect>')
        if pred is not None:
            parts.append(f'<rect x="{x0}" y="{y + 17}" width="{max(1.0, (x1 - x0) * pred / top):.1f}" height="12" '
                         f'fill="none" stroke="#0969da" stroke-width="2"><title>projected {_e(_f(pred, "tok/s"))}'
                         f'</title></rect>')
        color = _GREEN if ok else _RED
        text = fmt_pct(err)
        if not ok and bound_pct:
            text += f" (outside \u00b1{fmt_num(bound_pct)}%)"
        parts.append(f'<text x="{x1 + 10}" y="{y + 13}" font-size="12" fill="{color}">{_e(text)}</text>')
        parts.append(f'<text x="{x1 + 10}" y="{y + 27}" font-size="10" fill="#57606a">measured {_e(_f(meas))} / '
                     f'projected {_e(_f(pred))} tok/s</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _html_calibration(r: dict) -> list[str]:
    c = r["calibration"]
    vrows = _validation_rows(r["artifacts"])
    if not c["host"] and not vrows:
        return []
    body = ["<h2>Projection model checked on this host</h2>", f"<p>{_e(_CALIBRATION_NOTE)}</p>"]
    if c.get("message"):
        body.append(f'<p class="{"pass" if c.get("trusted") else "fail"}">{_e(c["message"])}</p>')
    if c["host"]:
        body.append(_html_table(["Micro-benchmark (measured)", "Value"], _micro_rows(c["host"])))
        if c["host"].get("basis"):
            body.append(f'<p class="basis">How: {_e(c["host"]["basis"])}</p>')
    if vrows:
        body += [_svg_validation(r["artifacts"], _num(c.get("bound_pct"))), _html_table(_VALIDATION_HEADERS, vrows)]
        basis = _validation_basis(r["artifacts"])
        if basis:
            body.append(f'<p class="basis">Model on the host: {_e(basis)}</p>')
    return body


def to_html(report: dict) -> str:
    r = _normalize(report)
    head, failed = _summary_line(r)
    cls = {True: "pass", False: "fail"}.get(r["ok"], "none")
    body = [f"<h1>edgedistill report: {_e(r['target'])}</h1>", f'<div class="banner {cls}">{_e(head)}</div>']
    if failed:
        body.append("<ul>" + "".join(f'<li class="fail">{_e(m)}</li>' for m in failed) + "</ul>")
    trust = _trust_line(r)
    if trust:
        tcls = "pass" if r["calibration"].get("trusted") else "warn"
        body.append(f'<div class="banner {tcls}" id="trust">{_e(trust)}</div>')
    body.append(_html_table(None, _overview_rows(r)))
    if r["notes"]:
        body.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in r["notes"]) + "</ul>")

    if r["target_profile"]:
        body += [f"<h2>Budgets of {_e(r['target'])}</h2>", _html_table(["Budget", "Limit"],
                                                                      _budget_rows(r["target_profile"]))]

    body.append("<h2>Artifacts</h2>")
    if not r["artifacts"]:
        body.append("<p>No artifacts were recorded.</p>")
    else:
        rows = [[_e(c) for c in _artifact_row(a)[:-1]]
                + [f'<span class="{"pass" if a["ok"] else "fail"}">{_verdict(a["ok"])}</span>'] for a in r["artifacts"]]
        body.append(_html_table(_ARTIFACT_HEADERS, rows, raw_cols=tuple(range(len(_ARTIFACT_HEADERS)))))
        budget_gb = (r["target_profile"].get("budget") or {}).get("memory_gb")
        mem = _svg_memory(r["artifacts"], budget_gb * 1000 if _num(budget_gb) else None)
        if mem:
            body += [f"<h3>Memory on {_e(r['target'])} (projected)</h3>", mem]
        body += _html_calibration(r)

    for a in r["artifacts"]:
        vcls = "pass" if a["ok"] else "fail"
        body.append(f'<h3>{_e(a["file"])} ({_e(a["format"])}): <span class="{vcls}">{_verdict(a["ok"])}</span></h3>')
        if a["sha256"]:
            body.append(f"<p>sha256 <code>{_e(a['sha256'])}</code></p>")
        if a["checks"]:
            body.append(_svg_checks(a["checks"]))
            rows = []
            for c in a["checks"]:
                cells = [_e(x) for x in _check_row(c)]
                cells[-1] = f'<span class="{_check_class(c)}">{cells[-1]}</span>'
                rows.append(cells)
            body.append(_html_table(["Check", "Value", "Limit", "Margin", "Basis", "Result"], rows,
                                    raw_cols=tuple(range(6))))
            body.append("<ul>" + "".join(
                f'<li class="{_check_class(c)}">{_e(c.get("message") or c.get("name"))}</li>'
                for c in a["checks"]) + "</ul>")
        if a["parity"]:
            body.append(f"<p>{_e(_parity_text(a['parity']))}</p>")
        body += ["<p>Measured on the build host:</p>", _html_table(["Figure", "Value"], _host_rows(a["host"]))]
        if a["host"].get("basis"):
            body.append(f'<p class="basis">How: {_e(a["host"]["basis"])}</p>')
        body += [f"<p>Projected on {_e(r['target'])}:</p>",
                 _html_table(["Figure", "Value"], _projected_rows(a["projected"], a["footprint"]))]
        if a["projected"].get("basis"):
            body.append(f'<p class="basis">Model: {_e(a["projected"]["basis"])}</p>')
        if a["footprint"].get("basis"):
            body.append(f'<p class="basis">Memory: {_e(a["footprint"]["basis"])}</p>')
        if (a["projected"].get("energy") or {}).get("basis"):
            body.append(f'<p class="basis">Energy: {_e(a["projected"]["energy"]["basis"])}</p>')

    body.append("<h2>Quality on held-out prompts</h2>")
    cols = _quality_columns(r)
    qrows = _quality_rows(cols)
    if qrows:
        body += [_svg_quality(cols), _html_table(["Metric"] + [label for label, _ in cols], qrows)]
    else:
        body.append("<p>No quality figures were recorded.</p>")
    body += _evaluation_html(r)
    if r["progressive"]:
        body += ["<h2>Progressive compression</h2>", f"<p>{_e(_PROGRESSIVE_NOTE)}</p>",
                 _html_table(_PROGRESSIVE_HEADERS, _progressive_rows(r["progressive"]))]

    if r["host"]:
        rows = [[k, ", ".join(map(str, v)) if isinstance(v, list) else
                 (", ".join(f"{kk} {vv}" for kk, vv in v.items() if vv) if isinstance(v, dict) else str(v))]
                for k, v in r["host"].items() if v not in (None, [], {})]
        body += ["<h2>Build host</h2>", _html_table(None, rows)]
    if r["timings_s"]:
        rows = [[str(k), _f(v, "s")] for k, v in r["timings_s"].items()]
        rows.append(["total", _f(sum(_num(v) or 0 for v in r["timings_s"].values()), "s")])
        body += ["<h2>Stage timings</h2>", _html_table(["Stage", "Time"], rows)]

    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>edgedistill report: {_e(r['target'])}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


# ----------------------------------------------------------------------------------- across targets


def _tightest(report: dict) -> dict[str, dict]:
    """Per budget check name, the check with the least margin over the target's artifacts (failed ones
    first); the parity checks, which no target changes, are left out."""
    out: dict[str, dict] = {}
    for a in report["artifacts"]:
        for c in a["checks"]:
            if str(c.get("name")).startswith("parity_"):
                continue
            m = _num(c.get("margin_pct"))
            key = (bool(c.get("ok")), m if m is not None else -math.inf)
            prev = out.get(c.get("name"))
            if prev is None or key < prev["_key"]:
                out[c.get("name")] = {**c, "file": a["file"], "_key": key}
    return out


def _comparison_rows(reports: list[dict]) -> list[list[str]]:
    rows = []
    for r in reports:
        cal = r["calibration"]
        for name, c in _tightest(r).items():
            # value, limit, margin, basis and result as the target's own report shows them
            rows.append([r["target"], _CHECK_TITLES.get(name, str(name)), c["file"], *_check_row(c)[1:]])
        rows.append([r["target"], "Verdict", "", _verdict(r["ok"]), "", "", "",
                     "model trusted" if cal.get("trusted") else ("model NOT trusted" if cal else "")])
    return rows


_COMPARISON_HEADERS = ["Target", "Check", "Tightest artifact", "Value", "Limit", "Margin", "Basis", "Result"]
_COMPARISON_NOTE = ("Each target's tightest artifact per check (the least margin; a failed check first). Projected "
                    "figures come from each target's roofline model; artifact sizes are measured.")


def comparison_markdown(reports: list[dict]) -> str:
    rs = [_normalize(r) for r in reports]
    lines = ["# edgedistill: comparison across targets", "", _COMPARISON_NOTE, "",
             _md_table(["Target", "Verdict", "Artifacts", "Projection model"],
                       [[r["target"], _verdict(r["ok"]), str(len(r["artifacts"])),
                         r["calibration"].get("message") or "n/a"] for r in rs]), "",
             _md_table(_COMPARISON_HEADERS, _comparison_rows(rs)), ""]
    return "\n".join(lines).rstrip() + "\n"


def _svg_comparison(rs: list[dict]) -> str:
    """Margin of the tightest artifact per check, one bar per target, around the budget line (0%)."""
    tights = [_tightest(r) for r in rs]
    names = []
    for t in tights:
        names += [n for n in t if n not in names]
    if not names:
        return ""
    colors = [_ARTIFACT_COLORS[i % len(_ARTIFACT_COLORS)] for i in range(len(rs))]
    bar_h, x0, x1, w = 14, 210, 650, 780
    mid = (x0 + x1) / 2
    group_h = bar_h * len(rs) + 14
    h = 40 + group_h * len(names)
    parts = [f'<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" font-family="system-ui, sans-serif" '
             f'role="img" aria-label="margin per check and target">']
    for i, (r, color) in enumerate(zip(rs, colors)):
        parts.append(f'<rect x="{x0 + i * 150}" y="6" width="12" height="12" fill="{color}"/>'
                     f'<text x="{x0 + i * 150 + 16}" y="16" font-size="12">{_e(r["target"])}</text>')
    parts.append(f'<line x1="{mid}" y1="26" x2="{mid}" y2="{h - 4}" stroke="#1f2328" stroke-width="2" '
                 f'stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{mid - 4}" y="{h - 6}" font-size="11" text-anchor="end" fill="#57606a">budget</text>')
    for gi, name in enumerate(names):
        gy = 30 + gi * group_h
        parts.append(f'<text x="0" y="{gy + group_h / 2}" font-size="12">{_e(_CHECK_TITLES.get(name, str(name)))}</text>')
        for ti, (r, t, color) in enumerate(zip(rs, tights, colors)):
            c = t.get(name)
            y = gy + ti * bar_h
            if c is None:
                continue
            m = _num(c.get("margin_pct"))
            shown = max(-100.0, min(100.0, m)) if m is not None else 0.0  # the label carries the full figure
            width = (x1 - mid) * abs(shown) / 100.0
            x = mid if shown >= 0 else mid - width
            parts.append(f'<rect x="{x:.1f}" y="{y + 1}" width="{max(width, 1.0):.1f}" height="{bar_h - 3}" '
                         f'fill="{color}" stroke="{_GREEN if c.get("ok") else _RED}" stroke-width="1.5">'
                         f'<title>{_e(c.get("message") or "")}</title></rect>')
            parts.append(f'<text x="{x1 + 8}" y="{y + bar_h - 3}" font-size="10" '
                         f'fill="{_GREEN if c.get("ok") else _RED}">{_e(r["target"])} '
                         f'{_e(fmt_pct(m))}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def comparison_html(reports: list[dict]) -> str:
    rs = [_normalize(r) for r in reports]
    summary = [[_e(r["target"]), f'<span class="{"pass" if r["ok"] else "fail"}">{_verdict(r["ok"])}</span>',
                _e(str(len(r["artifacts"]))), _e(r["calibration"].get("message") or "n/a"),
                f'<a href="{_e(r["target"])}/{HTML_NAME}">{_e(r["target"])}/{HTML_NAME}</a>'] for r in rs]
    body = ["<h1>edgedistill: comparison across targets</h1>", f"<p>{_e(_COMPARISON_NOTE)}</p>",
            _html_table(["Target", "Verdict", "Artifacts", "Projection model", "Report"], summary,
                        raw_cols=(0, 1, 2, 3, 4)),
            "<h2>Margin per check (tightest artifact; bars capped at \u00b1100%)</h2>", _svg_comparison(rs),
            _html_table(_COMPARISON_HEADERS, _comparison_rows(rs))]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>edgedistill: comparison across targets</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def run(ctx) -> dict:
    """Stage `report`: assemble report.json (DESIGN.md schema) and manifest.json, render md/html."""
    import time

    from edgedistill import __version__
    from edgedistill.measure.profile import host_info

    plan = ctx["plan"].summary["plan"]
    teacher = ctx["teacher"].summary
    distilled = ctx["distill"].summary
    exported = ctx["export"].summary["artifacts"]
    artifacts = []
    for fmt, art in exported.items():
        host = ctx["profile"].summary["artifacts"][fmt]
        verdict = ctx["budget"].summary["artifacts"][fmt]
        proj = verdict["projected"]
        parity = ctx["verify"].summary["artifacts"][fmt]
        artifacts.append({
            "file": art["file"], "format": fmt, "bytes": art["bytes"], "sha256": _artifact_sha256(ctx["export"], art["file"]),
            "parity": parity,
            "host": host, "projected": {k: v for k, v in proj.items() if k != "footprint"},
            "footprint": proj["footprint"], "memory_tier": proj["memory_tier"],
            "host_validation": verdict["host_validation"],
            "quality": ctx["profile"].summary["quality"][fmt],
            "checks": verdict["checks"] + parity.get("checks", []),
            "ok": verdict["ok"] and all(c["ok"] for c in parity.get("checks", [])),
        })
    ok = all(a["ok"] for a in artifacts)
    report = {
        "schema_version": SCHEMA_VERSION,
        "target": ctx.target.name,
        "ok": ok,
        "teacher": {"id": teacher["id"], "params": teacher["params"], "fingerprint": teacher["fingerprint"]},
        "student": {"params": distilled["params"], "shape": plan["shape"], "format": plan["format"],
                    "context": plan["context"], "compression": plan["compression"],
                    "layer_map": ctx["init"].summary["layer_map"], "init_rule": ctx["init"].summary["rule"],
                    "plan_checks": plan["checks"], "plan_why": plan["why"],
                    "group_bits": plan["group_bits"]},
        "quality": distilled["quality"] | {"basis": "held-out prompts answered by the teacher: next-token top-1 "
                                           "agreement with the teacher, KL(teacher || model), perplexity of the "
                                           "teacher's answers; answer tokens only"},
        "training": distilled["train"],
        "progressive": progressive_stages(teacher, ctx["init"].summary, distilled, plan),
        "artifacts": artifacts,
        "evaluation": evaluation_section(distilled, artifacts, ctx["evaluate"].summary),
        "target_profile": ctx.target.model_dump(mode="json"),
        "host": ctx["profile"].summary.get("host") or host_info(),
        "calibration": ctx["budget"].summary["calibration"],
        "strict": ctx["budget"].summary["strict"],
        "timings_s": {name: round(rec.seconds, 2) for name, rec in ctx.upstream.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "edgedistill_version": __version__,
        "config_hash": ctx.cfg.section_hash("teacher", "plan", "data", "distill", "export", "eval", "seed"),
    }
    write_reports(report, ctx.dir)
    atomic.write_json(ctx.dir / MANIFEST, manifest_for(report, ctx.upstream, ctx.dir / JSON_NAME))
    failed = [f"{a['file']}: {c.get('message') or c['name']}" for a in artifacts for c in a["checks"] if not c["ok"]]
    warned = sorted({c["message"] for a in artifacts for c in a["checks"] if c.get("raised") and c.get("ok")})
    return {"ok": ok, "failed": failed, "flags": warned}


def evaluation_section(distilled: dict, artifacts: list[dict], evaluated: dict) -> dict:
    from edgedistill.evaluate.render import section

    return section(distilled, artifacts, evaluated)


def progressive_stages(teacher: dict, init: dict, distilled: dict, plan: dict) -> list[dict]:
    """Per-stage figures of a progressive build, from the teacher to the final student; [] for a one-cut build."""
    from dataclasses import asdict

    from edgedistill.plan import teacher_shape

    if not init["progressive"]:
        return []
    train = distilled["train"]
    return [
        {"stage": "teacher", "params": teacher["params"], "shape": asdict(teacher_shape(teacher["config"])),
         "steps": None, "tokens": None, "quality": distilled["quality"]["teacher"]},
        *({"stage": f"intermediate {i}", **{k: s[k] for k in ("params", "shape", "steps", "tokens", "quality")}}
          for i, s in enumerate(init["progressive"], 1)),
        {"stage": "student", "params": distilled["params"], "shape": plan["shape"], "steps": train["steps"],
         "tokens": train["tokens"], "quality": distilled["quality"]["student"]},
    ]


def _artifact_sha256(export, name: str) -> str:
    """The artifact's sha256 as manifest.artifact_sha256 computes it (an ONNX folder's folder_sha256),
    from the hashes the pipeline took when the export stage finished: no file is read again."""
    from edgedistill.export.manifest import folder_sha256

    if name in export.outputs:
        return export.outputs[name]
    prefix = name + "/"
    return folder_sha256({rel[len(prefix):]: digest for rel, digest in export.outputs.items() if rel.startswith(prefix)})


def published_sources(records: dict) -> dict[str, Path]:
    """What the build's stages publish into OUT/<target>/ (name -> stage file or folder), reports aside."""
    from edgedistill.verify import TOKENS_FILE

    files = {"student": records["distill"].path("student"), TOKENS_FILE: records["verify"].path(TOKENS_FILE)}
    for art in records["export"].summary["artifacts"].values():
        files[art["file"]] = records["export"].path(art["file"])
    return files


def files_to_publish(records: dict) -> dict[str, Path]:
    """What lands in OUT/<target>/: the student, each artifact, the parity tokens, the manifest and the reports."""
    files = published_sources(records)
    for name in (MANIFEST, JSON_NAME, MD_NAME, HTML_NAME):
        files[name] = records["report"].path(name)
    return files


def manifest_for(report: dict, upstream: dict, report_json: Path) -> dict:
    """manifest.json (export/manifest.py): every published file with size and sha256, and per artifact
    what `edgedistill verify` needs to re-run the parity gate on the published folder alone."""
    from edgedistill.formats import FORMATS

    verify = upstream["verify"].summary
    known = {rec.path(rel).resolve(): sha for rec in upstream.values() for rel, sha in rec.outputs.items()}
    artifacts = []
    for a in report["artifacts"]:
        parity = a["parity"]
        artifacts.append({
            "file": a["file"], "format": a["format"], "runtime": FORMATS[a["format"]].runtime, "bytes": a["bytes"],
            "sha256": a["sha256"], "context": report["student"]["context"], "quant": parity["quant"],
            "parity": {"top1_agreement": parity["top1_agreement"], "kl": parity["kl"],
                       "weights_ok": parity["weights"]["ok"], "ok": all(c["ok"] for c in parity["checks"])},
        })
    return {
        "manifest_version": MANIFEST_VERSION, "target": report["target"], "teacher": report["teacher"]["id"],
        "config_hash": report["config_hash"], "edgedistill_version": report["edgedistill_version"],
        "student": "student", "artifacts": artifacts,
        "parity": {"tokens_file": verify["tokens_file"], **verify["bounds"]},
        "files": entries(published_sources(upstream) | {JSON_NAME: report_json}, known),
    }
