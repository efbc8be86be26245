"""The real default teacher (SmolLM2-135M-Instruct), the README's build shortened (conftest.REAL_BUILD_SHORTENED),
through the real CLI: minutes, not seconds.

Every artifact is loaded in its real runtime by the build itself (verify + profile stages); this test
checks what the build says against what the files are, and that distillation helped.
"""

from __future__ import annotations

import json

import pytest

from edgedistill.runtime import load_runner

pytestmark = pytest.mark.slow


def test_default_build_passes_its_budgets(real_build):
    res, out = real_build
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "phone-4gb" / "report.json").read_text())
    assert report["ok"] and report["teacher"]["params"] == 134_515_008
    assert report["student"]["params"] <= report["teacher"]["params"] / 4 * 1.01


def test_distillation_improves_on_the_untrained_student(real_build):
    _, out = real_build
    q = json.loads((out / "phone-4gb" / "report.json").read_text())["quality"]
    assert q["student"]["kl"] < 0.8 * q["student_init"]["kl"]
    assert q["student"]["top1_agreement"] > q["student_init"]["top1_agreement"]
    assert q["student"]["perplexity"] < q["student_init"]["perplexity"]


def test_every_artifact_matches_the_fake_quant_student_in_its_runtime(real_build):
    _, out = real_build
    report = json.loads((out / "phone-4gb" / "report.json").read_text())
    assert {a["format"] for a in report["artifacts"]} == {"gguf-q4_0", "gguf-q8_0", "onnx-int4", "onnx-int8"}
    for art in report["artifacts"]:
        p = art["parity"]
        gate = {c["name"]: c for c in art["checks"] if c["name"].startswith("parity_")}
        assert set(gate) == {"parity_weights", "parity_top1", "parity_kl"} and all(c["ok"] for c in gate.values())
        # the file holds the fake-quant codes and scales themselves
        assert p["weights"]["max_abs_diff"] == 0.0, (art["file"], p["weights"])
        # both runtimes round activations to int8 here: the reference's own noise floor was measured,
        # and the runtime lands on it (not merely under a widened bound)
        assert p["positions"] >= 1000 and p["noise_floor"]["positions"] == p["positions"]
        assert p["kl"] <= 1.5 * p["noise_floor"]["kl"] and p["kl"] < 0.01, (art["file"], p)
        assert p["sample"]["tokens"] > 0, art["file"]


@pytest.mark.parametrize("name, fmt", [("model-q4_0.gguf", "gguf-q4_0"), ("onnx-int4", "onnx-int4")])
def test_published_artifacts_generate_in_their_runtime(real_build, name, fmt):
    _, out = real_build
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "phone-4gb" / "student")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    runner = load_runner(out / "phone-4gb" / name, fmt)
    try:
        gen = runner.generate(ids, 16, stop_ids=[tok.eos_token_id])
    finally:
        runner.close()
    assert gen.tokens and all(0 <= t < len(tok) for t in gen.tokens)
    assert gen.prefill_s > 0
