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
