"""`edgedistill bench`: a latency regression benchmark for exported artifacts.

    edgedistill bench ART [ART...] [--threads N] [--repeats N] [--new-tokens N] [--prompt-tokens N]
                      [--baseline FILE] [--save FILE] [--tolerance PCT] [--json]

**Protocol.** `edgedistill.measure.profile`'s, unchanged: a sample comes from a fresh child
process (`profile_artifact`) that loads the artifact in its runtime, does one warm-up generation,
then RUNS_PER_PROCESS greedy generations of `--new-tokens` tokens after a `--prompt-tokens` prompt.
`--repeats` such processes per artifact; TTFT, prefill and decode have one sample per timed
generation (repeats x RUNS_PER_PROCESS), load time and peak RSS one per process. Pooling every
generation rather than taking each process's median gives a min-max that covers the machine's
noise better (on this project's shared 2-core host, 8 baseline/re-run pairs: 2 false alarms with
pooled samples, 4 with per-process medians, a 2.5x slowdown caught in all). With several
artifacts the processes are interleaved (A B A B ...), so a burst of load from elsewhere on the
machine hits every artifact rather than one. The prompt is fixed: PROMPT_RULE (speed does not
depend on which tokens they are, and no tokenizer is needed). Threads default to half the cores
this process may use (llama.cpp's own default), at least 1, and are always passed explicitly.
On a machine shared with other jobs, pin the run: `taskset -c 0 edgedistill bench ART --threads 1`
(on the 2-core host, pinned back-to-back runs were at most 24% apart in decode; unpinned, medians
moved by up to 70%, partly because llama.cpp's prompt processing uses every core whatever
--threads says).

**Metrics**, each with the direction that is better: load time (s, lower), time to first token
(ms, lower), prefill tok/s (higher), decode tok/s (higher), peak RSS (MB, lower).

**Rule.** Per metric, "worse" means slower or larger in that metric's direction, and
worse% = how much worse the new median is than the baseline median, in % of the baseline median.
A metric *regressed* when BOTH
  1. worse% > tolerance (default 10%), and
  2. the new median lies outside the baseline's [min, max] on the worse side.
Condition 1 alone flags noise: on a 2-core machine shared with other jobs, the same artifact
and command give medians that move by 20-70% from one minute to the next (measured here: TTFT
+72%, decode -35% between back-to-back runs), so a percentage wide enough to never fire would miss
real regressions. Condition 2 alone flags trivia: with a tight baseline (peak RSS varies by
kilobytes) any change is "outside the range", also 0.1%. Together: a regression is a change
larger than the tolerance that the baseline's own spread does not explain. A metric better by
the same rule is "improved"; anything else is "ok". With --repeats 1 the range of load time and
peak RSS is a single value and the rule reduces to the tolerance for them.

**Comparability.** A baseline is compared only with the same artifact (sha256 of the file, or of
an ONNX folder's files), the same machine (CPU model, CPU flags, architecture, logical and
physical cores) and the same protocol (prompt and new tokens, runs per process, prompt rule).
Otherwise the artifact is "not comparable", with the reason: neither a pass nor a regression.
Differences in threads, usable cores (affinity), CPU quota, library versions, OS, Python or the
number of repeats keep a run comparable and are listed as notes: they are exactly the changes
(an upgraded runtime, a smaller container) whose slowdown the benchmark exists to catch.

**Exit codes.** 1 when any metric of any artifact regressed; else 2 when an artifact was not
comparable with the baseline (one line on stderr with the reason; the figures are still printed
and `--save` still writes them); else 0. Not comparable is 2, not 0 or 1: 0 would let a gate
that runs against a baseline from another machine or an older artifact pass forever without
checking anything, and 1 would blame the code for a difference nobody measured. 2 is the
project's "bad input": the baseline given does not fit, record a new one with `--save`.
Bad input found before measuring (a missing or corrupt artifact, a malformed baseline, bad
options) is exit 2 with one line, and nothing is measured or written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from edgedistill import atomic
from edgedistill.errors import UserError
from edgedistill.export.manifest import artifact_sha256

SCHEMA = "edgedistill-bench/1"
RUNS_PER_PROCESS = 3  # timed generations in each child process (after its warm-up)
RUNNER_CTX = 2048  # the context the runners open (edgedistill.runtime: n_ctx=2048)
PROMPT_RULE = "token i = (1000 + 7919 * i) mod vocab_size"
DEFAULTS = {"repeats": 5, "new_tokens": 32, "prompt_tokens": 64, "tolerance": 10.0}

# What must be equal for two runs to be compared at all.
MACHINE_KEYS = ("cpu_model", "cpu_flags", "machine", "logical_cores", "physical_cores")
PROTOCOL_KEYS = ("prompt_tokens", "new_tokens", "runs_per_process", "prompt_rule")
# What may differ, shown as notes beside the verdict.
NOTE_KEYS = ("usable_cores", "cpu_quota", "os", "python")


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    better: str  # "lower" | "higher"


METRICS = (
    Metric("load_s", "load time", "s", "lower"),
    Metric("ttft_ms", "time to first token", "ms", "lower"),
    Metric("prefill_tok_s", "prefill", "tok/s", "higher"),
    Metric("decode_tok_s", "decode", "tok/s", "higher"),
    Metric("peak_rss_mb", "peak RSS", "MB", "lower"),
)
METRIC = {m.key: m for m in METRICS}
# Measured on every timed generation; load time and peak RSS exist once per process.
PER_RUN = ("ttft_ms", "prefill_tok_s", "decode_tok_s")


# ------------------------------------------------------------------------------------------ the rule


def summarize(samples: list) -> dict | None:
    """sample_stats of the samples as floats (a saved baseline's JSON may hold integers)."""
    from edgedistill.measure.profile import sample_stats

    return sample_stats([None if v is None else float(v) for v in samples])


def compare_samples(baseline: list, new: list, better: str, tolerance: float) -> dict:
    """The rule for one metric. `better` is "lower" or "higher"; `tolerance` in percent.

    Returns baseline/new summaries, change_pct (new vs baseline median, signed, in the metric's
    own units' direction), worse_pct (positive = worse), and verdict: "regression" | "improved" |
    "ok" | "n/a" (no samples on one side), with `why` in words.
    """
    b, n = summarize(baseline), summarize(new)
    out = {"baseline": b, "new": n, "change_pct": None, "worse_pct": None}
    if b is None or n is None or b["median"] == 0:
        return {**out, "verdict": "n/a", "why": "no samples" if b is None or n is None else "baseline median is 0"}
    change = (n["median"] - b["median"]) / abs(b["median"]) * 100.0
    worse = change if better == "lower" else -change
    if better == "lower":
        beyond_worse, beyond_better = n["median"] > b["max"], n["median"] < b["min"]
    else:
        beyond_worse, beyond_better = n["median"] < b["min"], n["median"] > b["max"]
    out.update(change_pct=change, worse_pct=worse)
    if worse > tolerance and beyond_worse:
        return {**out, "verdict": "regression",
                "why": f"{worse:.1f}% worse than the baseline median (tolerance {tolerance:g}%) "
                       "and outside its min-max"}
    if -worse > tolerance and beyond_better:
        return {**out, "verdict": "improved",
                "why": f"{-worse:.1f}% better than the baseline median and outside its min-max"}
    if abs(worse) > tolerance:
        return {**out, "verdict": "ok", "why": "beyond the tolerance but inside the baseline's min-max (noise)"}
    return {**out, "verdict": "ok", "why": f"within {tolerance:g}% of the baseline median"}


def comparability(base_run: dict, base_art: dict | None, new_run: dict, new_art: dict) -> tuple[list[str], list[str]]:
    """(reasons the artifact's figures cannot be compared, notes on differences that keep them comparable)."""
    reasons, notes = [], []
    if base_art is None:
        return [f"{new_art['file']} is not in the baseline"], notes
    if base_art.get("sha256") != new_art["sha256"]:
        reasons.append(f"a different artifact: sha256 {str(base_art.get('sha256'))[:12]} in the baseline, "
                       f"{new_art['sha256'][:12]} now")
    bf, nf = base_run.get("fingerprint", {}), new_run["fingerprint"]
    for k in MACHINE_KEYS:
        if bf.get(k) != nf.get(k):
            reasons.append(f"a different machine: {k} {_show(bf.get(k))} in the baseline, {_show(nf.get(k))} now")
    bp, np_ = base_run.get("protocol", {}), new_run["protocol"]
    for k in PROTOCOL_KEYS:
        if bp.get(k) != np_.get(k):
            reasons.append(f"a different protocol: {k} {_show(bp.get(k))} in the baseline, {_show(np_.get(k))} now")
    if bp.get("threads") != np_.get("threads"):
        notes.append(f"threads {bp.get('threads')} -> {np_.get('threads')}")
    if bp.get("repeats") != np_.get("repeats"):
        notes.append(f"repeats {bp.get('repeats')} -> {np_.get('repeats')}")
    for k in NOTE_KEYS:
        if bf.get(k) != nf.get(k):
            notes.append(f"{k} {_show(bf.get(k))} -> {_show(nf.get(k))}")
    bv, nv = bf.get("versions", {}) or {}, nf.get("versions", {}) or {}
    for k in sorted(set(bv) | set(nv)):
        if bv.get(k) != nv.get(k):
            notes.append(f"{k} {bv.get(k)} -> {nv.get(k)}")
    return reasons, notes


def compare(base_run: dict, new_run: dict, tolerance: float) -> list[dict]:
    """Each measured artifact against its baseline entry (matched by sha256, else by file name,
    else the only artifact of a one-artifact baseline)."""
    base_arts = base_run["artifacts"]
    out = []
    for art in new_run["artifacts"]:
        match = (next((b for b in base_arts if b.get("sha256") == art["sha256"]), None)
                 or next((b for b in base_arts if b.get("file") == art["file"]), None)
                 or (base_arts[0] if len(base_arts) == 1 and len(new_run["artifacts"]) == 1 else None))
        reasons, notes = comparability(base_run, match, new_run, art)
        metrics = {}
        if not reasons:
            for m in METRICS:
                metrics[m.key] = compare_samples(match["samples"].get(m.key, []), art["samples"][m.key],
                                                 m.better, tolerance)
        else:
            for m in METRICS:
                metrics[m.key] = {"baseline": summarize(match["samples"].get(m.key, [])) if match else None,
                                  "new": summarize(art["samples"][m.key]), "change_pct": None, "worse_pct": None,
                                  "verdict": "not comparable", "why": "; ".join(reasons)}
        regressed = [k for k, c in metrics.items() if c["verdict"] == "regression"]
        verdict = "not comparable" if reasons else ("regression" if regressed else "ok")
        out.append({"file": art["file"], "sha256": art["sha256"], "verdict": verdict, "regressed": regressed,
                    "reasons": reasons, "notes": notes, "metrics": metrics})
    return out


def _show(v) -> str:
    if isinstance(v, list):
        return "[" + " ".join(map(str, v)) + "]"
    return repr(v) if isinstance(v, str) else str(v)


# --------------------------------------------------------------------------------------- artifacts


def artifact_format(path: Path, desc: dict) -> str:
    """The format from the artifact itself: a GGUF's tensor types, an ONNX folder's export record or bits."""
    if desc["container"] == "gguf":
        types = desc.get("tensor_types") or {}
        for t in ("Q4_0", "Q8_0"):  # a Q4_0 file may keep its embedding group at Q8_0
            if t in types:
                return f"gguf-{t.lower()}"
        quant = [t for t in types if t not in ("F32", "F16", "BF16")]
        return f"gguf-{(quant or ['f32'])[0].lower()}"
    try:  # the exporter's record (edgedistill.export.onnx.INFO_FILE), read without importing onnx
        info = json.loads((path / "edgedistill_onnx.json").read_text(encoding="utf-8"))
        fmt = info.get("format") if isinstance(info, dict) else None
    except (OSError, ValueError):
        fmt = None
    if isinstance(fmt, str) and fmt.startswith("onnx-"):
        return fmt
    bits = desc.get("weight_bits") or []
    return f"onnx-int{min(bits)}" if bits else "onnx-float"


def prompt_ids(n: int, vocab_size: int) -> list[int]:
    return [(1000 + 7919 * i) % vocab_size for i in range(n)]


def fingerprint(threads: int) -> dict:
    from edgedistill import __version__
    from edgedistill.measure.profile import host_info

    return {**host_info(), "threads": threads, "edgedistill": __version__}


def _load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def default_threads() -> int:
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    return max(1, usable // 2)


# -------------------------------------------------------------------------------------- input checks


def _check_options(threads: int, repeats: int, new_tokens: int, prompt_tokens: int, tolerance: float) -> None:
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    if new_tokens < 2:
        raise UserError(f"--new-tokens must be at least 2 (decode speed needs a second token), got {new_tokens}")
    if prompt_tokens < 1:
        raise UserError(f"--prompt-tokens must be at least 1, got {prompt_tokens}")
    if not tolerance >= 0:
        raise UserError(f"--tolerance must be a percentage >= 0, got {tolerance}")


def _describe(path: Path, prompt_tokens: int, new_tokens: int) -> dict:
    from edgedistill.inspect import describe_artifact

    desc = describe_artifact(Path(path))
    vocab = desc.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 2:
        raise UserError(f"{path}: the artifact does not say its vocabulary size; cannot build the benchmark prompt")
    ctx = desc.get("context_length")
    limit = min(RUNNER_CTX, ctx) if isinstance(ctx, int) and ctx > 0 else RUNNER_CTX
    if prompt_tokens + new_tokens > limit:
        raise UserError(f"{path}: --prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} exceed the "
                        f"artifact's context of {limit} tokens")
    return desc


def load_baseline(path: Path) -> dict:
    """A file written by `--save` (or a benchmarks/suite.py result, whose latency run it takes), checked
    field by field; UserError (exit 2) naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"baseline not found: {path}")
    from edgedistill.settings_files import read_json

    data = read_json(path, f"baseline {path}")

    def bad(what: str) -> UserError:
        return UserError(f"baseline {path}: not an edgedistill bench result ({what}); write one with "
                         "`edgedistill bench ART --save FILE`")

    if isinstance(data, dict) and data.get("schema") == "edgedistill-suite/1" and isinstance(data.get("latency"), dict):
        data = data["latency"]  # benchmarks/suite.py's result holds a bench run of its artifacts
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise bad(f"expected \"schema\": \"{SCHEMA}\"")
    if not isinstance(data.get("fingerprint"), dict) or not isinstance(data.get("protocol"), dict):
        raise bad("expected objects \"fingerprint\" and \"protocol\"")
    arts = data.get("artifacts")
    if not isinstance(arts, list) or not arts:
        raise bad("expected a non-empty list \"artifacts\"")
    for i, a in enumerate(arts):
        if not isinstance(a, dict) or not isinstance(a.get("sha256"), str) or not isinstance(a.get("file"), str):
            raise bad(f"artifacts[{i}] needs text fields \"file\" and \"sha256\"")
        samples = a.get("samples")
        if not isinstance(samples, dict):
            raise bad(f"artifacts[{i}] needs an object \"samples\"")
        for k, v in samples.items():
            if k in METRIC and not (isinstance(v, list) and all(
                    x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in v)):
                raise bad(f"artifacts[{i}].samples.{k} must be a list of numbers")
    return data


def _check_save(save: Path) -> None:
    save = Path(save)
    if save.is_dir():
        raise UserError(f"--save {save} is a folder; give a file name")
    if not save.parent.is_dir():
        raise UserError(f"--save {save}: the folder {save.parent} does not exist")
    if not os.access(save.parent, os.W_OK):
        raise UserError(f"--save {save}: the folder {save.parent} is not writable")


# ------------------------------------------------------------------------------------------- measure


def measure(artifacts: list[Path], *, threads: int, repeats: int, new_tokens: int, prompt_tokens: int,
            descs: list[dict] | None = None, progress=None) -> dict:
    """Run the protocol on every artifact: the run record that `--save` writes and a baseline holds."""
    from edgedistill.measure.profile import profile_artifact

    descs = descs or [_describe(Path(p), prompt_tokens, new_tokens) for p in artifacts]
    arts = []
    for p, d in zip(artifacts, descs):
        p = Path(p)
        arts.append({"file": p.name, "path": str(p.resolve()), "format": artifact_format(p, d),
                     "bytes": d["bytes"], "sha256": artifact_sha256(p),  # as report.json and manifest.json name it
                     "prompt": prompt_ids(prompt_tokens, d["vocab_size"]),
                     "processes": []})
    started, load_before = time.time(), _load_avg()
    for _ in range(repeats):
        for a in arts:  # interleaved: background load hits every artifact alike
            a["processes"].append(profile_artifact(Path(a["path"]), a["format"], prompt_ids=a["prompt"],
                                                   new_tokens=new_tokens, repeats=RUNS_PER_PROCESS,
                                                   n_threads=threads))
            if progress:
                progress()
    for a in arts:
        procs = a.pop("processes")
        del a["prompt"]
        a["samples"] = {m.key: ([r.get(m.key) for p in procs for r in p.get("runs", [])] if m.key in PER_RUN
                                else [p.get(m.key) for p in procs]) for m in METRICS}
        a["summary"] = {k: summarize(v) for k, v in a["samples"].items()}
        a["threads_effective"] = sorted({p.get("n_threads") for p in procs if p.get("n_threads") is not None})
        a["notes"] = sorted({n for p in procs for n in p.get("notes", [])})
        a["processes"] = [{k: p.get(k) for k in ("load_s", "import_s", "ttft_ms", "prefill_tok_s", "decode_tok_s",
                                                 "peak_rss_mb", "baseline_rss_mb", "n_threads", "runs")}
                          for p in procs]
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        # how busy the machine was (1-minute load average before and after): context for noisy figures
        "load_avg_1m": {"before": load_before, "after": _load_avg()},
        "fingerprint": fingerprint(threads),
        "protocol": {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats,
                     "runs_per_process": RUNS_PER_PROCESS, "threads": threads, "prompt_rule": PROMPT_RULE,
                     "what": (f"{repeats} fresh child processes per artifact (interleaved), each: load, one warm-up "
                              f"generation, {RUNS_PER_PROCESS} greedy generations of {new_tokens} tokens after a "
                              f"{prompt_tokens}-token prompt (edgedistill.measure.profile); figures are medians "
                              f"[min-max] over all {repeats * RUNS_PER_PROCESS} timed generations (TTFT, prefill, "
                              f"decode) or over the {repeats} processes (load time, peak RSS)")},
        "artifacts": arts,
    }


def run(artifacts: list[Path], *, threads: int | None = None, repeats: int = DEFAULTS["repeats"],
        new_tokens: int = DEFAULTS["new_tokens"], prompt_tokens: int = DEFAULTS["prompt_tokens"],
        baseline: Path | None = None, save: Path | None = None, tolerance: float = DEFAULTS["tolerance"],
        command: str | None = None, progress: bool = False) -> dict:
    """Check every input, measure, compare with the baseline, save. The result holds `exit_code`
    (0 ok, 1 regression, 2 not comparable) and `message` (the one line for stderr, or None)."""
    if not artifacts:
        raise UserError("give at least one artifact (a .gguf file or an ONNX folder)")
    threads = default_threads() if threads is None else threads
    _check_options(threads, repeats, new_tokens, prompt_tokens, tolerance)
    for p in artifacts:  # the cheap checks first; describing a GGUF reads its whole vocabulary
        if not Path(p).exists():
            raise UserError(f"artifact not found: {p}")
    base = load_baseline(baseline) if baseline is not None else None
    if save is not None:
        _check_save(save)
    descs = [_describe(Path(p), prompt_tokens, new_tokens) for p in artifacts]

    with _progress(progress, len(artifacts) * repeats) as advance:
        new = measure([Path(p) for p in artifacts], threads=threads, repeats=repeats, new_tokens=new_tokens,
                      prompt_tokens=prompt_tokens, descs=descs, progress=advance)
    new["command"] = command
    comparison = compare(base, new, tolerance) if base is not None else None
    if save is not None:
        atomic.write_json(Path(save), new)

    exit_code, message = 0, None
    if comparison:
        regressed = [f"{c['file']}: {', '.join(METRIC[k].label for k in c['regressed'])}"
                     for c in comparison if c["verdict"] == "regression"]
        apart = [c for c in comparison if c["verdict"] == "not comparable"]
        if regressed:
            exit_code, message = 1, "regression: " + "; ".join(regressed)
        elif apart:
            exit_code = 2
            message = (f"not comparable with the baseline {baseline}: " + "; ".join(
                f"{c['file']}: {c['reasons'][0]}" for c in apart)
                + ". No verdict; record a baseline for this artifact on this machine with --save")
    return {"schema": SCHEMA, "run": new, "baseline": str(baseline) if baseline is not None else None,
            "baseline_created": base.get("created") if base else None, "tolerance_pct": tolerance,
            "comparison": comparison, "exit_code": exit_code, "message": message,
            "saved": str(save) if save is not None else None}


class _progress:
    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.bar = enabled, total, None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("  bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=Console(stderr=True), transient=True)
        self.bar.__enter__()
        task = self.bar.add_task("bench", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


# --------------------------------------------------------------------------------------------- print


def _num(x: float | None) -> str:
    if x is None:
        return "n/a"
    ax = abs(x)
    return f"{x:.0f}" if ax >= 100 else f"{x:.1f}" if ax >= 10 else f"{x:.3g}" if ax >= 0.01 else f"{x:.2g}"


def _cell(s: dict | None) -> str:
    if not s:
        return "-"
    return f"{_num(s['median'])} [{_num(s['min'])}-{_num(s['max'])}]"


_STYLE = {"regression": "bold red", "improved": "green", "ok": "", "not comparable": "yellow", "n/a": "dim"}


def print_result(result: dict, out, err) -> None:
    """The table on `out` (a rich Console); the one-line verdict for exit 1/2 on `err`."""
    from rich.markup import escape
    from rich.table import Table

    run_, comparison = result["run"], result["comparison"]
    by_file = {c["sha256"]: c for c in comparison} if comparison else {}
    for art in run_["artifacts"]:
        c = by_file.get(art["sha256"])
        title = f"{art['file']}  {art['format']}  {art['bytes'] / 1e6:.1f} MB  sha256 {art['sha256'][:12]}"
        table = Table(title=escape(title), title_justify="left")
        table.add_column("metric")
        table.add_column(escape("baseline median [min-max]"), justify="right")
        table.add_column(escape("new median [min-max]"), justify="right")
        table.add_column("change", justify="right")
        table.add_column("verdict")
        for m in METRICS:
            label = f"{m.label} ({m.unit}, {m.better} is better)"
            if c is None:
                table.add_row(label, "-", _cell(art["summary"][m.key]), "-", "no baseline")
                continue
            mc = c["metrics"][m.key]
            change = "-" if mc["change_pct"] is None else f"{mc['change_pct']:+.1f}%"
            verdict = mc["verdict"]
            style = _STYLE.get(verdict, "")
            table.add_row(label, _cell(mc["baseline"]), _cell(mc["new"]), change,
                          f"[{style}]{escape(verdict)}[/{style}]" if style else escape(verdict))
        out.print(table)
        if c is not None:
            for r in c["reasons"]:
                out.print(f"  not comparable: {escape(r)}", highlight=False)
            if c["notes"]:
                out.print(f"  differs from the baseline (still comparable): {escape('; '.join(c['notes']))}",
                          highlight=False)
        if art.get("notes"):
            out.print(f"  note: {escape('; '.join(art['notes']))}", highlight=False)
    fp, pr = run_["fingerprint"], run_["protocol"]
    versions = ", ".join(f"{k} {v}" for k, v in (fp.get("versions") or {}).items() if v)
    out.print(escape(f"machine: {fp['cpu_model']} ({fp['machine']}), {fp['logical_cores']} logical / "
                     f"{fp['physical_cores']} physical cores, {fp['usable_cores']} usable; threads {pr['threads']}; "
                     f"{fp['os']}; Python {fp['python']}; edgedistill {fp['edgedistill']}; {versions}"), highlight=False)
    out.print(escape(f"protocol: {pr['what']}"), highlight=False)
    if result["baseline"]:
        out.print(escape(f"baseline: {result['baseline']} ({result['baseline_created']}); rule: regression when the "
                         f"new median is more than {result['tolerance_pct']:g}% worse than the baseline median AND "
                         "outside the baseline's min-max"), highlight=False)
    if result["saved"]:
        out.print(escape(f"saved this run to {result['saved']}"), highlight=False)
    if result["exit_code"] == 0:
        out.print("no regression" if comparison else "no baseline given: figures only (exit 0)")
    else:
        err.print(f"[{'red' if result['exit_code'] == 1 else 'yellow'}]{escape(result['message'])}", highlight=False,
                  soft_wrap=True)


def command_line() -> str:
    import shlex

    return shlex.join(["edgedistill", *sys.argv[1:]])
