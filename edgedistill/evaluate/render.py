"""The report's evaluation section (report.json "evaluation"), as Markdown and HTML: the per-category
scorecard, the checkable tasks with their 95% intervals, generalization, calibration with its
reliability diagram, degeneration, the student as a speculative draft, the flags and refinement."""

from __future__ import annotations

from edgedistill.report import _e, _f, _html_table, _md_table, _pct

_MODEL_LABELS = {"teacher": "teacher", "student_init": "student (untrained)", "student": "student (distilled)"}


def _label(name: str) -> str:
    return _MODEL_LABELS.get(name, f"{name} (runtime)")


def _ci(score: dict) -> str:
    lo, hi = score.get("ci95") or (None, None)
    return f"{_pct(score.get('accuracy'))} [{_pct(lo)}, {_pct(hi)}] ({score.get('correct')}/{score.get('n')})"


def scorecard_rows(sc: dict) -> list[list[str]]:
    """One row per category: each model's top-1 agreement, perplexity and retention."""
    rows = []
    for cat in sc.get("categories", []):
        row = [cat]
        for name, cats in sc["models"].items():
            f = cats.get(cat) or {}
            row.append(f"ret {_f(f.get('retention'))} · ppl {_f(f.get('perplexity'))} · "
                       f"lik {_f(f.get('likelihood_retention'))}")
        rows.append(row)
    means = sc.get("mean_retention") or {}
    rows.append(["mean retention"] + [_f(means.get(name)) for name in sc["models"]])
    return rows


def task_rows(t: dict) -> list[list[str]]:
    families = sorted({fam for name in ("teacher", "student") for mode in ("direct", "step_by_step")
                       for fam in (t.get(name, {}).get(mode, {}).get("by_family") or {})})
    rows = []
    for mode in ("direct", "step_by_step"):
        diff = (t.get("difference") or {}).get(mode) or {}
        lo, hi = diff.get("ci95") or (None, None)
        rows.append([f"all ({mode.replace('_', ' ')})", _ci(t["teacher"][mode]), _ci(t["student"][mode]),
                     f"{_f(diff.get('difference'))} [{_f(lo)}, {_f(hi)}]"])
        for fam in families:
            rows.append([f"  {fam} ({mode.replace('_', ' ')})",
                         _ci(t["teacher"][mode]["by_family"].get(fam, {})),
                         _ci(t["student"][mode]["by_family"].get(fam, {})), ""])
    return rows


def _calibration_rows(c: dict) -> list[list[str]]:
    labels = {"student_vs_teacher": "student against the teacher's choices (held-out answers)",
              "student_vs_text": "student against the real text (generalization corpus)",
              "teacher_vs_text": "teacher against the real text (reference)"}
    return [[label, _f((c.get(k) or {}).get("ece")), str((c.get(k) or {}).get("positions", "n/a"))]
            for k, label in labels.items() if c.get(k)]


def _degeneration_rows(d: dict) -> list[list[str]]:
    return [[name, _f(d[name].get("distinct_1")), _f(d[name].get("distinct_2")), _pct(d[name].get("loop_fraction")),
             str(d[name].get("generations"))] for name in ("teacher", "student") if d.get(name)]


def _speculative_text(s: dict) -> str:
    a, sp = s.get("acceptance") or {}, s.get("speedup") or {}
    return (f"The distilled student as a greedy draft for the teacher, k = {a.get('k')}: acceptance rate "
            f"{_pct(a.get('acceptance_rate'))} ({a.get('accepted')}/{a.get('proposed')} draft tokens), "
            f"{_f(a.get('tokens_per_target_call'))} tokens per teacher call. Measured on this host with "
            f"transformers' assisted generation: {_f(sp.get('plain_tok_s'))} tok/s plain, "
            f"{_f(sp.get('assisted_tok_s'))} tok/s with the draft, speed-up {_f(sp.get('speedup'))}x "
            f"({sp.get('threads')} threads; same output: {sp.get('same_output')}).")


def refine_rows(refine: dict) -> tuple[list[str], list[list[str]]]:
    rounds = [r["round"] for r in refine.get("rounds", [])]
    headers = ["category", "before"] + [f"after round {r}" for r in rounds]
    rows = [[row["category"], _f(row.get("before"))] + [_f(row.get(f"round_{r}")) for r in rounds]
            for row in refine.get("table", [])]
    return headers, rows


