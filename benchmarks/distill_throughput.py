"""Distill-step throughput on this machine: a naive baseline against edgedistill's distill step.

    python benchmarks/distill_throughput.py [--steps 3] [--repeats 3] [--batch-size 8] [--seq-len 256] [--top-k 64]

Both train the same student (the default plan's shape for phone-4gb, random init) against the
default teacher (SmolLM2-135M-Instruct, loaded with the project's teacher loader) on the same packed
rows (bundled prompts through the chat template), same batch, sequence length, optimizer and loss
weights, with the same thread count:

- baseline: the teacher run online in float32 every step, a plain transformers forward of both,
  full-vocabulary KL computed plainly from materialized [B, L, V] log-softmaxes of both, plus CE;
- ours: edgedistill.distill.trainer.distill with the teacher logit cache (top-k + tail bucket,
  built once and reported apart, then reused), bf16 autocast where the CPU has it, packed rows,
  and the top-k loss fused with the student's lm_head (losses.kd_loss_top_k_from_hidden): the
  student returns its final hidden states, the loss multiplies them by the lm_head weight a chunk
  of rows at a time (bf16 matmuls, float32 softmax) and takes loss and gradient in one pass over
  the chunk, so the student's [B, L, V] logits are never materialized and nothing is recomputed.

Each repeat is a fresh run of --steps steps; tokens/s is its tokens over its loop time (the first
step included, the cache build and the final checkpoint not), after one untimed baseline step.
Runs alternate baseline / ours so that a change in the machine's load hits both; the 1-minute load
average before the runs and after each repeat is written beside the figures. Writes
benchmarks/results/distill_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
TARGET = "phone-4gb"
TEMPERATURE, ALPHA, LR = 2.0, 0.7, 1e-3


def load_teacher():
    from edgedistill import teacher

    return teacher.load(teacher.resolve("smollm2-135m-instruct"))


def student_factory(teacher_model):
    """A callable giving the same fresh student each time: the default plan's shape, random init."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgedistill import plan
    from edgedistill.config import PlanConfig
    from edgedistill.targets import load_target

    params = sum(p.numel() for p in teacher_model.parameters())
    solved = plan.solve({"config": teacher_model.config.to_dict(), "params": params}, load_target(TARGET), PlanConfig())
    cfg = AutoConfig.for_model(**plan.student_config(teacher_model.config.to_dict(), solved["shape"], 2048))
    torch.manual_seed(0)
    state = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).state_dict()

    def fresh():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(state)
        return model.train()

    return fresh, solved["shape"]


def prompt_examples(tok) -> list[dict]:
    """The bundled prompts through the chat template; every token supervised (the loss's worst case)."""
    from edgedistill.data.prompts import load_bundled
    from edgedistill.data.teacher_answers import chat_ids

    examples = []
    for prompt in load_bundled():
        ids = chat_ids(tok, prompt.messages, add_generation_prompt=True)
        examples.append({"input_ids": ids, "loss_mask": [1] * len(ids)})
    return examples


# ---------------------------------------------------------------- the naive baseline

