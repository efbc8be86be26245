"""What each distillation objective buys: held-out quality after the quick preset, one row per objective.

    python benchmarks/loss_quality.py [--out /tmp/edgedistill-bench] [--target phone-4gb] [--variants ...]

The default teacher's quick-preset build for the target, through its distill stage, once per
variant: the same plan, data, initialised student, steps, batch, sequence length and QAT; only the
objective differs. Each variant is the distill stage of the pipeline itself, with its settings in the
build config, so a row can be replayed with `edgedistill build` and the same settings:

- forward_kl: KL(teacher || student) at the temperature, mixed with CE (the default);
- reverse_kl: KL(student || teacher);
- jsd: generalized Jensen-Shannon, beta 0.5;
- forward_kl+hidden: forward KL plus the hidden-state MSE through learned projections (weight 1);
- forward_kl+on_policy: forward KL, with half the steps (GKD lambda 0.5) on the student's own samples.

Quality is the distill stage's own measurement on the held-out teacher answers (top-1 agreement
with the teacher, KL(teacher || student), perplexity of the teacher's answers), of the float
student after training. Teacher, plan, data and init are cached in --out and shared by the variants
and by later runs; a variant already in the results file for the same settings is not run again
(pass --again to re-run it). Writes benchmarks/results/loss_quality.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "loss_quality.json"

VARIANTS: dict[str, dict] = {
    "forward_kl": {},
    "reverse_kl": {"loss": {"objective": "reverse_kl"}},
    "jsd": {"loss": {"objective": "jsd", "jsd_beta": 0.5}},
    "forward_kl+hidden": {"loss": {"hidden_weight": 1.0}},
    "forward_kl+on_policy": {"on_policy_fraction": 0.5},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/edgedistill-bench")
    ap.add_argument("--target", default="phone-4gb")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--again", action="store_true", help="re-run variants already in the results file")
    args = ap.parse_args()

    import torch
    from rich.console import Console

    from edgedistill import __version__
    from edgedistill import config as cfgmod
    from edgedistill.build import quiet_libraries
    from edgedistill.measure.profile import host_info
    from edgedistill.pipeline import Session, run_target
    from edgedistill.stages import STAGES
    from edgedistill.targets import load_target

    quiet_libraries()
    console = Console(stderr=True)
    target = load_target(args.target)
    upto = [s for s in STAGES if s.name in ("teacher", "plan", "data", "init", "distill")]
    done = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    rows = {r["variant"]: r for r in done.get("results", [])}
    session = None
    for name in args.variants:
        cfg = cfgmod.resolve({"targets": [args.target], "out": args.out, "distill": VARIANTS[name]})
        settings = cfg.distill.model_dump(mode="json")
        if not args.again and rows.get(name, {}).get("distill") == settings:
            console.print(f"[dim]{name}: in {RESULTS.name} already[/dim]")
            continue
        console.print(f"[bold]{name}[/bold]")
        if session is None:
            session = Session(cfg, console, progress=True)
        session.cfg = cfg  # the teacher stays loaded; the cached stages are shared by key
        t0 = time.perf_counter()
        records = run_target(upto, session, target)
        summary = records["distill"].summary
        rows[name] = {"variant": name, "distill": settings, "quality": summary["quality"],
                      "train": {k: summary["train"].get(k) for k in ("steps", "tokens", "seconds", "tokens_per_s",
                                                                      "final_loss", "mixed_precision")},
                      "on_policy_batches": summary["train"].get("on_policy_batches"),
                      "cached": records["distill"].cached, "seconds": round(time.perf_counter() - t0, 1)}
        q = summary["quality"]["student"]
        console.print(f"  top-1 {q['top1_agreement']:.3f}  KL {q['kl']:.3f}  ppl {q['perplexity']:.4g}")
        out = {
            "command": "python benchmarks/loss_quality.py " + " ".join([f"--out {args.out}", f"--target {args.target}"]),
            "machine": host_info() | {"python": platform.python_version(), "torch": torch.__version__,
                                      "edgedistill": __version__},
            "basis": "measured on this host: the PyTorch float student after distillation against the teacher "
                     "on held-out teacher answers",
            "target": args.target, "preset": cfg.preset,
            "results": [rows[v] for v in VARIANTS if v in rows],
        }
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(out, indent=2) + "\n")
        RESULTS.with_suffix(".md").write_text(markdown(out))
    if RESULTS.is_file():
        print(markdown(json.loads(RESULTS.read_text())))


def markdown(out: dict) -> str:
    first = out["results"][0]["quality"]
    t, init = first["teacher"], first["student_init"]
    lines = [f"# Held-out quality by distillation objective ({out['preset']} preset, {out['target']})", "",
             f"`{out['command']}`", "",
             f"{out['basis'][0].upper() + out['basis'][1:]}; {t['tokens']} held-out positions. Teacher perplexity "
             f"{t['perplexity']:.3f}; the initialised student before training: top-1 {init['top1_agreement']:.3f}, "
             f"KL {init['kl']:.3f}, perplexity {init['perplexity']:.4g}.", "",
             "| objective | top-1 agreement | KL(teacher‖student) | perplexity | ppl / teacher | tokens | train s |",
             "|---|---|---|---|---|---|---|"]
    for r in out["results"]:
        q = r["quality"]["student"]
        lines.append(f"| {r['variant']} | {q['top1_agreement']:.3f} | {q['kl']:.3f} | {q['perplexity']:.4g} | "
                     f"{q['perplexity'] / r['quality']['teacher']['perplexity']:.2f}x | {r['train']['tokens']:,} | "
                     f"{r['train']['seconds']:.0f} |")
    m = out["machine"]
    lines += ["", f"Machine: {m.get('cpu_model')}, {m.get('logical_cores')} logical cores, "
              f"torch {m.get('torch')}, Python {m.get('python')}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