def _refine_notes(refine: dict) -> list[str]:
    notes = []
    for r in refine.get("rounds", []):
        verdict = "kept" if r["kept"] else f"rolled back (it collapsed {', '.join(r['new_collapses'])})"
        notes.append(f"round {r['round']}: weakest {', '.join(r['weakest'])}; {r['new_teacher_answers']} new teacher "
                     f"answers, {r['examples']} examples, {r['steps']} steps; {verdict}")
    return notes


_REFINE_NOTE = ("The held-out examples choose each round's categories and decide a rollback, so the figures after "
                "refinement are somewhat optimistic; the checkable tasks and the generalization corpus are not "
                "used by refinement.")
_SCORECARD_NOTE = ("Per prompt category, on the held-out teacher answers: retention (top-1 agreement with the teacher "
                   "over the teacher's own, 1 = keeps every choice), perplexity, and likelihood retention (teacher "
                   "perplexity / model perplexity).")
_TASK_NOTE = ("Exact match on greedy generations; 95% Wilson intervals; the last column is teacher minus student "
              "accuracy on the same tasks with its paired 95% interval.")


def markdown(ev: dict) -> list[str]:
    if not ev:
        return []
    lines = ["## What the student kept (evaluation)", ""]
    flags = ev.get("flags") or []
    lines += [f"- {'ok' if f['ok'] else 'FLAG'}: {f['message']}" for f in flags] + ([""] if flags else [])
    sc = ev.get("scorecard")
    if sc and sc.get("categories"):
        lines += ["### Per-capability scorecard", "", _SCORECARD_NOTE, "",
                  _md_table(["category"] + [_label(n) for n in sc["models"]], scorecard_rows(sc)), ""]
    t = ev.get("tasks")
    if t:
        lines += [f"### Checkable tasks ({t['tasks']} tasks)", "", _TASK_NOTE, "",
                  _md_table(["tasks", "teacher", "student", "teacher − student"], task_rows(t)), ""]
    g = ev.get("generalization")
    if g:
        lines += ["### Generalization", "", f"Perplexity on {g['sequences']} sequences ({g['tokens']} tokens) of "
                  f"{g['corpus']}, which no training path reads.", "",
                  _md_table(["model", "perplexity"], [[_label(k), _f(v)] for k, v in g["perplexity"].items()]), ""]
    c = ev.get("calibration")
    if c:
        lines += ["### Calibration", "", f"Expected calibration error of the top next-token probability, "
                  f"{c.get('bins')} equal-width bins.", "",
                  _md_table(["against", "ECE", "positions"], _calibration_rows(c)), ""]
    d = ev.get("degeneration")
    if d:
        lines += ["### Degeneration", "", f"Greedy answers to the held-out prompts (up to {d.get('max_new_tokens')} "
                  "tokens); the teacher's are its own answers in the data.", "",
                  _md_table(["model", "distinct-1", "distinct-2", "with a loop", "answers"],
                            _degeneration_rows(d)), ""]
    s = ev.get("speculative")
    if s:
        lines += ["### The student as a speculative draft", "", _speculative_text(s), ""]
    refine = ev.get("refine")
    if refine:
        headers, rows = refine_rows(refine)
        lines += ["### Refinement (retention per category)", "", _REFINE_NOTE, "", _md_table(headers, rows), ""]
        lines += [f"- {n}" for n in _refine_notes(refine)] + [""]
    return lines


