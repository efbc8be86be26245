"""Budget checks: one artifact's measured and projected figures against a target's thresholds.

Every check is a plain dict:
    {"name", "value", "limit", "unit", "op", "ok", "margin_pct", "basis", "message"}
`op` is "<=" (value must not exceed limit) or ">=" (value must reach limit); `margin_pct` is the
headroom relative to the limit, positive when the budget is met and negative when it is missed;
`basis` is "projected" (from measure.project) or "measured" (e.g. the artifact's file size).
Projected speed and energy checks also carry `trusted` and `host_error_pct`: whether the model behind
the figure predicted this host's own measurements within measure.project.TRUST_BOUND_PCT. Under
--strict (config `strict = true`) an untrusted figure fails, whatever its margin.
"""

from __future__ import annotations

import math

from edgedistill.targets import GB, TargetProfile

MB = 1e6

# name -> (label used in messages, unit)
_LABELS = {
    "footprint_mb": ("memory", "MB"),
    "artifact_mb": ("artifact", "MB"),
    "decode_tok_s": ("decode", "tok/s"),
    "ttft_ms": ("time to first token", "ms"),
    "energy_j_per_100_tokens": ("energy", "J/100 tokens"),
    "battery_pct_per_hour": ("battery use in chat", "%/hour"),
}


def fmt_num(x: float | None) -> str:
    """About three significant digits, never scientific notation: 6.2, 10, 183, 1730, 0.0123."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if x == 0:
        return "0"
    decimals = max(0, 2 - math.floor(math.log10(abs(x))))
    s = f"{x:.{decimals}f}"
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return s


def fmt_pct(p: float | None) -> str:
    if p is None:
        return "n/a"
    sign = "+" if p >= 0 else "\u2212"  # a real minus sign, as in the report text
    return f"{sign}{fmt_num(abs(p))}%"


def _check(name: str, value: float | None, limit: float, op: str, basis: str, where: str, detail: str = "") -> dict:
    label, unit = _LABELS[name]
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return {"name": name, "value": None, "limit": limit, "unit": unit, "op": op, "ok": False,
                "margin_pct": None, "basis": basis,
                "message": f"{label}: no {basis} value on {where}; "
                           f"the {fmt_num(limit)} {unit} budget cannot be checked"}
    if op == "<=":
        ok = value <= limit
        margin = (limit - value) / limit * 100.0
        rel, need = ("\u2264" if ok else ">"), ("budget" if unit == "MB" else "allowed")
    else:
        ok = value >= limit
        margin = (value - limit) / limit * 100.0
        rel, need = ("\u2265" if ok else "<"), "required"
    message = (f"{label} {fmt_num(value)} {unit} {basis} on {where}{detail} {rel} {fmt_num(limit)} "
               f"{'' if op == '>=' else unit + ' '}{need} ({fmt_pct(margin)})")
    return {"name": name, "value": value, "limit": limit, "unit": unit, "op": op, "ok": bool(ok),
            "margin_pct": round(margin, 2), "basis": basis, "message": message}


def check_artifact(target: TargetProfile, *, artifact_bytes: int, projected: dict, footprint: dict) -> list[dict]:
    """Every budget of `target` for one artifact. `projected` and `footprint` come from measure.project."""
    b = target.budget
    where = target.name
    checks = [
        _check("footprint_mb", footprint.get("total_mb"), b.memory_gb * GB / MB, "<=", "projected", where,
               " (weights + KV cache + runtime)"),
        _check("artifact_mb", artifact_bytes / MB if artifact_bytes is not None else None, b.artifact_gb * GB / MB,
               "<=", "measured", where, " (file size)"),
        _check("decode_tok_s", projected.get("decode_tok_s"), b.min_decode_tok_s, ">=", "projected", where),
        _check("ttft_ms", projected.get("ttft_ms"), b.max_ttft_s * 1000.0, "<=", "projected", where,
               f" for {b.prompt_tokens} prompt tokens"),
    ]
    if b.max_energy_j_per_100_tok is not None:
        checks.append(_check("energy_j_per_100_tokens", projected.get("energy_j_per_100_tokens"),
                             b.max_energy_j_per_100_tok, "<=", "projected", where))
    if b.max_battery_pct_per_hour is not None:
        checks.append(_check("battery_pct_per_hour", projected.get("battery_pct_per_hour"),
                             b.max_battery_pct_per_hour, "<=", "projected", where))
    return checks


# Which speed model each projected figure comes from: the host check validates these models, and
# --strict fails a figure whose model missed the host's own measurements.
MODELS_OF_CHECK = {
    "decode_tok_s": ("decode",),
    "ttft_ms": ("prefill",),
    "energy_j_per_100_tokens": ("decode",),
    "battery_pct_per_hour": ("decode", "prefill"),
}


def apply_host_trust(checks: list[dict], validation: dict, *, strict: bool) -> list[dict]:
    """Copies of `checks` marked with the host error of the model behind each projected figure.

    A projected check gains `trusted` (True/False) and `host_error_pct` (the worst of its models).
    Untrusted, its message says so; with `strict` it also fails, whatever its margin. A model the
    host could not validate (no measurement) counts as untrusted. Other checks pass through as they are.
    """
    out = []
    for c in checks:
        c = dict(c)
        models = MODELS_OF_CHECK.get(c["name"]) if c.get("basis") == "projected" else None
        if models:
            errors = {m: validation["error_pct"].get(m) for m in models}
            trusted = all(validation["trusted"].get(m) for m in models)
            known = [e for e in errors.values() if e is not None]
            c["trusted"] = trusted
            c["host_error_pct"] = max(known, key=abs) if known else None
            if not trusted:
                why = "; ".join(f"the {m} model's host error is {fmt_pct(e)}" if e is not None
                                else f"the {m} model could not be checked on this host" for m, e in errors.items()
                                if not validation["trusted"].get(m))
                bound = f"\u00b1{fmt_num(validation['bound_pct'])}%"
                if strict:
                    c["ok"] = False
                    c["message"] += f"; fails under --strict: {why} (outside {bound})"
                else:
                    c["message"] += f"; untrusted: {why} (outside {bound})"
        out.append(c)
    return out


def all_ok(checks: list[dict]) -> bool:
    return all(c.get("ok") for c in checks)


def failures(checks: list[dict]) -> list[str]:
    """The messages of the checks that failed, for the CLI's one-line summary and exit code 1."""
    return [c["message"] for c in checks if not c.get("ok")]


