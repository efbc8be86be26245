"""Time the quick preset's whole build on the default teacher, and the teacher's own GGUF decode speed.

    python benchmarks/quick_build.py [--out /tmp/edgedistill-bench] [--target phone-4gb]

Writes benchmarks/results/quick_build.json: wall time of the build (cold: empty output folder),
seconds per stage, student vs teacher, artifact sizes, parity, host decode tok/s of each artifact and
of the teacher exported by the same GGUF writer at Q4_0 and Q8_0, and the machine it ran on.
Goal (issue 2): the quick build finishes within 20 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def teacher_gguf_decode(out: Path, prompt_tokens: int = 128) -> dict:
    """The teacher itself, exported by our GGUF writer, measured with the same protocol as the artifacts."""
    from edgedistill.export.gguf import export_gguf
    from edgedistill.measure.profile import profile_artifact

    snapshot = next((out / ".stages").glob("teacher-*/teacher"))
    gguf_src = json.loads(next((out / ".stages").glob("teacher-*/stage.json")).read_text())["summary"]["tokenizer_gguf"]
    heldout = next((out / ".stages").glob("data-*/heldout_tokens.jsonl")).read_text().splitlines()
    ids = [i for line in heldout for i in json.loads(line)["input_ids"]][:prompt_tokens]
    results = {}
    for fmt in ("gguf-q4_0", "gguf-q8_0"):
        path = out / f"teacher-{fmt.split('-')[1]}.gguf"
        export_gguf(snapshot, path, fmt, tokenizer_gguf=Path(gguf_src) if gguf_src else None)
        m = profile_artifact(path, fmt, prompt_ids=ids, new_tokens=32, repeats=3)
        results[fmt] = {"bytes": path.stat().st_size, "decode_tok_s": m["decode_tok_s"],
                        "prefill_tok_s": m["prefill_tok_s"], "ttft_ms": m["ttft_ms"], "peak_rss_mb": m["peak_rss_mb"]}
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/edgedistill-bench"))
    ap.add_argument("--target", default="phone-4gb")
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    cmd = ["edgedistill", "build", "--target", args.target, "--out", str(args.out), "--no-progress"]
    t0 = time.perf_counter()
    # the console script of the interpreter running this file, whether or not its venv is activated
    proc = subprocess.run([sys.executable, "-m", "edgedistill.cli", *cmd[1:]])
    wall = time.perf_counter() - t0
    report = json.loads((args.out / args.target / "report.json").read_text())
    result = {
        "command": " ".join(cmd),
        "exit_code": proc.returncode,
        "wall_s": round(wall, 1),
        "goal_s": 1200,
        "stage_s": report["timings_s"],
        "teacher": report["teacher"],
        "student": {"params": report["student"]["params"], "shape": report["student"]["shape"]},
        "quality": {k: report["quality"][k] for k in ("teacher", "student_init", "student")},
        "training": {k: report["training"].get(k) for k in ("steps", "tokens", "seconds", "tokens_per_s")},
        "artifacts": [{"file": a["file"], "bytes": a["bytes"],
                       "parity": {k: a["parity"].get(k) for k in ("top1_agreement", "kl")},
                       "host_decode_tok_s": a["host"]["decode_tok_s"], "host_ttft_ms": a["host"]["ttft_ms"],
                       "peak_rss_mb": a["host"]["peak_rss_mb"], "ok": a["ok"]} for a in report["artifacts"]],
        "teacher_gguf": teacher_gguf_decode(args.out),
        "host": report["host"],
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    (HERE / "results").mkdir(exist_ok=True)
    dest = HERE / "results" / "quick_build.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("wall_s", "goal_s", "stage_s", "exit_code")}, indent=2))
    print(f"wrote {dest}")
    return 0 if proc.returncode in (0, 1) else proc.returncode


if __name__ == "__main__":
    sys.exit(main())
