"""Stage `evaluate`: what distillation broke, beyond the held-out averages.

- checkable tasks (tasks.py): teacher and student, direct and step by step, exact match on greedy
  generations, accuracy with 95% intervals and the paired teacher - student difference;
- generalization (corpus.py): perplexity on human-written text that no training path reads;
- calibration (calibration.py): ECE of the student's next-token probabilities against the teacher's
  choices (held-out answers) and against the real text (the generalization corpus), with the bins of
  a reliability diagram; the teacher's own, against the text, for reference;
- degeneration (degeneration.py): loops and distinct-n of the student's answers to held-out prompts,
  beside the same figures of the teacher's answers;
- speculative decoding (speculative.py): the student as the teacher's greedy draft, its acceptance
  rate and the end-to-end speed-up measured on this host;
- the failure-mode flags, each against its threshold in the eval section.

The per-category scorecard is measured where the models already run: the distill stage (teacher,
untrained and distilled student) and the profile stage (each artifact in its runtime).
"""

from __future__ import annotations

from edgedistill.data.prompts import Prompt
from edgedistill.data.teacher_answers import chat_ids, eos_ids, generate_answers, read_jsonl, write_jsonl
from edgedistill.evaluate import scorecard
from edgedistill.measure.quality import heldout_examples
from edgedistill.progress import task_progress


def flag(name: str, value, limit, op: str, ok: bool, message: str) -> dict:
    """A failure-mode flag as a budget check (budget.py's shape), basis "evaluated"."""
    return {"name": name, "value": value, "limit": limit, "unit": "", "op": op, "ok": bool(ok),
            "margin_pct": None, "basis": "evaluated", "message": message}


def collapse_flag(categories: dict[str, dict], ratio: float, where: str) -> dict:
    c = scorecard.collapsed(categories, ratio)
    low = ", ".join(f"{k} {v:.3f}" for k, v in c["categories"].items())
    if c["mean_retention"] is None:
        return flag("capability_collapse", None, ratio, ">=", True, f"capability collapse: no categories on {where}")
    text = (f"capability collapse on {where}: retention {low} < {c['threshold']:.3f} "
            f"({ratio:g} x mean {c['mean_retention']:.3f})" if low else
            f"capability collapse: none on {where} (every category's retention >= {c['threshold']:.3f}, "
            f"{ratio:g} x mean {c['mean_retention']:.3f})")
    worst = min((f["retention"] for f in categories.values() if f.get("retention") is not None), default=None)
    return flag("capability_collapse", worst, c["threshold"], ">=", c["ok"], text) | {"collapsed": c["categories"]}


def reasoning_flag(tasks: dict, limit: float) -> dict:
    """Step-by-step accuracy lost (teacher - student) beyond the direct accuracy lost; raised only when
    that step-by-step loss is also beyond its paired 95% interval, so a few tasks' noise is not a flag."""
    drop = {m: tasks["teacher"][m]["accuracy"] - tasks["student"][m]["accuracy"] for m in ("direct", "step_by_step")}
    excess = drop["step_by_step"] - drop["direct"]
    lo = ((tasks.get("difference") or {}).get("step_by_step") or {}).get("ci95", [None])[0]
    beyond_noise = lo is None or lo > 0
    ok = excess <= limit or not beyond_noise
    noise = "" if beyond_noise else " (within the paired 95% interval: not flagged)"
    return flag("reasoning_degradation", excess, limit, "<=", ok,
                f"reasoning degradation: step-by-step accuracy drops {drop['step_by_step']:+.3f} vs direct "
                f"{drop['direct']:+.3f} (teacher - student), excess {excess:+.3f} "
                f"{'<=' if excess <= limit else '>'} {limit:g}{noise}")


def degeneration_flags(student: dict, teacher: dict, e) -> list[dict]:
    """Loops and distinct-2 of the student's answers against the teacher's own: distillation broke
    what the student does worse than the model it copies."""
    flags = []
    if student["loop_fraction"] is None or teacher["loop_fraction"] is None:  # no answers: nothing can loop
        flags.append(flag("degeneration_loops", None, e.max_loop_fraction, "<=", True,
                          "degeneration: no answers to look for loops in"))
    else:
        excess = student["loop_fraction"] - teacher["loop_fraction"]
        ok = excess <= e.max_loop_fraction
        flags.append(flag("degeneration_loops", excess, e.max_loop_fraction, "<=", ok,
                          f"degeneration: {student['loop_fraction']:.0%} of the student's answers hold a repeated "
                          f"n-gram loop, the teacher's {teacher['loop_fraction']:.0%} (excess {excess:+.0%} "
                          f"{'<=' if ok else '>'} {e.max_loop_fraction:.0%} allowed)"))
    if not student["distinct_2"] or not teacher["distinct_2"]:  # answers of one token or none: no bigrams
        flags.append(flag("degeneration_distinct_2", None, e.min_distinct_2_ratio, ">=", True,
                          "degeneration: the answers are too short to count distinct bigrams"))
    else:
        ratio = student["distinct_2"] / teacher["distinct_2"]
        ok = ratio >= e.min_distinct_2_ratio
        flags.append(flag("degeneration_distinct_2", ratio, e.min_distinct_2_ratio, ">=", ok,
                          f"degeneration: distinct-2 of the student's answers {student['distinct_2']:.3f}, "
                          f"{ratio:.2f}x the teacher's {teacher['distinct_2']:.3f} "
                          f"({'>=' if ok else '<'} {e.min_distinct_2_ratio:g}x required)"))
    return flags


