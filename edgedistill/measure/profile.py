"""Host measurement of one artifact: load time, time to first token, prefill and decode speed, peak RSS.

Each artifact is measured in a fresh child process (`python -m edgedistill.measure.profile`), so
the memory one runtime allocates is neither shared with nor inherited by the next artifact, and
the child's peak RSS (VmHWM, own address space) belongs to that artifact alone (plus the Python
interpreter and runtime libraries, which the result reports separately as `baseline_rss_mb`).

The child writes its result to a JSON file named by the parent (`--out`), not to stdout: native
runtimes may print to stdout themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

from edgedistill import atomic

MB = 1e6
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the edgedistill package
_STDERR_TAIL = 3000
# Distribution names of the libraries whose versions a measurement depends on.
_DISTRIBUTIONS = {
    "torch": "torch",
    "transformers": "transformers",
    "onnxruntime": "onnxruntime",
    "onnxruntime_genai": "onnxruntime-genai",
    "llama_cpp": "llama_cpp_python",
    "gguf": "gguf",
}


# ----------------------------------------------------------------------------------------- parent side


def profile_artifact(path: Path, fmt: str, *, prompt_ids: list[int], new_tokens: int = 32, repeats: int = 3,
                     n_threads: int | None = None, timeout_s: float = 600) -> dict:
    """Measure one artifact in a child process; the child's result dict (see `_measure`).

    Raises FileNotFoundError for a missing artifact, ValueError for bad arguments and RuntimeError,
    with the tail of the child's stderr, when the child fails, is killed or runs past `timeout_s`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"artifact not found: {path}")
    if not prompt_ids:
        raise ValueError("profile_artifact: prompt_ids must not be empty")
    if new_tokens < 1 or repeats < 1:
        raise ValueError("profile_artifact: new_tokens and repeats must be at least 1")
    if n_threads is not None and n_threads < 1:
        raise ValueError("profile_artifact: n_threads must be at least 1")

    args = ["--format", fmt, "--prompt-ids-file", "prompt_ids.json", "--new-tokens", str(new_tokens),
            "--repeats", str(repeats)]
    if n_threads is not None:
        args += ["--threads", str(n_threads)]
    args.append(str(path.resolve()))
    return run_child("edgedistill.measure.profile", args, what=f"profiling {path.name} ({fmt})", timeout_s=timeout_s,
                     input_files={"prompt_ids.json": json.dumps([int(i) for i in prompt_ids])})


def run_child(module: str, args: list[str], *, what: str, timeout_s: float,
              input_files: dict[str, str] | None = None) -> dict:
    """Run `python -m module --out FILE *args` in a fresh process and return the JSON it wrote to FILE.

    The child runs in a temporary folder holding `input_files` (name -> text), so `args` can name
    them relatively. Raises RuntimeError, with the tail of the child's stderr, when the child fails,
    is killed, runs past `timeout_s` or writes no result.
    """
    with tempfile.TemporaryDirectory(prefix="edgedistill-child-") as tmp:
        for name, text in (input_files or {}).items():
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        out_file = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, "--out", str(out_file), *args]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=timeout_s,
                                  cwd=tmp)
        except subprocess.TimeoutExpired as e:  # subprocess.run has already killed the child
            raise RuntimeError(f"{what} timed out after {timeout_s:g} s; child stderr tail:\n"
                               f"{_tail(e.stderr)}") from None
        if proc.returncode != 0:
            raise RuntimeError(f"{what} failed: {_describe_exit(proc.returncode)}; child stderr tail:\n"
                               f"{_tail(proc.stderr)}")
        if not out_file.is_file():
            raise RuntimeError(f"{what}: the child exited 0 but wrote no result; child stderr tail:\n"
                               f"{_tail(proc.stderr)}")
        try:
            return json.loads(out_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise RuntimeError(f"{what}: unreadable result from the child ({e})") from None


def _tail(data: bytes | str | None, n: int = _STDERR_TAIL) -> str:
    if not data:
        return "(empty)"
    if isinstance(data, bytes):
        data = data.decode("utf-8", errors="replace")
    data = data.strip()
    return data if len(data) <= n else "..." + data[-n:]


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        hint = " (out of memory?)" if -rc == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit status {rc}"


# ------------------------------------------------------------------------------------------ host info


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = None, []
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        named = key in ("model name", "hardware", "cpu model", "processor")
        if model is None and named and value and not value.isdigit():
            model = value
        if not flags and key in ("flags", "features"):
            flags = value.split()
    if model is None:
        model = platform.processor() or platform.machine() or "unknown"
    interesting = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8",
                   "asimd", "asimddp", "i8mm", "sve", "sve2", "bf16", "fphp", "asimdhp")
    return model, [f for f in interesting if f in flags]


