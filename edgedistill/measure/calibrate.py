"""Micro-benchmarks of this host: effective memory bandwidth and matrix throughput.

They give the projection model (measure.project.roofline) the host's own figures, so the model can
be checked against the host's measured decode and prefill speed before anyone trusts it for a
target. Each runs in a fresh child process (`python -m edgedistill.measure.calibrate`) with the same
thread count as the runtimes, like the artifact measurements, so the build process's threads and
memory do not colour the figures.

- memory read: sum of a float32 array far larger than any CPU cache (bytes read / time);
- memory copy: copy of that array into another (bytes read + bytes written / time);
- matmul fp32 and int8: n x n x n products (2 n^3 operations / time); int8 is what the quantized
  runtimes' kernels use (llama.cpp Q4_0/Q8_0 dot products, onnxruntime MatMulNBits with int8
  activations), so it is the compute figure the model uses when this torch build has it.

Each figure is the median of `repeats` timed runs after one warm-up, with min and max.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgedistill import atomic

ARRAY_MB = 256  # far beyond last-level caches (tens of MB), small enough for any build host
MATMUL_N = 1024  # 2.1 G operations: tens of milliseconds on a CPU core
REPEATS = 5


def _timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up: page faults, thread pool start, kernel selection
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def rate_stats(work: float, times: list[float], scale: float) -> dict:
    """Median/min/max of work/time in units of `scale` (1e9: GB/s or GOP/s). Min rate is the slowest run."""
    from edgedistill.measure.profile import sample_stats

    stats = sample_stats([work / t / scale for t in times if t > 0])
    if stats is None:
        raise ValueError("rate_stats: no positive timing")
    return stats


def _memory(torch, array_mb: int, repeats: int) -> tuple[dict, dict]:
    """Read and copy bandwidth; the arrays are freed on return, before the matmul figures."""
    a = torch.ones(array_mb * 1_000_000 // 4, dtype=torch.float32)
    b = torch.empty_like(a)
    nbytes = a.numel() * 4
    read = rate_stats(nbytes, _timed(lambda: a.sum(), repeats), 1e9)
    copy = rate_stats(2 * nbytes, _timed(lambda: b.copy_(a), repeats), 1e9)
    return read, copy


def _measure(threads: int, array_mb: int, n: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    read, copy = _memory(torch, array_mb, repeats)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    fp32 = rate_stats(2 * n ** 3, _timed(lambda: x @ y, repeats), 1e9)
    int8, int8_why = None, None
    try:
        xi = torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=gen)
        yi = torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=gen)
        int8 = rate_stats(2 * n ** 3, _timed(lambda: torch._int_mm(xi, yi), repeats), 1e9)
    except (RuntimeError, AttributeError, NotImplementedError) as e:  # older torch or no CPU kernel
        int8_why = f"{type(e).__name__}: {str(e)[:200]}"
    compute, kind = (int8, "int8") if int8 else (fp32, "fp32")
    return {
        "threads": threads,
        "memory_read_gb_s": read,
        "memory_copy_gb_s": copy,
        "matmul_fp32_gflop_s": fp32,
        "matmul_int8_gop_s": int8,
        "matmul_int8_unavailable": int8_why,
        "bandwidth_gb_s": read["median"],
        "compute_gflops": compute["median"],
        "compute_kind": kind,
        "torch": torch.__version__,
        "basis": (f"measured on this host in a fresh child process with {threads} thread(s): median of {repeats} "
                  f"runs after a warm-up; bandwidth = {array_mb} MB float32 array summed (bytes read / time); "
                  f"copy counts bytes read + written; matmul = {n}x{n}x{n} torch product, 2n^3 operations / time; "
                  f"the model uses read bandwidth and the {kind} matmul figure"),
    }


def calibrate_host(threads: int, *, array_mb: int = ARRAY_MB, n: int = MATMUL_N, repeats: int = REPEATS,
                   timeout_s: float = 300) -> dict:
    """The host's micro-benchmark figures, measured in a child process (see the module doc)."""
    from edgedistill.measure.profile import run_child

    if threads < 1 or array_mb < 1 or n < 16 or repeats < 1:
        raise ValueError("calibrate_host: threads, array_mb, n and repeats must be positive (n >= 16)")
    return run_child("edgedistill.measure.calibrate", ["--threads", str(threads), "--array-mb", str(array_mb),
                                                        "--n", str(n), "--repeats", str(repeats)],
                     what="host calibration micro-benchmarks", timeout_s=timeout_s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgedistill.measure.calibrate",
                                 description="Measure this host's memory bandwidth and matrix throughput.")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--array-mb", type=int, default=ARRAY_MB)
    ap.add_argument("--n", type=int, default=MATMUL_N)
    ap.add_argument("--repeats", type=int, default=REPEATS)
    ap.add_argument("--out", type=Path, help="write the result as JSON to this file (else stdout)")
    ap.add_argument("--json", action="store_true", help="also print the result on stdout")
    args = ap.parse_args(argv)
    result = _measure(args.threads, args.array_mb, args.n, args.repeats)
    if args.out:
        atomic.write_json(args.out, result)
    if args.json or not args.out:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
