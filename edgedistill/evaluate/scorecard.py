"""The per-capability scorecard: each model's held-out figures per prompt category, and its retention.

Retention of a category is the share of the teacher's next-token choices the model keeps: its top-1
agreement with the teacher on that category's held-out teacher answers, over the teacher's own (1 on
its own greedy answers, so the ratio is the agreement itself). Agreement, not the perplexity ratio,
because it is bounded and counts every position alike: perplexity is an exponential of the mean
cross-entropy, so a long free-form answer's few near-arbitrary tokens (a summary's wording) can
multiply it without any capability being lost. The likelihood ratio (teacher perplexity / model
perplexity) is kept beside it as `likelihood_retention`.

A category has collapsed when its retention falls below `ratio` times the mean retention over the
categories: the average hides it, the ratio finds it whatever the student's overall level.
"""

from __future__ import annotations


def retention(model: dict, teacher: dict) -> float | None:
    """model top-1 agreement / the teacher's own, on the same examples (None where either is missing)."""
    if model.get("top1_agreement") is None or not teacher.get("top1_agreement"):
        return None
    return model["top1_agreement"] / teacher["top1_agreement"]


def likelihood_retention(model: dict, teacher: dict) -> float | None:
    """teacher perplexity / model perplexity: the share of the teacher's per-token likelihood kept."""
    if not model.get("perplexity") or not teacher.get("perplexity"):
        return None
    return teacher["perplexity"] / model["perplexity"]


def by_category(model_quality: dict, teacher_quality: dict) -> dict[str, dict]:
    """{category: {top1_agreement, kl, perplexity, tokens, retention}} of one model."""
    teacher_cats = teacher_quality.get("by_category") or {}
    out = {}
    for cat, figures in (model_quality.get("by_category") or {}).items():
        t = teacher_cats.get(cat, {})
        out[cat] = {**figures, "retention": retention(figures, t), "likelihood_retention": likelihood_retention(figures, t)}
    return out


def table(models: dict[str, dict], teacher_quality: dict) -> dict:
    """The scorecard of several models (name -> its quality dict with by_category) against the teacher:
    {"categories": [...], "models": {name: {category: figures + retention}}, "mean_retention": {name: x}}."""
    rows = {name: by_category(q, teacher_quality) for name, q in models.items() if q and q.get("by_category")}
    cats = sorted({c for r in rows.values() for c in r})
    mean = {}
    for name, r in rows.items():
        values = [v["retention"] for v in r.values() if v["retention"] is not None]
        mean[name] = sum(values) / len(values) if values else None
    return {"categories": cats, "models": rows, "mean_retention": mean}


def collapsed(categories: dict[str, dict], ratio: float) -> dict:
    """Categories whose retention is below ratio x the mean retention over categories:
    {"mean_retention", "threshold", "categories": {category: retention}, "ok"}."""
    values = {c: f["retention"] for c, f in categories.items() if f.get("retention") is not None}
    if not values:
        return {"mean_retention": None, "threshold": None, "categories": {}, "ok": True}
    mean = sum(values.values()) / len(values)
    threshold = ratio * mean
    low = {c: r for c, r in sorted(values.items()) if r < threshold}
    return {"mean_retention": mean, "threshold": threshold, "categories": low, "ok": not low}


def weakest(categories: dict[str, dict], n: int) -> list[str]:
    """The n categories with the lowest retention (ties by name, for a stable choice)."""
    ranked = sorted((f["retention"], c) for c, f in categories.items() if f.get("retention") is not None)
    return [c for _, c in ranked[:n]]