def _answer_ids(tok, records: list[dict]) -> list[list[int]]:
    return [tok(r["answer"], add_special_tokens=False)["input_ids"] for r in records]


def run(ctx) -> dict:
    from edgedistill.distill.stage import load_student
    from edgedistill.evaluate import calibration, corpus, degeneration, speculative, tasks

    cfg, e = ctx.cfg, ctx.cfg.eval
    teacher, tok = ctx.session.teacher(ctx["teacher"])
    device = next(teacher.parameters()).device  # training may have moved it to an accelerator
    student = load_student(ctx["distill"].path("student")).to(device)
    init = load_student(ctx["init"].path("student")).to(device)
    heldout = heldout_examples(read_jsonl(ctx["data"].path("heldout_tokens.jsonl")), e.max_examples)
    targets = ctx.session.teacher_targets(ctx["teacher"], heldout)
    chats = heldout_examples([r for r in read_jsonl(ctx["data"].path("heldout.jsonl")) if "answer" in r], e.max_examples)
    batch = cfg.data.gen_batch_size
    models = {"teacher": teacher, "student": student}
    summary: dict = {}

    bank = tasks.make_tasks(e.tasks_per_family, cfg.seed)
    results, by = {}, {}
    runs = [(name, mode) for name in models for mode in ("direct", "step_by_step")]
    with task_progress("checkable tasks", len(runs), ctx.session.progress) as advance:
        for name, mode in runs:
            step_by_step = mode == "step_by_step"
            score, by[name, mode] = tasks.run_tasks(
                models[name], tok, bank, step_by_step=step_by_step, batch_size=batch,
                max_new_tokens=e.task_step_by_step_tokens if step_by_step else e.task_max_new_tokens)
            results.setdefault(name, {})[mode] = score
            advance()
    results["difference"] = {m: tasks.paired_difference(by["teacher", m], by["student", m])
                             for m in ("direct", "step_by_step")}
    write_jsonl(ctx.dir / "tasks.jsonl", [{**r, "model": name, "mode": mode} for (name, mode), recs in by.items()
                                          for r in recs])
    summary["tasks"] = {"per_family": e.tasks_per_family, "tasks": len(bank), **results}

    text = corpus.corpus_examples(tok, max_len=cfg.data.max_len, max_examples=e.generalization_examples)
    summary["generalization"] = {
        "corpus": corpus.SOURCE, "sequences": len(text), "tokens": sum(len(x["input_ids"]) - 1 for x in text),
        "perplexity": {name: corpus.perplexity(m, text) for name, m in
                       (("teacher", teacher), ("student_init", init), ("student", student))}}

    summary["calibration"] = {
        "bins": e.calibration_bins,
        "student_vs_teacher": calibration.model_calibration(student, heldout, teacher_targets=targets,
                                                            bins=e.calibration_bins)["vs_teacher"],
        "student_vs_text": calibration.model_calibration(student, text, bins=e.calibration_bins)["vs_text"],
        "teacher_vs_text": calibration.model_calibration(teacher, text, bins=e.calibration_bins)["vs_text"],
    }

    prompts = [Prompt(r["id"], r["category"], r["messages"]) for r in chats]
    answers = generate_answers(student, tok, prompts, max_new_tokens=cfg.data.max_new_tokens, batch_size=batch)
    write_jsonl(ctx.dir / "student_answers.jsonl", answers)
    summary["degeneration"] = {"student": degeneration.degeneration(_answer_ids(tok, answers)),
                               "teacher": degeneration.degeneration(_answer_ids(tok, chats)),
                               "max_new_tokens": cfg.data.max_new_tokens}

    ids = [chat_ids(tok, r["messages"], add_generation_prompt=True) for r in chats[: e.speculative_prompts]]
    eos = eos_ids(teacher, tok)
    summary["speculative"] = {
        "acceptance": speculative.acceptance(student, teacher, ids, k=e.speculative_k,
                                             max_new_tokens=e.speculative_new_tokens, eos_ids=eos),
        "speedup": speculative.speedup(student, teacher, ids, k=e.speculative_k,
                                       max_new_tokens=e.speculative_new_tokens, eos_ids=eos)}

    cats = scorecard.by_category(ctx["distill"].summary["quality"]["student"],
                                 ctx["distill"].summary["quality"]["teacher"])
    summary["flags"] = [collapse_flag(cats, e.collapse_ratio, "the float student"),
                        reasoning_flag(results, e.reasoning_drop),
                        *degeneration_flags(summary["degeneration"]["student"], summary["degeneration"]["teacher"], e)]
    summary["ok"] = all(f["ok"] for f in summary["flags"])
    return summary