def measured_kv_tokens(measured: dict) -> float:
    """Average cached context while the host measured decode: the prompt plus half the generated tokens."""
    tokens = (measured.get("stats") or {}).get("tokens") or {}
    generated = tokens.get("median") or measured.get("new_tokens") or 0
    return measured["prompt_tokens"] + generated / 2


def failure_flags(ctx, fmt: str) -> list[dict]:
    """The failure-mode flags as checks of one artifact: capability collapse on the artifact's own
    per-category figures (its runtime's, from the profile stage), and the evaluate stage's flags of
    the float student it was cut from (reasoning degradation, degeneration).

    A raised flag (`raised`) warns, as an untrusted projection does: what the student lost is a
    finding, not a broken budget, so it fails the build only under --strict, where it must not pass."""
    from edgedistill.evaluate.scorecard import by_category
    from edgedistill.evaluate.stage import collapse_flag

    teacher = ctx["distill"].summary["quality"]["teacher"]
    cats = by_category(ctx["profile"].summary["quality"][fmt], teacher)
    flags = [collapse_flag(cats, ctx.cfg.eval.collapse_ratio, fmt),
             *(f for f in ctx["evaluate"].summary["flags"] if f["name"] != "capability_collapse")]
    out = []
    for f in flags:
        f = {**f, "raised": not f["ok"]}
        if f["raised"]:
            f["ok"] = not ctx.cfg.strict
            f["message"] += "; fails under --strict" if ctx.cfg.strict else " (a warning; --strict fails on it)"
        out.append(f)
    return out


def raised_flags(checks: list[dict]) -> list[str]:
    """The messages of the flags raised but passed as warnings (not under --strict), for the CLI."""
    return [c["message"] for c in checks if c.get("raised") and c.get("ok")]


def run(ctx) -> dict:
    """Stage `budget`: check the projection model on this host, project every artifact to the target and
    check each budget, with margins (and, under --strict, the model's host error)."""
    from edgedistill.measure import project as projection

    plan = ctx["plan"].summary["plan"]
    s = plan["shape"]
    kvt = projection.kv_bytes_per_token(s["layers"], s["kv_heads"], s["head_dim"])
    profiled = ctx["profile"].summary
    calibration = profiled["calibration"]
    results = {}
    for fmt, art in ctx["export"].summary["artifacts"].items():
        # The whole artifact (weights, scales, tokenizer) is what is read and held: a conservative weight size.
        proj = projection.project(ctx.target, weight_bytes=art["bytes"], params=plan["params"],
                                  kv_bytes_per_token=kvt, context=plan["context"])
        measured = profiled["artifacts"][fmt]
        on_host = projection.predict_on_host(calibration, ctx.target, weight_bytes=art["bytes"], params=plan["params"],
                                             kv_bytes_per_token=kvt, kv_tokens=measured_kv_tokens(measured))
        validation = projection.validate_on_host(on_host, measured, calibration=calibration, target=ctx.target)
        checks = check_artifact(ctx.target, artifact_bytes=art["bytes"], projected=proj, footprint=proj["footprint"])
        checks = apply_host_trust(checks, validation, strict=ctx.cfg.strict) + failure_flags(ctx, fmt)
        results[fmt] = {"projected": proj, "host_validation": validation, "checks": checks, "ok": all_ok(checks)}
    return {"artifacts": results, "ok": all(r["ok"] for r in results.values()), "strict": ctx.cfg.strict,
            "calibration": {"host": calibration,
                            **projection.trust_summary({f: r["host_validation"] for f, r in results.items()})}}
