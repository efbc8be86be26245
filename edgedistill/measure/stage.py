"""Stage `profile`: measure this host and every artifact on it.

- the host's memory bandwidth and matrix throughput (measure.calibrate), for the projection check;
- each artifact's speed and memory in its runtime, each in its own child process (measure.profile);
- each artifact's quality against the teacher in its runtime, on the held-out examples the distill
  stage scored the teacher and the student on (same examples, same teacher top-k targets), so the
  report puts teacher, student and every artifact side by side.

Every runtime and micro-benchmark runs with the same thread count, recorded in the summary.
"""

from __future__ import annotations

from edgedistill.data.teacher_answers import read_jsonl
from edgedistill.measure.quality import heldout_examples
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


def kv_cache_figures(shape: dict, context: int) -> dict:
    """KV cache bytes per token and at the profile's context (fp16 K and V, as the runtimes keep them)."""
    from edgedistill.measure.project import kv_bytes_per_token

    per_token = kv_bytes_per_token(shape["layers"], shape["kv_heads"], shape["head_dim"])
    return {"kv_bytes_per_token": per_token, "context": context, "kv_cache_bytes_at_context": per_token * context}


def artifact_quality(path, fmt: str, targets: list[dict], examples: list[dict], n_threads: int) -> dict:
    """top1_agreement, kl, perplexity of one artifact's runtime against the teacher (measure.quality),
    overall and per prompt category."""
    import torch

    from edgedistill.measure.quality import evaluate
    from edgedistill.runtime import load_runner

    runner = load_runner(path, fmt, n_threads=n_threads)
    try:
        return evaluate(lambda ids: torch.as_tensor(runner.logits(ids)), targets, examples, by_category=True)
    finally:
        runner.close()


def run(ctx) -> dict:
    from edgedistill.bench import default_threads
    from edgedistill.measure.calibrate import calibrate_host
    from edgedistill.measure.profile import host_info, profile_artifact

    e = ctx.cfg.eval
    heldout = read_jsonl(ctx["data"].path("heldout_tokens.jsonl"))
    prompt = prompt_of_length(heldout, ctx.target.budget.prompt_tokens)
    artifacts = ctx["export"].summary["artifacts"]
    student = ctx["plan"].summary["student"]
    # half the usable cores (as `edgedistill bench`): the other half keeps the machine's own work
    # from stealing the measured threads' time
    threads = default_threads()
    calibration = calibrate_host(threads)
    kv = kv_cache_figures(student["shape"], student["context"])  # the student's, alike for every artifact
    measured = {}
    with task_progress("profile on host", len(artifacts), ctx.session.progress) as advance:
        for fmt, art in artifacts.items():
            measured[fmt] = profile_artifact(ctx["export"].path(art["file"]), fmt, prompt_ids=prompt,
                                             new_tokens=e.profile_new_tokens, repeats=e.profile_repeats,
                                             n_threads=threads)
            measured[fmt].update(kv)
            advance()

    examples = heldout_examples(heldout, e.max_examples)
    targets = ctx.session.teacher_targets(ctx["teacher"], examples)
    quality = {}
    with task_progress("artifact quality", len(artifacts), ctx.session.progress) as advance:
        for fmt, art in artifacts.items():
            quality[fmt] = artifact_quality(ctx["export"].path(art["file"]), fmt, targets, examples, threads)
            advance()
    return {"host": host_info(), "prompt_tokens": len(prompt), "threads": threads, "calibration": calibration,
            "artifacts": measured, "quality": quality}
