"""Host measurement in a child process: real runtimes, and memory that belongs to the artifact alone."""

import numpy as np

from edgedistill.export.gguf import export_gguf
from edgedistill.measure.profile import profile_artifact


def test_profile_measures_in_a_child_whose_memory_is_its_own(tiny_teacher_dir, tmp_path):
    path = tmp_path / "tiny-q4_0.gguf"
    export_gguf(tiny_teacher_dir, path, "gguf-q4_0")
    ballast = np.ones((700, 1024, 1024), dtype=np.uint8)  # a parent as large as a build process
    r = profile_artifact(path, "gguf-q4_0", prompt_ids=list(range(10, 42)), new_tokens=8, repeats=2)
    assert ballast.sum() > 0
    # the child does not report the parent's 700 MB (Linux carries ru_maxrss across fork+exec)
    assert 0 < r["peak_rss_mb"] < 600, r["peak_rss_mb"]
    assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["ttft_ms"] > 0
    assert r["prompt_tokens"] == 32 and r["repeats"] == 2 and r["file_bytes"] == path.stat().st_size


def test_profile_records_the_protocol_threads_and_spread(tiny_teacher_dir, tmp_path):
    """Every figure of the measurement protocol is recorded: warm-up, repeats with median/min/max, load time,
    TTFT at the given prompt length, threads and runtime versions."""
    path = tmp_path / "tiny-q8_0.gguf"
    export_gguf(tiny_teacher_dir, path, "gguf-q8_0")
    r = profile_artifact(path, "gguf-q8_0", prompt_ids=list(range(10, 26)), new_tokens=6, repeats=3, n_threads=1)
    assert r["n_threads"] == 1 and r["warmup_tokens"] == 6 and r["load_s"] > 0 and r["import_s"] >= 0
    assert len(r["runs"]) == 3
    for key in ("ttft_ms", "prefill_tok_s", "decode_tok_s"):
        s = r["stats"][key]
        assert s["n"] == 3 and s["min"] <= s["median"] == r[key] <= s["max"], (key, s)
    assert r["runtime"]["llama_cpp"] and r["prompt_tokens"] == 16
    assert "median of 3" in r["basis"] and "warm-up" in r["basis"]


def test_kv_cache_figures_hand_computed():
    from edgedistill.measure.stage import kv_cache_figures

    # 2 (K and V) x 11 layers x 3 KV heads x 64 dims x 2 bytes (fp16) = 8448 B per token
    kv = kv_cache_figures({"layers": 11, "kv_heads": 3, "head_dim": 64}, 2048)
    assert kv == {"kv_bytes_per_token": 8448, "context": 2048, "kv_cache_bytes_at_context": 8448 * 2048}
