"""One build: resolve targets, run the stages per target (sharing what is shared), publish, verdict."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgedistill import atomic, processes
from edgedistill import teacher as teacher_mod
from edgedistill.config import BuildConfig, dump_toml
from edgedistill.data.prompts import load_user_file
from edgedistill.errors import UserError
from edgedistill.pipeline import Record, Session, _digest, _load_record, publish, run_target, stage_key, stages_root
from edgedistill.plan import describe, solve
from edgedistill.targets import TargetProfile, load_target

CONFIG_FILE = "build-config.toml"


def prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {out}: {e.strerror}; choose another with --out") from None
    # a real write, not os.access: root passes every permission check, yet a read-only or
    # special file system still refuses the file
    try:
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UserError(f"output folder {out} is not writable ({e.strerror}); choose another with --out") from None


def write_config(cfg: BuildConfig) -> Path:
    path = Path(cfg.out) / CONFIG_FILE
    atomic.write_text(path, dump_toml(cfg))
    return path


def plan_table(target: TargetProfile, plan: dict) -> Table:
    s = plan["shape"]
    t = Table(title=f"plan for {target.name}: {s['layers']} layers x hidden {s['hidden']} (intermediate "
                    f"{s['intermediate']}, heads {s['heads']}/{s['kv_heads']} kv), {plan['params'] / 1e6:.1f}M "
                    f"params ({plan['compression']:.1f}x smaller), {plan['format']}{_groups(plan)}, context {plan['context']}",
              title_justify="left")
    for col in ("budget", "figure", "limit", "ok", "arithmetic"):
        t.add_column(col, overflow="fold")
    for c in plan["checks"]:
        t.add_row(c["name"], f"{c['value']:.3g} {c['unit']}", f"{'<=' if c['sense'] == 'le' else '>='} "
                  f"{c['limit']:.3g}", "yes" if c["ok"] else "[red]NO[/red]", c["arithmetic"])
    return t


def _groups(plan: dict) -> str:
    bits = plan.get("group_bits") or {}
    return "".join(f" ({g} at {b} bits)" for g, b in bits.items())


def plan_all(cfg: BuildConfig, targets: list[TargetProfile]) -> tuple[dict, list[dict]]:
    """Every target's plan before any work, so an impossible budget fails at once (exit 2), not after training."""
    from edgedistill.progressive import split_steps

    info = teacher_mod.describe(teacher_mod.resolve(cfg.teacher), cfg.trust_remote_code)
    teacher_mod.check_memory(info["params"], cfg.teacher_bits)
    plans = [solve(info, target, cfg.plan) for target in targets]
    for plan in plans:
        split_steps(cfg.distill.steps, len(plan["progressive"]) + 1)  # refuses fewer steps than stages
    return info, plans


def dry_run(cfg: BuildConfig, targets: list[TargetProfile], info: dict, plans: list[dict], console: Console) -> int:
    from edgedistill.stages import STAGES

    console.print(f"teacher {info['id']}: {info['params']:,} params")
    session = Session(cfg, console)
    for target, plan in zip(targets, plans):
        console.print(plan_table(target, plan))
        console.print(f"  why: {plan['why']}")
        if not plan["fits"]:
            console.print("  [yellow]warning:[/yellow] this shape misses a budget above; the build would fail its verdict")
        for r in plan["runners_up"]:
            console.print(f"  runner-up: {describe(r)}")
        for i, s in enumerate(plan["progressive"], 1):
            console.print(f"  progressive stage {i}: {describe(s)}, then prune to the plan above")
        console.print("  formats: " + ", ".join(target.formats) + f"  (trained for {target.primary_format})")
        states = _probe(STAGES, session, target, plan)
        console.print("  stages: " + ", ".join(f"{n} ({s})" for n, s in states), markup=False)
    console.print(f"resolved config written to {Path(cfg.out) / CONFIG_FILE}; replay with "
                  f"`edgedistill build --config {Path(cfg.out) / CONFIG_FILE}`")
    return 0


