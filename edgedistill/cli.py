"""The `edgedistill` command. Thin: options -> config -> pipeline; no logic of its own."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from edgedistill.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distill a teacher LLM into on-device student artifacts and check them against target budgets.")
err = Console(stderr=True)


def _student_shape(text: Optional[str]) -> Optional[dict]:
    if text is None:
        return None
    try:
        pairs = dict(item.split("=", 1) for item in text.split(","))
        return {k.strip(): int(v) for k, v in pairs.items()}
    except ValueError:
        raise UserError("--student takes layers=N,hidden=N,intermediate=N,heads=N,kv_heads=N") from None


def _filter_list(text: Optional[str]) -> Optional[list[str]]:
    if text is None:
        return None
    if text.strip() == "all":
        from edgedistill.data.augment import FILTERS
        return list(FILTERS)
    return [f.strip() for f in text.split(",") if f.strip()]


def _drop_none(d: dict) -> dict:
    return {k: (_drop_none(v) if isinstance(v, dict) else v) for k, v in d.items()
            if v is not None and v != {} and not (isinstance(v, dict) and not _drop_none(v))}


@app.command()
def build(
    target: List[str] = typer.Option(None, "--target", "-t", help="target profile name or .toml file; repeatable"),
    teacher: Optional[str] = typer.Option(None, help="HF folder, .gguf file, hub id, or alias (default: smollm2-135m-instruct)"),
    out: Optional[Path] = typer.Option(None, help="output folder (default: build)"),
    preset: Optional[str] = typer.Option(None, help="quick | standard | full"),
    config: Optional[Path] = typer.Option(None, help="replay a config file written by an earlier build (TOML or YAML)"),
    compression: Optional[float] = typer.Option(None, help="teacher params / student params (default 4)"),
    student: Optional[str] = typer.Option(None, help="explicit shape: layers=8,hidden=384,intermediate=1024,heads=6,kv_heads=2"),
    context: Optional[int] = typer.Option(None, help="context length (default: the target's)"),
    progressive: Optional[bool] = typer.Option(
        None, "--progressive/--no-progressive",
        help="prune and distill in stages (see --progressive-ratio), each student teaching the next"),
    progressive_ratio: Optional[float] = typer.Option(None, help="compression per progressive stage (default 2)"),
    steps: Optional[int] = typer.Option(None, help="distillation steps"),
    temperature: Optional[float] = typer.Option(None, help="KD temperature tau (> 0)"),
    alpha: Optional[float] = typer.Option(None, help="weight of the KD term vs cross-entropy, in [0, 1]"),
    loss: Optional[str] = typer.Option(
        None, help="KD divergence: forward_kl (default), reverse_kl or jsd; more loss terms: [distill.loss] in --config"),
    jsd_beta: Optional[float] = typer.Option(
        None, help="JSD beta in [0, 1]: 0 is forward KL, 1 reverse KL (default 0.5)"),
    hidden_weight: Optional[float] = typer.Option(
        None, help="weight of the hidden-state MSE through learned projections (default 0: off)"),
    attention_weight: Optional[float] = typer.Option(
        None, help="weight of the attention-map transfer at mapped layers (default 0: off)"),
    top_k: Optional[int] = typer.Option(
        None, help="KD over the teacher's top-k tokens plus one tail bucket (default 0: whole vocabulary)"),
    mode: Optional[str] = typer.Option(
        None, help="white_box (default: the teacher's logits), black_box (its text alone) or self (an EMA of the "
                   "student as its own teacher)"),
    on_policy: Optional[float] = typer.Option(
        None, help="share of steps (GKD's lambda, in [0, 1]) trained on the student's own samples, scored by the teacher"),
    extra_teacher: List[str] = typer.Option(
        None, "--extra-teacher", help="another teacher sharing the tokenizer: distill from the mean of their "
                                      "distributions; repeatable"),
    refine: Optional[int] = typer.Option(
        None, help="rounds of evaluate, more teacher answers for the weakest categories (oversampled) and distill "
                   "again; each round's per-category retention goes in the report (default 0)"),
    qat_activations: Optional[bool] = typer.Option(
        None, "--qat-activations/--no-qat-activations",
        help="QAT also models the runtime's int8 rounding of matmul inputs (default on)"),
    learn_scales: Optional[bool] = typer.Option(
        None, "--learn-scales/--no-learn-scales", help="LSQ: train each block's scale; the artifacts store the learned ones"),
    onnx_block_size: Optional[int] = typer.Option(None, help="ONNX weights per scale: 16, 32, 64 or 128 (default 32)"),
    onnx_asymmetric: Optional[bool] = typer.Option(
        None, "--onnx-asymmetric/--onnx-symmetric", help="ONNX: store a zero point per block (default symmetric)"),
    onnx_int8_per_channel: Optional[bool] = typer.Option(
        None, "--onnx-int8-per-channel/--onnx-int8-blockwise", help="ONNX INT8: one scale per output channel"),
    prompts: List[Path] = typer.Option(None, "--prompts", help="extra prompts or text (.jsonl or .txt); repeatable"),
    self_instruct: Optional[int] = typer.Option(
        None, help="requests to the teacher for new instructions like the train prompts; near-duplicates "
                   "dropped (default 0)"),
    chain_of_thought: Optional[bool] = typer.Option(
        None, "--chain-of-thought/--no-chain-of-thought",
        help="add step-by-step variants of math and reasoning prompts"),
    multi_turn: Optional[int] = typer.Option(
        None, help="train chats given a teacher-answered follow-up turn (default 0)"),
    answer_filters: Optional[str] = typer.Option(
        None, help="drop train answers: comma list of empty,truncated,too_short,too_long,repetitive, or all"),
    balance: Optional[str] = typer.Option(
        None, help="topic balancing after filtering: none (default), cap or oversample"),
    teacher_bits: Optional[int] = typer.Option(None, help="load the teacher in 8 or 4 bits (bitsandbytes)"),
    trust_remote_code: bool = typer.Option(False, help="allow the teacher's own Python code (off by default)"),
    seed: Optional[int] = typer.Option(None, help="random seed"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and write the resolved config; train nothing"),
    resume: bool = typer.Option(False, help="continue an interrupted build from its last finished stage/checkpoint"),
    progress: bool = typer.Option(True, help="show progress bars"),
    strict: Optional[bool] = typer.Option(
        None, "--strict/--no-strict",
        help="also fail budget figures projected with a model that misses this host's own measurements by more "
             "than 30% (see the report's host check)"),
):
    """Build student artifacts for one or more targets (default teacher, quick preset)."""
    from edgedistill import config as cfgmod
    from edgedistill.build import build as run_build

    base = cfgmod.load_file(config) if config else None
    overrides = _drop_none({
        "teacher": teacher, "targets": list(target) if target else None, "out": str(out) if out else None,
        "preset": preset, "seed": seed, "teacher_bits": teacher_bits,
        "trust_remote_code": trust_remote_code or None, "strict": strict,
        "plan": {"compression": compression, "student": _student_shape(student), "context": context,
                 "progressive": progressive, "progressive_ratio": progressive_ratio},
        "distill": {"steps": steps, "temperature": temperature, "alpha": alpha, "qat_activations": qat_activations,
                    "loss": {"objective": loss, "jsd_beta": jsd_beta, "hidden_weight": hidden_weight,
                             "attention_weight": attention_weight, "top_k": top_k},
                    "qat_learn_scales": learn_scales, "mode": mode, "on_policy_fraction": on_policy,
                    "teachers": list(extra_teacher) if extra_teacher else None, "refine_rounds": refine},
        "export": {"onnx_block_size": onnx_block_size,
                   "onnx_symmetric": None if onnx_asymmetric is None else not onnx_asymmetric,
                   "onnx_int8_per_channel": onnx_int8_per_channel},
        "data": {"prompts": [str(p) for p in prompts] if prompts else None, "self_instruct": self_instruct,
                 "chain_of_thought": chain_of_thought, "multi_turn": multi_turn,
                 "answer_filters": _filter_list(answer_filters), "balance": balance},
    })
    cfg = cfgmod.resolve(overrides, base)
    raise typer.Exit(run_build(cfg, resume=resume, dry=dry_run, progress=progress, console=err))


@app.command()
def targets(name: Optional[str] = typer.Argument(None, help="a profile to show in full")):
    """List the target profiles, or show one."""
    from rich.table import Table

    from edgedistill.targets import builtin_names, load_target

    out = Console(width=max(Console().width, 110))  # a listing reads better unwrapped, also in a pipe
    if name:
        t = load_target(name)
        out.print_json(t.model_dump_json())
        return
    table = Table("target", "RAM GB", "model GB", "file GB", "GB/s", "min tok/s", "context", "formats",
                  caption="model GB: weights + KV cache + runtime; file GB: artifact; formats: first is trained for")
    for n in builtin_names():
        t = load_target(n)
        table.add_row(n, f"{t.device.ram_gb:g}", f"{t.budget.memory_gb:g}", f"{t.budget.artifact_gb:g}",
                      f"{t.device.bandwidth_gb_s:g}", f"{t.budget.min_decode_tok_s:g}", str(t.context),
                      " ".join(f.split("-")[1] for f in t.formats))
    out.print(table)


@app.command()
def inspect(artifact: Path = typer.Argument(..., help="a .gguf file or an ONNX folder")):
    """What an artifact is: architecture, parameters, format, size."""
    from edgedistill.inspect import describe_artifact

    Console().print_json(data=describe_artifact(artifact))


@app.command()
def report(folder: Path = typer.Argument(..., help="a build's OUT folder (every target in it) or one OUT/<target> folder")):
    """Re-render report.md and report.html from report.json, for one target folder or every one under
    OUT (then also OUT/comparison.md and .html when there are several targets)."""
    from edgedistill.report import render_all

    for path in render_all(folder):
        Console(soft_wrap=True).print(f"rendered {path}", highlight=False, markup=False)


@app.command()
def package(
    folder: Path = typer.Argument(..., help="a build's OUT/<target> folder; it must match its manifest.json"),
    app_name: str = typer.Option(..., "--app", help="android | ios | web"),
    fmt: Optional[str] = typer.Option(None, "--format", help="the artifact to package, e.g. gguf-q8_0 or onnx-int4 "
                                                             "(default: the build's first GGUF)"),
    out: Optional[Path] = typer.Option(None, help="package folder (default: OUT/package-<target>-<app>, beside "
                                                  "the build folder); must be new, empty or an earlier package"),
    name: Optional[str] = typer.Option(None, help="model folder, bundle and asset pack name (default: <target>-<quant>)"),
    limit_mb: Optional[float] = typer.Option(None, help="check against this many MB (10^6 bytes) instead of the "
                                                        "platform's limit, e.g. 25 for a host's per-file cap"),
):
    """Lay out one artifact for an Android, iOS or web app, with a manifest, a README and a size check.
    Exit 0 packaged (also over the platform's limit: the fallback layout is written), 1 packaged but
    over the platform's ceiling, so it cannot ship that way, 2 bad input (a changed build folder, an
    artifact that failed parity, an --out that is not a package)."""
    from edgedistill.package import describe, limit_bytes_of, package_app

    out_dir, pkg = package_app(folder, app_name, fmt=fmt, out=out, name=name, limit_bytes=limit_bytes_of(limit_mb))
    for line in describe(out_dir, pkg):
        Console(soft_wrap=True).print(line, highlight=False, markup=False)
    raise typer.Exit(1 if pkg["size_check"]["over_ceiling"] else 0)


@app.command()
def verify(
    folder: Path = typer.Argument(..., help="a build's OUT/<target> folder (holds manifest.json)"),
    parity: bool = typer.Option(True, "--parity/--files-only",
                                help="also re-run the parity gate in each artifact's runtime (default), or check files only"),
    json_out: bool = typer.Option(False, "--json", help="print the result as JSON on stdout"),
    progress: bool = typer.Option(True, help="show progress bars"),
):
    """Check a published folder: every file against manifest.json (sha256, size, nothing missing or
    added), then the parity gate again. Exit 0 all good, 1 a file or check failed, 2 not a build folder."""
    from edgedistill.verify import print_result, verify_published

    result = verify_published(folder, parity=parity, progress=progress)
    if json_out:
        Console().print_json(data=result)
    else:
        print_result(result, Console(width=max(Console().width, 110)))
    raise typer.Exit(0 if result["ok"] else 1)


# errno values, and the texts libraries that wrap them (safetensors, torch, onnx) keep, of a full disk
_DISK_FULL_ERRNO = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_DISK_FULL_TEXT = ("No space left on device", "File too large", "Disk quota exceeded")


def _disk_full(e: BaseException | None) -> bool:
    while e is not None:
        if (isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNO) or any(t in str(e) for t in _DISK_FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


@app.command()
def bench(
    artifacts: List[Path] = typer.Argument(..., help="artifacts to measure: .gguf files or ONNX folders"),
    threads: Optional[int] = typer.Option(None, help="runtime threads (default: half the usable cores, at least 1)"),
    repeats: int = typer.Option(5, help="fresh processes per artifact, each: one load, a warm-up, 3 timed runs"),
    new_tokens: int = typer.Option(32, help="tokens generated per timed run"),
    prompt_tokens: int = typer.Option(64, help="prompt length (fixed token ids)"),
    baseline: Optional[Path] = typer.Option(None, help="a file written by an earlier --save to compare with"),
    save: Optional[Path] = typer.Option(None, help="write this run (fingerprint, samples, medians) here, "
                                                   "for use as a later --baseline"),
    tolerance: float = typer.Option(10.0, help="percent a median may worsen before it can count as a regression"),
    json_out: bool = typer.Option(False, "--json", help="print the result as JSON on stdout"),
):
    """Latency regression benchmark: measure artifacts with a fixed protocol and compare with a baseline.
    A metric regressed when its median is worse than the baseline's by more than --tolerance AND outside
    the baseline's min-max. Exit 0 no regression, 1 a regression, 2 bad input or a baseline that is not
    comparable (another artifact, machine or protocol)."""
    from edgedistill import bench as benchmod

    result = benchmod.run(artifacts, threads=threads, repeats=repeats, new_tokens=new_tokens,
                          prompt_tokens=prompt_tokens, baseline=baseline, save=save, tolerance=tolerance,
                          command=benchmod.command_line(), progress=err.is_terminal)
    if json_out:
        Console().print_json(data=result)
        if result["message"]:
            err.print(result["message"], highlight=False, markup=False, soft_wrap=True)
    else:
        benchmod.print_result(result, Console(width=max(Console().width, 120)), err)
    raise typer.Exit(result["exit_code"])


def main() -> None:
    debug = os.environ.get("EDGEDISTILL_DEBUG") == "1"
    # only a build keeps finished stages to resume from; other commands are simply run again
    again = ("run the same command with --resume; finished stages are kept" if sys.argv[1:2] == ["build"]
             else "run the same command again")
    try:
        rc = app(standalone_mode=False)
    except typer.Exit as e:
        rc = e.exit_code
    except UserError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        rc = 130
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, exit 3
        # Usage errors come from the click that typer vendors; they know how to show themselves.
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            rc = 130
        elif _disk_full(e) and not debug:
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            err.print(f"[red]error:[/red] the disk is full (or a file size limit was reached): {escape(first)}. "
                      f"Free some space or choose another --out, then {again}", highlight=False, soft_wrap=True)
            sys.exit(2)
        elif debug:
            raise
        else:
            err.print(f"[red]internal error:[/red] {type(e).__name__}: {escape(str(e))} (set EDGEDISTILL_DEBUG=1 for the traceback)",
                      highlight=False, soft_wrap=True)
            sys.exit(3)
    if rc == 130:  # typer turns Ctrl-C into exit code 130
        err.print(f"interrupted; {again}")
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
