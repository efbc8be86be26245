"""One distill run of a tiny random teacher and student, for tests/test_ddp.py.

    accelerate launch --cpu --num_processes 2 ... tests/ddp_distill.py OUT.json --global-batch 4
    accelerate launch --use_fsdp --num_processes 2 ... tests/ddp_distill.py OUT.json --global-batch 4
    python tests/ddp_distill.py OUT.json --global-batch 4

Every process builds the same models and examples from fixed seeds; each takes global_batch /
processes rows per step, so one process and N processes train on the same global batches. The main
process writes the run's figures and, per process, how many logit-cache shards it built to OUT.json,
and the final student weights beside it (OUT.safetensors). Under FSDP it also writes, per process,
how many of the student's parameter values that process held while training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

# the tests' own tiny models and prompt-then-answer examples (this script's folder is on sys.path):
# answers are loss-masked, so the processes see different numbers of supervised tokens
from test_distill import random_examples, tiny_llama


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--logit-cache", action="store_true")
    # as transformers loads under `accelerate launch --use_fsdp`: real weights on the main process only
    ap.add_argument("--meta-elsewhere", action="store_true")
    # stop after this step (checkpointed), then resume on fresh models from that checkpoint
    ap.add_argument("--resume-at", type=int, default=0)
    ap.add_argument("--checkpoint-every", type=int, default=0)  # default: at --resume-at only
    # fake-quant of this format from --qat-start on (--act: the runtime's activation rounding too)
    ap.add_argument("--qat")
    ap.add_argument("--qat-start", type=int, default=0)
    ap.add_argument("--act", action="store_true")
    ap.add_argument("--confidence", action="store_true")  # loss.confidence_weighting
    args = ap.parse_args()

    from accelerate import PartialState
    from safetensors.torch import save_file

    from edgedistill.distill import logit_cache
    from edgedistill.distill.losses import LossSpec
    from edgedistill.distill.quantized import QuantSpec
    from edgedistill.distill.trainer import TrainConfig, distill

    state = PartialState(cpu=not torch.accelerator.is_available())  # as the trainer makes it
    if args.global_batch % state.num_processes:
        sys.exit("the global batch must divide among the processes")
    built = []
    write_shard = logit_cache.write_shard
    logit_cache.SHARD_ROWS = 4  # several shards, so every process has some to build
    logit_cache.write_shard = lambda *a, **k: (built.append(1), write_shard(*a, **k))[1]

    torch.set_num_threads(1)  # two processes on two cores
    def models():
        with torch.device("meta") if args.meta_elsewhere and not state.is_main_process else nullcontext():
            return tiny_llama(1, layers=2, hidden=64), tiny_llama(2, layers=1, hidden=32)

    teacher, student = models()
    cfg = TrainConfig(steps=args.steps, batch_size=args.global_batch // state.num_processes, seq_len=24, lr=3e-3,
                      warmup_steps=1, mixed_precision="no",
                      checkpoint_every=args.checkpoint_every or args.resume_at or 10**6,
                      loss=LossSpec(top_k=8 if args.logit_cache else 0, confidence_weighting=args.confidence),
                      logit_cache=args.logit_cache,
                      qat=QuantSpec(args.qat, act=args.act) if args.qat else None, qat_start_step=args.qat_start)
    work = args.out.parent / f"work-{state.num_processes}"
    run = dict(progress=False, cache_dir=args.out.parent / "cache" if args.logit_cache else None)
    if args.resume_at:
        distill(student, teacher, random_examples(16, 3), cfg, work, stop_after=args.resume_at, **run)
        teacher, student = models()
    result = distill(student, teacher, random_examples(16, 3), cfg, work, resume=bool(args.resume_at), **run)
    counts = [torch.zeros(state.num_processes) for _ in range(state.num_processes)]
    mine = torch.zeros(state.num_processes)
    mine[state.process_index] = len(built)
    held = torch.zeros(state.num_processes, dtype=torch.long)
    held[state.process_index] = result["fsdp"]["held"] if "fsdp" in result else -1
    if state.num_processes > 1:
        torch.distributed.all_gather(counts, mine)
        torch.distributed.all_reduce(held)
    else:
        counts = [mine]
    if state.is_main_process:
        figures = {k: result[k] for k in ("loss_curve", "steps", "tokens", "resumed_from", "qat_ran")}
        figures["processes"] = state.num_processes
        save_file({k: v.contiguous() for k, v in student.state_dict().items() if k != "lm_head.weight"},
                  str(args.out.with_suffix(".safetensors")))
        figures["shards_built_by_process"] = [int(c.sum()) for c in counts]
        figures["logit_cache"] = result.get("logit_cache")
        if "fsdp" in result:
            figures["fsdp"] = {"parameters": result["fsdp"]["parameters"], "held_by_process": held.tolist(),
                               "student_parameters": sum(p.numel() for p in student.parameters()),
                               "student_is_plain": all(type(p) is torch.nn.Parameter for p in student.parameters())}
        args.out.write_text(json.dumps(figures))
    state.wait_for_everyone()
    if state.num_processes > 1:
        # left to interpreter exit, gloo's threads can abort the process ("terminate called without
        # an active exception") after the work is done
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # Past this point only the interpreter's finalization runs, and with gloo's worker threads still
    # holding tensors it can abort the process (SIGABRT, "terminate called without an active
    # exception"; pytorch/pytorch#179291); destroy_process_group made that rare, but CI still saw one
    # such abort in a 2-process FSDP run. The run's work and output are done here, so skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