def _probe(stages, session: Session, target: TargetProfile, plan: dict) -> list[tuple[str, str]]:
    """Which stages a real build would skip (cached) or run, without running any."""
    from edgedistill.plan import run as plan_run
    from edgedistill.plan import summary as plan_summary

    records: dict[str, Record] = {}
    states = []
    for stage in stages:
        if any(n not in records for n in stage.after):
            states.append((stage.name, "run"))
            continue
        upstream = {n: records[n] for n in stage.after}
        key = stage_key(stage, session.cfg, target, upstream)
        if stage.run is plan_run:
            summary = plan_summary(plan)
            records[stage.name] = Record(stage.name, key, Path(), summary, _digest({"outputs": {}, "summary": summary}))
            states.append((stage.name, "computed"))
            continue
        rec = _load_record(stage, key, stages_root(session.cfg) / f"{stage.name}-{key}")
        if rec:
            records[stage.name] = rec
        states.append((stage.name, "cached" if rec else "run"))
    return states


def quiet_libraries() -> None:
    """Our stages draw their own progress; the libraries' per-file bars and notices would drown it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("gguf").setLevel(logging.WARNING)


def build(cfg: BuildConfig, *, resume: bool = False, dry: bool = False, progress: bool = True,
          console: Console | None = None) -> int:
    """Exit code: 0 every check met, 1 a budget or parity check failed (artifacts and report kept).

    Under `accelerate launch` (processes.py) every process runs this; the main process alone prints,
    runs the stages other than distill and publishes, and the others return 0."""
    console = console or Console(stderr=True)
    if not processes.is_main():
        console, progress = Console(stderr=True, quiet=True), False
    quiet_libraries()
    # every input is checked before anything is written: bad input leaves no trace
    targets = [load_target(t) for t in cfg.targets]
    for t in [cfg.teacher, *cfg.distill.teachers]:
        teacher_mod.check_files(teacher_mod.resolve(t))
    if processes.launched() and cfg.plan.progressive:
        # the init stage trains its intermediates on the main process alone, while the others wait
        raise UserError("--progressive is not supported under a multi-process launch; run it in one process")
    if processes.launched() and cfg.distill.refine_rounds:
        raise UserError("--refine is not supported under a multi-process launch; run it in one process")
    for f in cfg.data.prompts:
        load_user_file(Path(f))
    info, plans = plan_all(cfg, targets)
    out = Path(cfg.out)
    prepare_out(out)
    write_config(cfg)
    if dry:
        code = dry_run(cfg, targets, info, plans, console)
        processes.finish()
        return code
    from edgedistill.report import files_to_publish, render_comparison
    from edgedistill.stages import STAGES

    session = Session(cfg, console, resume=resume, progress=progress)
    all_ok = True
    for target in targets:
        records = run_target(STAGES, session, target)
        if not processes.is_main():
            continue
        final = publish(out, target, files_to_publish(records))
        rep = records["report"].summary
        all_ok &= rep["ok"]
        verdict = "[green]PASS[/green]" if rep["ok"] else "[red]FAIL[/red]"
        console.print(f"{verdict} {target.name}: {final}/report.md")
        for line in rep.get("failed", []):
            console.print(f"  [red]✗[/red] {line}")
        for line in rep.get("flags", []):  # what the student lost: warnings unless --strict
            console.print(f"  [yellow]![/yellow] {escape(line)}", highlight=False)
        trust = records["budget"].summary["calibration"]
        if not trust["trusted"]:
            console.print(f"  [yellow]![/yellow] {escape(trust['message'])}" + ("" if cfg.strict else
                          " (--strict fails the figures projected with it)"), highlight=False)
    if processes.is_main():
        for path in render_comparison(out)[1:]:  # several targets in OUT: one page to compare them
            console.print(f"comparison across targets: {path}")
    processes.finish()
    return 0 if all_ok else 1
