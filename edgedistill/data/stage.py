"""Stage `data`: prompts (bundled + the user's), split, teacher answers through its chat template, tokens.

Answers are appended to answers.jsonl as they are generated, so `--resume` after a crash only
generates the prompts that are still missing.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path

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
    todo = [p for p in train + heldout if p.id not in done]
    step = CHUNK * cfg.gen_batch_size
    with task_progress("teacher answers", len(train) + len(heldout), ctx.session.progress) as advance:
        advance(len(done))
        with open(cache, "a", encoding="utf-8") as f:
            for i in range(0, len(todo), step):
                chunk = todo[i:i + step]
                for rec in generate_answers(model, tok, chunk, max_new_tokens=cfg.max_new_tokens,
                                            batch_size=cfg.gen_batch_size):
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    done[rec["id"]] = rec
                f.flush()
                advance(len(chunk))

    summary = {"prompts": len(prompts), "categories": dict(Counter(p.category for p in prompts))}
    for name, part in (("train", train), ("heldout", heldout)):
        records = [done[p.id] for p in part]
        tokens = tokenize_records(tok, records, max_len=cfg.max_len)
        write_jsonl(ctx.dir / f"{name}.jsonl", records)
        write_jsonl(ctx.dir / f"{name}_tokens.jsonl", tokens)
        summary[name] = {"examples": len(records), "tokens": sum(len(t["input_ids"]) for t in tokens),
                         "answer_tokens": sum(sum(t["loss_mask"]) for t in tokens)}
    cache.unlink()  # its content now lives in train.jsonl / heldout.jsonl
    return summary