def svg_reliability(curves: dict[str, dict]) -> str:
    """A reliability diagram: per bin, accuracy against mean confidence, one line per curve, the
    diagonal for perfect calibration; dot area follows the bin's share of positions."""
    size, pad = 300, 40
    colors = ("#1a7f37", "#0969da", "#6e7781")

    def xy(conf: float, acc: float) -> tuple[float, float]:
        return pad + conf * size, pad + (1 - acc) * size

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size + 2 * pad + 330}" height="{size + 2 * pad}" '
             f'role="img" aria-label="reliability diagram">',
             f'<rect x="{pad}" y="{pad}" width="{size}" height="{size}" fill="none" stroke="#d0d7de"/>',
             f'<line x1="{pad}" y1="{pad + size}" x2="{pad + size}" y2="{pad}" stroke="#8c959f" stroke-dasharray="4 3"/>',
             f'<text x="{pad + size / 2}" y="{size + 2 * pad - 8}" text-anchor="middle" font-size="12">confidence</text>',
             f'<text x="12" y="{pad + size / 2}" font-size="12" transform="rotate(-90 12 {pad + size / 2})" '
             f'text-anchor="middle">accuracy</text>']
    for i, (label, rel) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        bins = [b for b in rel.get("bins", []) if b.get("count")]
        total = sum(b["count"] for b in bins) or 1
        points = [xy(b["confidence"], b["accuracy"]) for b in bins]
        if len(points) > 1:
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="'
                         + " ".join(f"{x:.1f},{y:.1f}" for x, y in points) + '"/>')
        for (x, y), b in zip(points, bins):
            r = 2 + 8 * (b["count"] / total) ** 0.5
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" fill="{color}" fill-opacity="0.6">'
                         f'<title>{_e(label)}: confidence {b["confidence"]:.3f}, accuracy {b["accuracy"]:.3f}, '
                         f'{b["count"]} positions</title></circle>')
        ly = pad + 14 + 20 * i
        parts += [f'<rect x="{size + pad + 20}" y="{ly - 9}" width="12" height="12" fill="{color}"/>',
                  f'<text x="{size + pad + 38}" y="{ly + 1}" font-size="12">{_e(label)} (ECE {_f(rel.get("ece"))})</text>']
    parts.append("</svg>")
    return "\n".join(parts)


def html(ev: dict) -> list[str]:
    if not ev:
        return []
    body = ["<h2>What the student kept (evaluation)</h2>"]
    flags = ev.get("flags") or []
    if flags:
        body.append("<ul>" + "".join(f'<li class="{"pass" if f["ok"] else "fail"}">{_e(f["message"])}</li>'
                                     for f in flags) + "</ul>")
    sc = ev.get("scorecard")
    if sc and sc.get("categories"):
        body += ["<h3>Per-capability scorecard</h3>", f'<p class="basis">{_e(_SCORECARD_NOTE)}</p>',
                 _html_table(["category"] + [_label(n) for n in sc["models"]], scorecard_rows(sc))]
    t = ev.get("tasks")
    if t:
        body += [f"<h3>Checkable tasks ({t['tasks']} tasks)</h3>", f'<p class="basis">{_e(_TASK_NOTE)}</p>',
                 _html_table(["tasks", "teacher", "student", "teacher − student"], task_rows(t))]
    g = ev.get("generalization")
    if g:
        body += ["<h3>Generalization</h3>",
                 f"<p>Perplexity on {g['sequences']} sequences ({g['tokens']} tokens) of {_e(g['corpus'])}, "
                 "which no training path reads.</p>",
                 _html_table(["model", "perplexity"], [[_label(k), _f(v)] for k, v in g["perplexity"].items()])]
    c = ev.get("calibration")
    if c:
        curves = {label: c[k] for k, label in (("student_vs_teacher", "student vs teacher's choice"),
                                               ("student_vs_text", "student vs real text"),
                                               ("teacher_vs_text", "teacher vs real text")) if c.get(k)}
        body += ["<h3>Calibration</h3>", svg_reliability(curves),
                 _html_table(["against", "ECE", "positions"], _calibration_rows(c))]
    d = ev.get("degeneration")
    if d:
        body += ["<h3>Degeneration</h3>", _html_table(["model", "distinct-1", "distinct-2", "with a loop",
                                                        "answers"], _degeneration_rows(d))]
    s = ev.get("speculative")
    if s:
        body += ["<h3>The student as a speculative draft</h3>", f"<p>{_e(_speculative_text(s))}</p>"]
    refine = ev.get("refine")
    if refine:
        headers, rows = refine_rows(refine)
        body += ["<h3>Refinement (retention per category)</h3>", f'<p class="basis">{_e(_REFINE_NOTE)}</p>',
                 _html_table(headers, rows),
                 "<ul>" + "".join(f"<li>{_e(n)}</li>" for n in _refine_notes(refine)) + "</ul>"]
    return body


def section(distilled: dict, artifacts: list[dict], evaluated: dict) -> dict:
    """report.json's "evaluation": the scorecard of every model and artifact, the evaluate stage's
    findings and the refinement rounds."""
    from edgedistill.evaluate.scorecard import table

    q = distilled["quality"]
    models = {k: q.get(k) for k in ("teacher", "student_init", "student")}
    models |= {a["format"]: a.get("quality") for a in artifacts}
    return {"scorecard": table(models, q["teacher"]), **evaluated, "refine": distilled.get("refine")}