def naive_kd_loss(student_logits, teacher_logits, labels, mask):
    """Full-vocabulary forward KL at TEMPERATURE from whole [B, L, V] log-softmaxes, mixed with CE."""
    log_q = F.log_softmax(student_logits / TEMPERATURE, dim=-1)
    log_p = F.log_softmax(teacher_logits / TEMPERATURE, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    ce = F.cross_entropy(student_logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(kl)
    m = mask.float()
    n = m.sum().clamp_min(1)
    return ALPHA * TEMPERATURE**2 * (kl * m).sum() / n + (1 - ALPHA) * (ce * m).sum() / n


def baseline_run(student, teacher_model, data, steps: int, batch_size: int) -> float:
    """tokens/s of a plain loop: fp32 teacher forward every step, naive loss, AdamW, clipping."""
    inputs, labels, mask = data[:3]  # a plain forward: positions (attention boundaries) left out
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, betas=(0.9, 0.95))
    t0 = time.perf_counter()
    for step in range(steps):
        rows = slice(step * batch_size, (step + 1) * batch_size)
        with torch.no_grad():
            teacher_logits = teacher_model(input_ids=inputs[rows]).logits
        student_logits = student(input_ids=inputs[rows]).logits
        loss = naive_kd_loss(student_logits, teacher_logits, labels[rows], mask[rows])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * batch_size * inputs.shape[1] / (time.perf_counter() - t0)


# ---------------------------------------------------------------- ours

def ours_run(student, teacher_model, examples, args, workdir: Path, cache_dir: Path) -> dict:
    from edgedistill.distill.losses import LossSpec
    from edgedistill.distill.trainer import TrainConfig, distill

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=LR, warmup_steps=1,
                      temperature=TEMPERATURE, alpha=ALPHA, loss=LossSpec(top_k=args.top_k), logit_cache=True,
                      checkpoint_every=10**6, mixed_precision="auto")
    return distill(student, teacher_model, examples, cfg, workdir, progress=False, cache_dir=cache_dir)


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
            "max": round(max(values), 1), "runs": [round(v, 1) for v in values]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per step (distill.batch_size's default)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per row (distill.seq_len's default)")
    ap.add_argument("--top-k", type=int, default=64, help="teacher tokens cached per position")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: every core this process may use)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "distill_throughput.json")
    args = ap.parse_args()

    from edgedistill.bench import fingerprint
    from edgedistill.distill.trainer import pack_rows, resolve_precision

    # thread settings: one torch thread per usable core (hyperthreads or a cgroup cap can make
    # torch's default differ), the same for both sides
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    teacher_model, tok = load_teacher()
    fresh_student, shape = student_factory(teacher_model)
    examples = prompt_examples(tok)
    data = pack_rows(examples, args.seq_len, args.steps * args.batch_size, seed=0)  # the trainer's own rows
    print(f"teacher SmolLM2-135M-Instruct loaded in {time.perf_counter() - t0:.1f}s; student {shape}; "
          f"{len(examples)} prompts; {threads} threads; precision ours: {resolve_precision('auto')}", flush=True)

    # one untimed baseline step: first-call costs (allocations, kernel choice) of the fp32 path. Ours
    # pays its student's first-call costs in its first repeat (the cache build, timed apart, warms
    # only the teacher's bf16 path); its later repeats reuse the fused loss's scratch buffers (module
    # state, kept between calls as between a run's steps)
    baseline_run(fresh_student(), teacher_model, tuple(t[:1] for t in data), 1, 1)
    baseline, ours, first = [], [], None
    load = [round(os.getloadavg()[0], 2)]  # 1-minute load average before the runs and after each repeat
    with tempfile.TemporaryDirectory(prefix="edgedistill-throughput-") as tmp:
        cache_dir = Path(tmp) / "cache"
        for r in range(args.repeats):
            baseline.append(baseline_run(fresh_student(), teacher_model, data, args.steps, args.batch_size))
            result = ours_run(fresh_student(), teacher_model, examples, args, Path(tmp) / f"run{r}", cache_dir)
            ours.append(result["tokens_per_s"])
            first = first or result
            load.append(round(os.getloadavg()[0], 2))
            print(f"repeat {r + 1}: baseline {baseline[-1]:,.0f} tok/s, ours {ours[-1]:,.0f} tok/s "
                  f"(cache shards built {result['logit_cache']['shards_built']}, "
                  f"reused {result['logit_cache']['shards_reused']})", flush=True)

    cache = first["logit_cache"]
    tokens = first["tokens"]
    # one epoch over fresh data pays the build too: what the first build of a data set sees
    first_pass = tokens / (first["seconds"] + cache["build_seconds"])
    ratio = statistics.median(ours) / statistics.median(baseline)
    out = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": fingerprint(threads),
        "settings": {"teacher": "smollm2-135m-instruct", "student_shape": shape, "target": TARGET,
                     "steps": args.steps, "repeats": args.repeats, "batch_size": args.batch_size,
                     "seq_len": args.seq_len, "top_k": args.top_k, "temperature": TEMPERATURE, "alpha": ALPHA,
                     "precision_ours": first["mixed_precision"], "precision_baseline": "no"},
        "baseline_tokens_per_s": spread(baseline),
        "ours_tokens_per_s": spread(ours),
        "ratio_median": round(ratio, 2),
        "load_average_1min": load,  # the machine is shared: what else ran beside the runs
        "cache": {"build_seconds": cache["build_seconds"],
                  "build_tokens_per_s": round(tokens / cache["build_seconds"], 1) if cache["build_seconds"] else None,
                  "bytes_per_token": cache["bytes_per_token"], "mass_kept": cache["mass_kept"],
                  "ours_first_pass_tokens_per_s": round(first_pass, 1)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")

    b, o = out["baseline_tokens_per_s"], out["ours_tokens_per_s"]
    print(f"\nbaseline (fp32, online teacher, full-vocab KL): {b['median']:,.1f} tok/s "
          f"(min {b['min']:,.1f}, max {b['max']:,.1f}, {args.repeats} runs of {args.steps} steps)")
    print(f"ours     ({first['mixed_precision']}, logit cache top-{args.top_k}, fused chunked head + loss): "
          f"{o['median']:,.1f} tok/s "
          f"(min {o['min']:,.1f}, max {o['max']:,.1f})")
    print(f"ratio (medians): {ratio:.2f}x   goal: >= 3x   (1-minute load average, start then per repeat: {load})")
    print(f"cache: built once in {cache['build_seconds']:.1f}s ({out['cache']['build_tokens_per_s']} tok/s), "
          f"{cache['bytes_per_token']} bytes/token, teacher mass kept {cache['mass_kept']:.4f} "
          f"(top-{args.top_k} at T={TEMPERATURE}); first pass with the build: {first_pass:,.1f} tok/s")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
