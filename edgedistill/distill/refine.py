"""Refinement (`--refine N`): N rounds of evaluate -> more teacher data for the weakest categories -> distill again.

A round ranks the prompt categories by the student's retention on the held-out examples
(evaluate/scorecard.py), takes the `refine_categories` weakest, has the teacher answer their *train*
prompts again (sampled at `refine_temperature`, `refine_samples` answers per prompt, a seed per
round; the data section's answer filters apply to them as to the train set), and trains
`refine_steps` more steps on the train set with those categories' examples, old and new, repeated
`refine_oversample` times. Only categories with train prompts to answer are candidates.

No held-out prompt or answer is ever trained on, but the held-out figures do steer the rounds: they
choose the categories and decide a rollback. The figures reported after refinement are measured on
the same examples, so they are somewhat optimistic (the report says so); the checkable tasks and the
generalization corpus of the evaluate stage are not used by refinement and stay unbiased.

A round must not trade one category's collapse for another's: a round after which a category that
had not collapsed has collapsed (scorecard.collapsed at eval.collapse_ratio) is rolled back, its
weights restored, and the report says so. Fake-quant is on from a round's first step: the student
it starts from has finished its QAT, and the artifacts are cut from what the last round leaves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgedistill.data.prompts import Prompt
from edgedistill.data.teacher_answers import generate_answers, read_jsonl, tokenize_records, write_jsonl
from edgedistill.evaluate import scorecard


@dataclass
class RoundData:
    """What a round trains on, and how many new teacher answers it added."""

    new_records: int
    examples: list[dict]


def round_prompts(train_records: list[dict], weak: list[str], samples: int, round_: int) -> list[Prompt]:
    """The weak categories' train chats, `samples` times each, under ids of their own for this round."""
    return [Prompt(f"{r['id']}~refine{round_}.{j}", r["category"], [dict(m) for m in r["messages"]])
            for r in train_records if r["category"] in weak and "answer" in r and r.get("source") is None
            for j in range(samples)]


def oversampled(train_tokens: list[dict], new_tokens: list[dict], weak: list[str], times: int) -> list[dict]:
    """The train set, plus the new examples, with every weak category's example `times` times in all."""
    base = train_tokens + new_tokens
    extra = [ex for ex in base if ex["category"] in weak] * (times - 1)
    return base + extra


def answerable(train_records: list[dict]) -> set[str]:
    """The categories a round can add teacher answers for: those with train chats of the bundled or user prompts."""
    return {r["category"] for r in train_records if "answer" in r and r.get("source") is None}


def round_data(teacher, tok, d, data_cfg, *, round_: int, seed: int, weak: list[str], train_records: list[dict],
               train_tokens: list[dict], folder: Path, batch_size: int) -> RoundData:
    """The round's training examples. The teacher's new answers are kept in folder, under the weak
    categories' names, so a resumed round does not generate them again (nor reuses another choice's)."""
    from edgedistill.data import augment

    cache = folder / f"answers-{'+'.join(weak)}.jsonl"
    if cache.is_file():
        records = read_jsonl(cache)
    else:
        prompts = round_prompts(train_records, weak, d.refine_samples, round_)
        records = generate_answers(teacher, tok, prompts, max_new_tokens=data_cfg.max_new_tokens,
                                   batch_size=batch_size, sample=(d.refine_temperature, seed + round_))
        records = [{**r, "source": f"refine-{round_}"} for r in records]
        write_jsonl(cache, records)
    if data_cfg.answer_filters:  # sampled answers loop and run on more often: the train set's filters apply
        records = augment.filter_answers(
            records, data_cfg.answer_filters, min_words=data_cfg.min_answer_words,
            max_repetition=data_cfg.max_repetition, max_tokens=data_cfg.max_len,
            token_count=lambda r: len(tokenize_records(tok, [r], max_len=1 << 30)[0]["input_ids"])).kept
    new_tokens = tokenize_records(tok, records, max_len=data_cfg.max_len)
    return RoundData(len(records), oversampled(train_tokens, new_tokens, weak, d.refine_oversample))


def run_rounds(student, *, first: dict, teacher_quality: dict, rounds: int, collapse_ratio: float, n_weak: int,
               prepare: Callable[[int, list[str]], RoundData], train: Callable[[int, list[dict]], dict],
               measure: Callable[[], dict], eligible: set[str] | None = None,
               console=None) -> tuple[dict, list[dict]]:
    """`rounds` rounds on `student` (trained in place); returns (the final quality, one record per round).

    first is the student's quality (measure.quality.evaluate with by_category) before the rounds;
    prepare(round, weak categories) gives the round's examples, train(round, examples) trains on them,
    measure() evaluates the student as it is now; eligible (None: all) limits the categories a round
    may pick to those it can add data for.
    """
    current = first
    records = []
    for r in range(1, rounds + 1):
        before = scorecard.by_category(current, teacher_quality)
        weak = scorecard.weakest({c: f for c, f in before.items() if eligible is None or c in eligible}, n_weak)
        if not weak:
            break
        data = prepare(r, weak)
        saved = {k: v.detach().clone() for k, v in student.state_dict().items()}
        result = train(r, data.examples)
        after_quality = measure()
        after = scorecard.by_category(after_quality, teacher_quality)
        was = set(scorecard.collapsed(before, collapse_ratio)["categories"])
        now = set(scorecard.collapsed(after, collapse_ratio)["categories"])
        newly = sorted(now - was)
        record = {"round": r, "weakest": weak, "new_teacher_answers": data.new_records,
                  "examples": len(data.examples), "steps": result["steps"], "final_loss": result["final_loss"],
                  "retention_before": {c: f["retention"] for c, f in before.items()},
                  "retention_after": {c: f["retention"] for c, f in after.items()},
                  "quality_after": after_quality, "kept": not newly, "new_collapses": newly}
        if newly:  # the round bought its gain with another category's collapse: undo it
            student.load_state_dict(saved)
            if console is not None:
                console.print(f"  refine round {r}: rolled back, it collapsed {', '.join(newly)}")
        else:
            current = after_quality
            if console is not None:
                gains = ", ".join(f"{c} {before[c]['retention']:.3f}->{after[c]['retention']:.3f}" for c in weak)
                console.print(f"  refine round {r}: {gains}")
        records.append(record)
    return current, records


def summary_table(first: dict, teacher_quality: dict, records: list[dict]) -> list[dict]:
    """Per category, the retention before refinement and after each kept round: the before/after table."""
    rows = {c: {"category": c, "before": f["retention"]}
            for c, f in scorecard.by_category(first, teacher_quality).items()}
    for rec in records:
        for c, value in (rec["retention_after"] if rec["kept"] else rec["retention_before"]).items():
            rows.setdefault(c, {"category": c})[f"round_{rec['round']}"] = value
    return [rows[c] for c in sorted(rows)]
