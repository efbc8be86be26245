"""Stage `data`: prompts (bundled + the user's), split, teacher answers through its chat template, tokens.

Optionally (data/augment.py; each off by default) the train part grows and is cleaned: self-instruct
prompts without near-duplicates, step-by-step variants, follow-up turns, quality filters on the answers,
topic balancing. The held-out part is never changed by them, and no held-out prompt is shown to the
teacher as a self-instruct example.

Every teacher reply is appended to answers.jsonl as it is generated, so `--resume` after a crash only
generates what is still missing.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path

from edgedistill.data import augment
from edgedistill.data.prompts import Prompt, load_bundled, load_user_file, split
from edgedistill.data.teacher_answers import generate_answers, tokenize_records, write_jsonl
from edgedistill.progress import task_progress

CHUNK = 4  # batches generated between appends to the on-disk answer cache


def balanced_cap(prompts: list[Prompt], cap: int, seed: int) -> list[Prompt]:
    """At most `cap` prompts, taken round-robin over categories so every category keeps its share."""
    rng = random.Random(seed)
    by_cat: dict[str, list[Prompt]] = defaultdict(list)
    for p in prompts:
        by_cat[p.category].append(p)
    for items in by_cat.values():
        rng.shuffle(items)
    out, queues = [], [list(v) for _, v in sorted(by_cat.items())]
    while len(out) < cap and any(queues):
        for q in queues:
            if q and len(out) < cap:
                out.append(q.pop())
    return out


def _read_answers(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    done = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut short by a crash; everything before it is good
        done[rec["id"]] = rec
    return done


def _cached_generator(model, tok, cache: Path, done: dict[str, dict], batch_size: int, progress: bool):
    """``generate(prompts, max_new_tokens, label)``: the teacher's records for these prompts, generated only
    for those not yet in ``done`` and appended to the on-disk cache as they come, so a resumed stage
    generates only what is still missing (its ids are deterministic)."""

    def generate(prompts: list[Prompt], max_new_tokens: int, label: str = "teacher answers") -> list[dict]:
        todo = [p for p in prompts if p.id not in done]
        step = CHUNK * batch_size
        with task_progress(label, len(prompts), progress) as advance:
            advance(len(prompts) - len(todo))
            with open(cache, "a", encoding="utf-8") as f:
                for i in range(0, len(todo), step):
                    chunk = todo[i:i + step]
                    for rec in generate_answers(model, tok, chunk, max_new_tokens=max_new_tokens,
                                                batch_size=batch_size):
                        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                        done[rec["id"]] = rec
                    f.flush()
                    advance(len(chunk))
        return [done[p.id] for p in prompts]

    return generate


def _augment(cfg, seed: int, prompts: list[Prompt], train: list[Prompt], heldout: list[Prompt],
             records: list[dict], tok, generate, out_dir: Path) -> tuple[list[dict], dict]:
    """The train records with the configured self-instruct, chain-of-thought, filter, follow-up and
    balancing steps (data/augment.py) applied, and what each step did for the summary."""
    summary: dict = {}
    generated: dict[str, Counter] = defaultdict(Counter)
    train = list(train)
    if cfg.self_instruct:
        si = augment.self_instruct(
            train, prompts, heldout, cfg.self_instruct, examples=cfg.self_instruct_examples,
            threshold=cfg.dedup_threshold, seed=seed, max_new_tokens=cfg.max_new_tokens,
            generate=lambda ps, n: generate(ps, n, "self-instruct"))
        write_jsonl(out_dir / "self_instruct.jsonl", si.log)
        new = generate(si.prompts, cfg.max_new_tokens, "new instructions")
        records += [{**r, "source": "self_instruct"} for r in new]
        train += si.prompts
        generated["self_instruct"].update(p.category for p in si.prompts)
        summary["self_instruct"] = si.summary
    if cfg.chain_of_thought:
        cot, skipped = augment.cot_prompts(train, cfg.cot_categories)
        # a step-by-step answer is longer: twice the answer budget
        new = generate(cot, 2 * cfg.max_new_tokens, "chain of thought")
        records += [{**r, "source": "chain_of_thought"} for r in new]
        generated["chain_of_thought"].update(p.category for p in cot)
        summary["chain_of_thought"] = {"categories": list(cfg.cot_categories), "records": len(cot),
                                       "skipped_already_step_by_step": skipped,
                                       "by_category": dict(sorted(Counter(p.category for p in cot).items()))}

    def full_length(r: dict) -> int:
        return len(tokenize_records(tok, [r], max_len=1 << 30)[0]["input_ids"])

    def quality(recs: list[dict]) -> augment.FilterResult:
        return augment.filter_answers(recs, cfg.answer_filters, min_words=cfg.min_answer_words,
                                      max_repetition=cfg.max_repetition, max_tokens=cfg.max_len,
                                      token_count=full_length)

    filtered = quality(records) if cfg.answer_filters else None
    if filtered is not None:
        records = filtered.kept
    if cfg.multi_turn:
        follow = augment.follow_up_prompts(records, cfg.multi_turn, seed)
        bases = {f"{r['id']}~turn2": r for r in records}
        new = [{**r, "source": "multi_turn", "loss_turns": augment.loss_turns(bases[r["id"]])}
               for r in generate(follow, cfg.max_new_tokens, "follow-up turns")]
        if filtered is not None:
            second = quality(new)
            filtered, new = filtered.merge(second), second.kept
        records += new
        generated["multi_turn"].update(p.category for p in follow)
        summary["multi_turn"] = {"requested": cfg.multi_turn, "records": len(follow), "kept": len(new),
                                 "by_category": dict(sorted(Counter(p.category for p in follow).items()))}
    if filtered is not None:
        summary["filters"] = {**filtered.summary(), "dropped_by_source": dict(sorted(Counter(
            r.get("source", "prompts") for r in filtered.dropped).items()))}
        write_jsonl(out_dir / "dropped.jsonl", filtered.dropped)
    if cfg.balance != "none":
        records, summary["balance"] = augment.balance(records, cfg.balance, seed)
    if generated:
        cats = sorted(set().union(*generated.values()))
        summary["generated"] = {c: {src: generated[src][c] for src in generated} for c in cats}
    return records, summary


def run(ctx) -> dict:
    cfg, seed = ctx.cfg.data, ctx.cfg.seed
    prompts = load_bundled()
    for f in cfg.prompts:
        prompts += load_user_file(Path(f))
    if cfg.max_prompts:
        prompts = balanced_cap(prompts, cfg.max_prompts, seed)
    train, heldout = split(prompts, cfg.heldout_fraction, seed)
    model, tok = ctx.session.teacher(ctx["teacher"])

    cache = ctx.dir / "answers.jsonl"
    done = _read_answers(cache)
    generate = _cached_generator(model, tok, cache, done, cfg.gen_batch_size, ctx.session.progress)
    generate(train + heldout, cfg.max_new_tokens)
    parts = {"train": [done[p.id] for p in train], "heldout": [done[p.id] for p in heldout]}
    parts["train"], extra = _augment(cfg, seed, prompts, train, heldout, parts["train"], tok, generate, ctx.dir)

    summary = {"prompts": len(prompts), "categories": dict(Counter(p.category for p in prompts)), **extra}
    for name, records in parts.items():
        tokens = tokenize_records(tok, records, max_len=cfg.max_len)
        write_jsonl(ctx.dir / f"{name}.jsonl", records)
        write_jsonl(ctx.dir / f"{name}_tokens.jsonl", tokens)
        summary[name] = {"examples": len(records), "tokens": sum(len(t["input_ids"]) for t in tokens),
                         "answer_tokens": sum(sum(t["loss_mask"]) for t in tokens)}
    cache.unlink()  # its content now lives in train.jsonl / heldout.jsonl
    return summary
