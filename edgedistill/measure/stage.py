"""Stage `profile`: measure every artifact on this host, each in its own child process."""

from __future__ import annotations

from edgedistill.data.teacher_answers import read_jsonl
from edgedistill.progress import task_progress


def prompt_of_length(examples: list[dict], n: int) -> list[int]:
    """`n` real held-out tokens (prompts and answers concatenated), for a time-to-first-token at that length."""
    ids: list[int] = []
    for ex in examples:
        ids.extend(ex["input_ids"])
        if len(ids) >= n:
            break
    while len(ids) < n:  # a tiny held-out set: repeat it rather than measure a shorter prompt
        ids.extend(ids[: n - len(ids)])
    return ids[:n]


def run(ctx) -> dict:
    from edgedistill.measure.profile import host_info, profile_artifact

    e = ctx.cfg.eval
    prompt = prompt_of_length(read_jsonl(ctx["data"].path("heldout_tokens.jsonl")), ctx.target.budget.prompt_tokens)
    artifacts = ctx["export"].summary["artifacts"]
    measured = {}
    with task_progress("profile on host", len(artifacts), ctx.session.progress) as advance:
        for fmt, art in artifacts.items():
            measured[fmt] = profile_artifact(ctx["export"].path(art["file"]), fmt, prompt_ids=prompt,
                                             new_tokens=e.profile_new_tokens, repeats=e.profile_repeats)
            advance()
    return {"host": host_info(), "prompt_tokens": len(prompt), "artifacts": measured}