def _cpu_quota() -> float | None:
    """CPUs granted by a cgroup v2 quota (containers), or None when unlimited or unknown."""
    text = _read("/sys/fs/cgroup/cpu.max")
    if not text:
        return None
    quota, _, period = text.strip().partition(" ")
    if quota == "max" or not period:
        return None
    try:
        return round(int(quota) / int(period), 2)
    except ValueError:
        return None


def _ram_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:
        text = _read("/proc/meminfo") or ""
        for line in text.splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def _versions() -> dict:
    out = {}
    for key, dist in _DISTRIBUTIONS.items():
        mod = sys.modules.get(key)
        version = getattr(mod, "__version__", None) if mod is not None else None
        if version is None:
            try:
                version = metadata.version(dist)
            except metadata.PackageNotFoundError:
                version = None
        out[key] = version
    return out


def host_info() -> dict:
    """The machine measurements were taken on. Imports no ML library (versions come from metadata)."""
    model, flags = _cpu_model_and_flags()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except Exception:
        physical = None
    max_khz = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    ram = _ram_bytes()
    return {
        "cpu_model": model,
        "cpu_flags": flags,
        "cpu_max_mhz": round(int(max_khz) / 1000) if max_khz and max_khz.strip().isdigit() else None,
        "machine": platform.machine(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        "usable_cores": usable,
        "cpu_quota": _cpu_quota(),
        "ram_gb": round(ram / 1e9, 2) if ram else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": _versions(),
    }


# ------------------------------------------------------------------------------------------ child side


def _peak_rss_mb() -> float:
    # Linux keeps ru_maxrss across fork+exec, so a child of a large parent would report the parent's
    # footprint; VmHWM belongs to this process's own address space and starts afresh at exec.
    status = _read("/proc/self/status")
    if status:
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak * 1024 / MB  # bytes on macOS, KiB on Linux


def _current_rss_mb() -> float | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss / MB
    except Exception:
        statm = _read("/proc/self/statm")
        if statm:
            return int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB
    return None


def _size_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _run_figures(gen, prompt_len: int) -> dict:
    n = len(gen.tokens)
    prefill_s, decode_s = float(gen.prefill_s), float(gen.decode_s)
    return {
        "tokens": n,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "ttft_ms": prefill_s * 1000.0,
        "prefill_tok_s": prompt_len / prefill_s if prefill_s > 0 else None,
        "decode_tok_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else None,
    }


def sample_stats(values: list) -> dict | None:
    """Median, min, max and count of the samples that are not None (None when there are none)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def _measure(path: Path, fmt: str, prompt_ids: list[int], new_tokens: int, repeats: int,
             n_threads: int | None) -> dict:
    t0 = time.perf_counter()
    from edgedistill.runtime import load_runner

    import_s = time.perf_counter() - t0
    baseline_rss = _current_rss_mb()

    t0 = time.perf_counter()
    runner = load_runner(path, fmt, n_threads=n_threads)
    load_s = time.perf_counter() - t0
    loaded_rss = _current_rss_mb()
    warmup_tokens = min(new_tokens, 8)
    runs = []
    try:
        runner.generate(list(prompt_ids), warmup_tokens)  # warm caches, kernels, thread pools
        for _ in range(repeats):
            runs.append(_run_figures(runner.generate(list(prompt_ids), new_tokens), len(prompt_ids)))
        effective_threads = getattr(runner, "n_threads", None) or n_threads
    finally:
        runner.close()
    # the high-water mark; it can lag the live RSS by a page-accounting batch.
    peak_rss = max(v for v in (_peak_rss_mb(), _current_rss_mb(), loaded_rss, baseline_rss) if v is not None)

    stats = {k: sample_stats([r[k] for r in runs]) for k in ("ttft_ms", "prefill_tok_s", "decode_tok_s")}
    stats["tokens"] = sample_stats([r["tokens"] for r in runs])
    median = {k: (stats[k]["median"] if stats[k] else None) for k in ("ttft_ms", "prefill_tok_s", "decode_tok_s")}
    notes = []
    if median["decode_tok_s"] is None:
        notes.append("no decode speed: every run stopped after its first token (stop token?)")
    elif stats["tokens"]["min"] < new_tokens:
        notes.append(f"some runs stopped early at a stop token (min {stats['tokens']['min']} of {new_tokens} tokens)")
    return {
        "file": path.name,
        "path": str(path),
        "format": fmt,
        "file_bytes": _size_bytes(path),
        "prompt_tokens": len(prompt_ids),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "warmup_tokens": warmup_tokens,
        "n_threads": effective_threads,
        "n_threads_requested": n_threads,
        "import_s": import_s,
        "load_s": load_s,
        **median,
        "peak_rss_mb": peak_rss,
        "baseline_rss_mb": baseline_rss,
        "loaded_rss_mb": loaded_rss,
        "stats": stats,
        "runs": runs,
        "runtime": {k: v for k, v in _versions().items() if k in ("llama_cpp", "onnxruntime", "onnxruntime_genai")},
        "notes": notes,
        "basis": (f"measured on this host in a fresh child process: median of {repeats} greedy runs of "
                  f"{new_tokens} new tokens after a {len(prompt_ids)}-token prompt, after one {warmup_tokens}-token "
                  f"warm-up; TTFT = time to the first token, prefill tok/s = prompt tokens / TTFT, decode tok/s = "
                  f"(tokens - 1) / time for the rest; peak RSS = the child's VmHWM (own address space), which includes the runtime "
                  f"libraries and the interpreter ({fmt_mb(baseline_rss)} before the runtime was loaded)"),
    }


def fmt_mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f} MB"


def _parse_ids(text: str) -> list[int]:
    return [int(t) for t in text.replace(",", " ").split()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgedistill.measure.profile",
                                 description="Measure one artifact on this host (run in its own process).")
    ap.add_argument("path", nargs="?", type=Path, help="artifact: a .gguf file or an ONNX folder")
    ap.add_argument("--format", dest="fmt", help="artifact format, e.g. gguf-q4_0, onnx-int4")
    ap.add_argument("--prompt-ids", help="prompt token ids, comma or space separated")
    ap.add_argument("--prompt-ids-file", type=Path, help="JSON list of prompt token ids")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    ap.add_argument("--out", type=Path, help="also write the result as JSON to this file")
    ap.add_argument("--host-info", action="store_true", help="print this host's description and exit")
    args = ap.parse_args(argv)

    if args.host_info:
        print(json.dumps(host_info(), indent=2))
        return 0
    if args.path is None or not args.fmt:
        ap.error("an artifact path and --format are required")
    if args.prompt_ids_file:
        prompt_ids = [int(i) for i in json.loads(args.prompt_ids_file.read_text(encoding="utf-8"))]
    elif args.prompt_ids:
        prompt_ids = _parse_ids(args.prompt_ids)
    else:
        ap.error("--prompt-ids or --prompt-ids-file is required")
    if not prompt_ids or args.new_tokens < 1 or args.repeats < 1:
        ap.error("need a non-empty prompt, --new-tokens >= 1 and --repeats >= 1")

    try:
        result = _measure(args.path, args.fmt, prompt_ids, args.new_tokens, args.repeats, args.threads)
    except Exception:
        traceback.print_exc()
        return 1
    if args.out:
        atomic.write_json(args.out, result)
    if args.json or not args.out:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
