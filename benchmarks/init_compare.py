"""Which student initialization distills best? Equal tokens, the default teacher, held-out quality.

    python benchmarks/init_compare.py [--out /tmp/edgedistill-bench] [--target phone-4gb] [--inits ...]

The student shape is the plan for the target (phone-4gb: the default build's). Every init gets
the quick preset's distillation budget (same steps, batch, sequence length, data and QAT) and is
scored against the teacher on the held-out answers at step 0 and after training:

- random: the student config with Hugging Face's random initialization;
- sliced: evenly spaced teacher layers, the first hidden channels / heads / MLP neurons;
- importance: the init stage's activation importance (Minitron-style) on calibration text;
- importance+progressive: the same, through the plan's intermediate students (about 2x per
  stage, each distilled and then the next one's teacher); the step budget is shared by the stages.

Teacher load and data come from the pipeline's own stages (cached in --out, shared with
benchmarks/quick_build.py). Writes benchmarks/results/init_compare.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
INITS = ("random", "sliced", "importance", "importance+progressive")


def _student(teacher, shape: dict, context: int, calib: list, init: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgedistill import prune
    from edgedistill.plan import student_config

    cfg = AutoConfig.for_model(**student_config(teacher.config.to_dict(), shape, context))
    if init == "random":
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    importance = prune.sliced(teacher.config) if init == "sliced" else prune.calibrate(teacher, calib)
    return prune.build_student(teacher, cfg, importance)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/edgedistill-bench")
    ap.add_argument("--target", default="phone-4gb")
    ap.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    args = ap.parse_args()

    from rich.console import Console

    from edgedistill import config as cfgmod
    from edgedistill.build import quiet_libraries
    from edgedistill.data.teacher_answers import read_jsonl
    from edgedistill.distill.stage import qat_spec, train_config
    from edgedistill.distill.trainer import distill
    from edgedistill.measure.profile import host_info
    from edgedistill.measure.quality import evaluate, teacher_targets
    from edgedistill.pipeline import Session, run_target
    from edgedistill.plan import solve
    from edgedistill.progressive import run_chain, split_steps
    from edgedistill.stages import STAGES
    from edgedistill.targets import load_target

    quiet_libraries()
    console = Console(stderr=True)
    cfg = cfgmod.resolve({"targets": [args.target], "out": args.out})
    target = load_target(args.target)
    session = Session(cfg, console, progress=False)
    records = run_target([s for s in STAGES if s.name in ("teacher", "plan", "data")], session, target)
    teacher, _ = session.teacher(records["teacher"])
    student_plan = records["plan"].summary["student"]
    shape, context = student_plan["shape"], student_plan["context"]
    train = read_jsonl(records["data"].path("train_tokens.jsonl"))
    heldout = read_jsonl(records["data"].path("heldout_tokens.jsonl"))[: cfg.eval.max_examples]
    calib = [ex["input_ids"] for ex in train[: cfg.plan.calibration_examples]]
    targets = teacher_targets(teacher, heldout)
    progressive_shapes = solve(records["teacher"].summary, target,
                               cfg.plan.model_copy(update={"progressive": True}))["progressive"]
    d = cfg.distill
    qat = qat_spec(cfg, student_plan)

    rows = []
    for init in args.inits:
        console.print(f"[bold]{init}[/bold]")
        t0 = time.perf_counter()
        work = Path(args.out) / "init-compare" / init.replace("+", "-")
        coach, stages, steps = teacher, [], d.steps
        if init == "importance+progressive":
            coach, _, stages = run_chain(teacher, progressive_shapes, cfg=cfg, calib=calib, train=train,
                                         heldout=heldout, context=context, workdir=work, progress=False,
                                         say=console.print)
            steps = split_steps(d.steps, len(progressive_shapes) + 1)[-1]
            student = _student(coach, shape, context, calib, "importance")
        else:
            student = _student(teacher, shape, context, calib, init)
        step0 = evaluate(student, targets, heldout)
        result = distill(student, coach, train, train_config(d, steps, qat, cfg.seed), work,
                         progress=False)
        after = evaluate(student, targets, heldout)
        tokens = result["tokens"] + sum(s["tokens"] for s in stages)
        rows.append({"init": init, "step0": step0, "after": after, "tokens": tokens,
                     "stages": [{k: s[k] for k in ("shape", "params", "steps", "tokens", "quality")} for s in stages],
                     "seconds": round(time.perf_counter() - t0, 1)})
        console.print(f"  step 0 top-1 {step0['top1_agreement']:.3f} -> {after['top1_agreement']:.3f}, "
                      f"ppl {step0['perplexity']:.4g} -> {after['perplexity']:.4g} ({tokens} tokens)")

    teacher_q = evaluate(teacher, targets, heldout)
    out = {
        "command": "python benchmarks/init_compare.py " + " ".join(
            [f"--out {args.out}", f"--target {args.target}", "--inits " + " ".join(args.inits)]),
        "machine": host_info() | {"python": platform.python_version(), "torch": torch.__version__},
        "basis": "measured on this host: PyTorch float student vs the teacher on held-out teacher answers",
        "student_shape": shape, "distill": d.model_dump(), "qat": list(qat), "teacher": teacher_q,
        "heldout_positions": teacher_q["tokens"], "results": rows,
    }
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "init_compare.json").write_text(json.dumps(out, indent=2) + "\n")
    (results / "init_compare.md").write_text(markdown(out))
    print(markdown(out))


def markdown(out: dict) -> str:
    t = out["teacher"]
    lines = [f"# Student initialization at equal distillation tokens ({out['results'][0]['tokens']:,} tokens)", "",
             f"`{out['command']}`", "",
             f"Student {out['student_shape']['layers']} layers x {out['student_shape']['hidden']} "
             f"(intermediate {out['student_shape']['intermediate']}); teacher perplexity on the held-out answers "
             f"{t['perplexity']:.3f} over {t['tokens']} positions. {out['basis'][0].upper() + out['basis'][1:]}.", "",
             "| init | top-1 step 0 | KL step 0 | ppl step 0 | top-1 after | KL after | ppl after | ppl / teacher |",
             "|---|---|---|---|---|---|---|---|"]
    for r in out["results"]:
        a, b = r["step0"], r["after"]
        lines.append(f"| {r['init']} | {a['top1_agreement']:.3f} | {a['kl']:.3f} | {a['perplexity']:.4g} | "
                     f"{b['top1_agreement']:.3f} | {b['kl']:.3f} | {b['perplexity']:.4g} | "
                     f"{b['perplexity'] / t['perplexity']:.2f}x |")
    ranked = sorted(out["results"], key=lambda r: r["after"]["kl"])
    lines += ["", "Ranked by KL after training (lower is closer to the teacher): "
              + " < ".join(f"{r['init']} ({r['after']['kl']:.3f})" for r in ranked) + "."]
    for r in out["results"]:
        for i, s in enumerate(r["stages"], 1):
            q = s["quality"]
            lines.append(f"\n{r['init']} stage {i}: {s['params'] / 1e6:.1f}M params, {s['steps']} steps: "
                         f"top-1 {q['top1_agreement']:.3f}, KL {q['kl']:.3f}, ppl {q['perplexity']:.4g}")
    m = out["machine"]
    lines += ["", f"Machine: {json.dumps(m)}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
