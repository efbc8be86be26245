"""Projection arithmetic, budget checks (each failing on its own) and the report files."""

from __future__ import annotations

import json
import math

import pytest

from edgedistill.budget import all_ok, check_artifact, failures, fmt_num
from edgedistill.errors import UserError
from edgedistill.measure import profile
from edgedistill.measure.project import footprint, kv_bytes_per_token, memory_tier, project
from edgedistill.report import load_report, missing_fields, render, write_reports
from edgedistill.targets import TargetProfile, load_target

# A hand-made target with round numbers, so every projected figure can be checked by hand.
BASE = {
    "name": "round-numbers",
    "context": 1000,
    "formats": ["gguf-q4_0"],
    "device": {"ram_gb": 4.0, "bandwidth_gb_s": 10.0, "compute_gflops": 100.0, "decode_efficiency": 0.5,
               "prefill_efficiency": 0.2, "sustained": 0.5, "active_power_w": 2.0, "battery_wh": 10.0, "threads": 4},
    "budget": {"memory_gb": 0.2, "artifact_gb": 0.1, "min_decode_tok_s": 50.0, "max_ttft_s": 1.0,
               "prompt_tokens": 100, "max_energy_j_per_100_tok": 5.0, "max_battery_pct_per_hour": 1.0,
               "runtime_overhead_mb": 100.0},
}
WEIGHTS, PARAMS, KV = 20e6, 25e6, 5000


def target(**changes) -> TargetProfile:
    data = json.loads(json.dumps(BASE))
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        data[section][key] = value
    return TargetProfile.model_validate(data)


def projected(t: TargetProfile) -> dict:
    return project(t, weight_bytes=WEIGHTS, params=PARAMS, kv_bytes_per_token=KV)


# ------------------------------------------------------------------------------------------ projection


def test_kv_bytes_per_token():
    assert kv_bytes_per_token(10, 2, 64) == 2 * 10 * 2 * 64 * 2 == 5120
    assert kv_bytes_per_token(30, 3, 64, dtype_bytes=1) == 11520
    with pytest.raises(ValueError):
        kv_bytes_per_token(0, 2, 64)


def test_footprint_arithmetic():
    fp = footprint(18e6, 5120, 2048, 120)
    assert fp["weights_mb"] == pytest.approx(18.0)
    assert fp["kv_cache_mb"] == pytest.approx(5120 * 2048 / 1e6)  # 10.49 MB
    assert fp["overhead_mb"] == 120
    assert fp["total_mb"] == pytest.approx(18.0 + 10.48576 + 120)
    assert "KV cache" in fp["basis"]


def test_projection_hand_checked():
    p = projected(target())
    # decode: 0.5 x 0.5 x 10e9 B/s / (20e6 weights + 5000 B x 1000 / 2 KV) = 2.5e9 / 22.5e6
    assert p["decode_tok_s"] == pytest.approx(111.111, rel=1e-4)
    # prefill: 0.2 x 0.5 x 100e9 FLOP/s / (2 x 25e6) = 200 tok/s; TTFT = 100 / 200 s
    assert p["prefill_tok_s"] == pytest.approx(200.0)
    assert p["ttft_ms"] == pytest.approx(500.0)
    # footprint: 20 MB + 5 MB KV at the full 1000 context + 100 MB
    assert p["footprint_mb"] == pytest.approx(125.0)
    assert p["footprint"]["kv_cache_mb"] == pytest.approx(5.0)
    # energy: 2 W / 111.1 tok/s x 100 = 1.8 J
    assert p["energy_j_per_100_tokens"] == pytest.approx(1.8)
    # battery: per minute 30/111.1 + 30/200 = 0.42 s at 2 W = 0.84 J; x60 = 50.4 J of 36000 J = 0.14%
    assert p["battery_pct_per_hour"] == pytest.approx(0.14)
    assert p["memory_tier"] == "<1 GB"
    for word in ("roofline", "half of 1000 context", "per minute"):
        assert word in p["basis"]


def test_projection_context_override_and_mains():
    p = project(target(), weight_bytes=WEIGHTS, params=PARAMS, kv_bytes_per_token=KV, context=2000)
    assert p["decode_tok_s"] == pytest.approx(2.5e9 / 25e6)
    assert p["footprint"]["kv_cache_mb"] == pytest.approx(10.0)
    mains = TargetProfile.model_validate({**BASE, "device": {**BASE["device"], "battery_wh": None},
                                          "budget": {**BASE["budget"], "max_battery_pct_per_hour": None}})
    p = projected(mains)
    assert p["battery_pct_per_hour"] is None and "mains" in p["basis"]
    with pytest.raises(ValueError):
        project(mains, weight_bytes=0, params=PARAMS, kv_bytes_per_token=KV)


def test_memory_tiers():
    assert memory_tier(0) == "<1 GB"
    assert memory_tier(999_999_999) == "<1 GB"
    assert memory_tier(1e9) == "1-10 GB"
    assert memory_tier(9.99e9) == "1-10 GB"
    assert memory_tier(10e9) == "10-50 GB"
    assert memory_tier(50e9) == ">50 GB"


def test_calibration_30m_student_fits_phones_not_wearable():
    """The profiles' intent: a ~30M-param Q4_0 student passes the phones, the wearable needs a smaller one."""
    kv = kv_bytes_per_token(10, 2, 64)
    for name in ("phone-4gb", "phone-8gb", "phone-12gb", "iphone-8gb"):
        t = load_target(name)
        p = project(t, weight_bytes=18e6, params=30e6, kv_bytes_per_token=kv)
        assert all_ok(check_artifact(t, artifact_bytes=18_500_000, projected=p, footprint=p["footprint"])), name
    t = load_target("wearable-1gb")
    p = project(t, weight_bytes=18e6, params=30e6, kv_bytes_per_token=kv)
    failed = [c["name"] for c in check_artifact(t, artifact_bytes=18_500_000, projected=p, footprint=p["footprint"])
              if not c["ok"]]
    assert failed == ["ttft_ms"]
    small = project(t, weight_bytes=8e6, params=12e6, kv_bytes_per_token=kv_bytes_per_token(4, 1, 64))
    assert all_ok(check_artifact(t, artifact_bytes=8_200_000, projected=small, footprint=small["footprint"]))


# --------------------------------------------------------------------------------------------- budget


def checks_for(t: TargetProfile, artifact_bytes: int = 20_000_000) -> dict:
    p = projected(t)
    return {c["name"]: c for c in check_artifact(t, artifact_bytes=artifact_bytes, projected=p,
                                                 footprint=p["footprint"])}


def test_all_checks_pass_with_headroom():
    checks = checks_for(target())
    assert set(checks) == {"footprint_mb", "artifact_mb", "decode_tok_s", "ttft_ms", "energy_j_per_100_tokens",
                           "battery_pct_per_hour"}
    for c in checks.values():
        assert c["ok"] and c["margin_pct"] > 0, c
        assert set(c) >= {"name", "value", "limit", "unit", "ok", "margin_pct", "basis", "message"}
    assert checks["artifact_mb"]["basis"] == "measured"
    assert checks["decode_tok_s"]["basis"] == "projected"
    # decode 111.1 vs 50 required: +122% headroom
    assert checks["decode_tok_s"]["margin_pct"] == pytest.approx(122.22, abs=0.01)
    # memory 125 MB vs 200 MB: +37.5%
    assert checks["footprint_mb"]["margin_pct"] == pytest.approx(37.5)


@pytest.mark.parametrize("change, name, expected_margin", [
    ({"budget__memory_gb": 0.1}, "footprint_mb", -25.0),  # 125 MB vs 100 MB
    ({"budget__artifact_gb": 0.016}, "artifact_mb", -25.0),  # 20 MB vs 16 MB
    ({"budget__min_decode_tok_s": 200.0}, "decode_tok_s", -44.44),  # 111.1 vs 200
    ({"budget__max_ttft_s": 0.4}, "ttft_ms", -25.0),  # 500 ms vs 400 ms
    ({"budget__max_energy_j_per_100_tok": 1.2}, "energy_j_per_100_tokens", -50.0),  # 1.8 J vs 1.2 J
    ({"budget__max_battery_pct_per_hour": 0.1}, "battery_pct_per_hour", -40.0),  # 0.14% vs 0.1%
])
def test_each_budget_failing_alone(change, name, expected_margin):
    checks = checks_for(target(**change))
    bad = checks[name]
    assert not bad["ok"]
    assert bad["margin_pct"] == pytest.approx(expected_margin, abs=0.01)
    assert "round-numbers" in bad["message"] and "\u2212" in bad["message"]
    assert bad["message"].startswith(("memory", "artifact", "decode", "time to first token", "energy", "battery"))
    others = [c for n, c in checks.items() if n != name]
    assert all(c["ok"] for c in others)
    assert not all_ok(list(checks.values()))
    assert failures(list(checks.values())) == [bad["message"]]


def test_each_budget_fails_alone_under_strict_too():
    """--strict adds failures only for untrusted models; a trusted host check leaves each budget failing alone."""
    from edgedistill.budget import apply_host_trust

    exact = {"error_pct": {"decode": 0.0, "prefill": -10.0}, "trusted": {"decode": True, "prefill": True},
             "bound_pct": 30.0}
    for change, name in (({"budget__memory_gb": 0.1}, "footprint_mb"), ({"budget__min_decode_tok_s": 200.0}, "decode_tok_s"),
                         ({"budget__max_ttft_s": 0.4}, "ttft_ms"), ({"budget__max_battery_pct_per_hour": 0.1},
                                                                   "battery_pct_per_hour")):
        t = target(**change)
        p = projected(t)
        checks = apply_host_trust(check_artifact(t, artifact_bytes=20_000_000, projected=p, footprint=p["footprint"]),
                                  exact, strict=True)
        assert [c["name"] for c in checks if not c["ok"]] == [name]


def test_decode_message_reads_plainly():
    msg = checks_for(target(budget__min_decode_tok_s=200.0))["decode_tok_s"]["message"]
    assert msg == "decode 111 tok/s projected on round-numbers < 200 required (\u221244.4%)"


def test_optional_budgets_add_no_check_when_unset():
    mains = TargetProfile.model_validate({**BASE, "budget": {**BASE["budget"], "max_energy_j_per_100_tok": None,
                                                             "max_battery_pct_per_hour": None}})
    assert set(checks_for(mains)) == {"footprint_mb", "artifact_mb", "decode_tok_s", "ttft_ms"}


def test_missing_projected_value_fails_clearly():
    t = target()
    p = projected(t)
    p["decode_tok_s"] = None
    c = {c["name"]: c for c in check_artifact(t, artifact_bytes=1, projected=p, footprint=p["footprint"])}
    assert not c["decode_tok_s"]["ok"] and c["decode_tok_s"]["margin_pct"] is None
    assert "no projected value" in c["decode_tok_s"]["message"]


def test_fmt_num():
    assert [fmt_num(x) for x in (6.2, 10.0, 183.4, 1730.2, 0.0123, 0)] == ["6.2", "10", "183", "1730", "0.0123", "0"]
    assert fmt_num(math.nan) == "n/a"


# --------------------------------------------------------------------------------------------- report


def sample_report(t: TargetProfile) -> dict:
    p = projected(t)
    artifacts = []
    for fmt, file, nbytes in (("gguf-q4_0", "model-q4_0.gguf", 20_000_000), ("onnx-int4", "onnx-int4", 21_000_000)):
        checks = check_artifact(t, artifact_bytes=nbytes, projected=p, footprint=p["footprint"])
        artifacts.append({
            "file": file, "format": fmt, "bytes": nbytes, "sha256": "0" * 64,
            "parity": {"top1_agreement": 0.98, "kl": 0.004},
            "host": {"decode_tok_s": 420.5, "prefill_tok_s": 2500.0, "ttft_ms": 40.0, "peak_rss_mb": 310.0,
                     "basis": "measured in a child process"},
            "projected": {k: p[k] for k in ("decode_tok_s", "prefill_tok_s", "ttft_ms", "footprint_mb",
                                            "energy_j_per_100_tokens", "battery_pct_per_hour", "basis")},
            "footprint": p["footprint"], "memory_tier": p["memory_tier"], "checks": checks, "ok": all_ok(checks),
        })
    return {
        "schema_version": 1, "target": t.name, "ok": all(a["ok"] for a in artifacts),
        "teacher": {"id": "smollm2-135m-instruct", "params": 134515008},
        "student": {"params": 25_000_000, "shape": {"layers": 10, "hidden": 384, "intermediate": 1024,
                                                     "heads": 6, "kv_heads": 2}},
        "quality": {"teacher": {"top1_agreement": 1.0, "kl": 0.0, "perplexity": 11.8},
                    "student_init": {"top1_agreement": 0.08, "kl": 4.1, "perplexity": 2100.0},
                    "student": {"top1_agreement": 0.52, "kl": 0.9, "perplexity": 27.5}},
        "artifacts": artifacts,
        "target_profile": t.model_dump(),
        "host": profile.host_info(),
        "timings_s": {"plan": 0.2, "distill": 95.0, "export": 3.5},
    }


def test_report_files_written_and_json_round_trips(tmp_path):
    t = target(budget__max_ttft_s=0.4)  # one failing check, so the report has a FAIL to show
    report = sample_report(t)
    assert missing_fields(report) == []
    write_reports(report, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.json", "report.md"]
    assert load_report(tmp_path) == json.loads(json.dumps(report))

    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "FAIL" in md and "2 of 12 checks failed" in md  # the TTFT check of both artifacts
    for a in report["artifacts"]:
        for c in a["checks"]:
            assert c["name"] in md and c["message"] in md
    for word in ("smollm2-135m-instruct", "Untrained student", "Distilled student", "perplexity", "<1 GB",
                 "roofline", "Stage timings"):
        assert word in md, word

    assert html.startswith("<!DOCTYPE html>") and html.count("<svg") >= 4  # checks x2, memory, quality
    assert "time to first token" in html
    for offline in ("<script", "<link", "src=", "http://", "https://", "@import"):
        assert offline not in html, offline


def test_render_rebuilds_md_and_html_from_json(tmp_path):
    write_reports(sample_report(target()), tmp_path)
    (tmp_path / "report.md").unlink()
    (tmp_path / "report.html").unlink()
    render(tmp_path)
    assert "PASS" in (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "<svg" in (tmp_path / "report.html").read_text(encoding="utf-8")
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*"))


def test_render_without_report_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no report found"):
        render(tmp_path)
    (tmp_path / "report.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="not valid JSON"):
        render(tmp_path)


def test_minimal_report_renders_with_defaults(tmp_path):
    report = {"target": "phone-4gb", "ok": False, "artifacts": [{"file": "model-q4_0.gguf", "format": "gguf-q4_0"}],
              "quality": {"student": {"perplexity": float("nan"), "kl": 1.5}}}
    assert "teacher.id" in missing_fields(report)
    assert "artifacts[0].sha256" in missing_fields(report)
    write_reports(report, tmp_path)
    data = load_report(tmp_path / "report.json")
    assert data["schema_version"] == 1 and data["quality"]["student"]["perplexity"] is None
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "model-q4_0.gguf" in md and "n/a" in md
    assert "<svg" in (tmp_path / "report.html").read_text(encoding="utf-8")


def test_html_escapes_report_text(tmp_path):
    report = sample_report(target())
    report["teacher"]["id"] = "<script>alert(1)</script>"
    write_reports(report, tmp_path)
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_host_info_describes_this_machine():
    info = profile.host_info()
    assert info["cpu_model"] and info["logical_cores"] >= 1 and info["python"]
    assert "onnxruntime" in info["versions"] and "llama_cpp" in info["versions"]


def test_profile_rejects_missing_artifact(tmp_path):
    with pytest.raises(FileNotFoundError):
        profile.profile_artifact(tmp_path / "nope.gguf", "gguf-q4_0", prompt_ids=[1, 2, 3])


def test_profile_child_failure_raises_with_stderr_tail(tmp_path):
    """A file that is not a GGUF: the real child process fails, and the parent reports its stderr."""
    bad = tmp_path / "model-q4_0.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(RuntimeError) as e:
        profile.profile_artifact(bad, "gguf-q4_0", prompt_ids=[1, 2, 3], new_tokens=2, repeats=1, timeout_s=120)
    msg = str(e.value)
    assert "profiling model-q4_0.gguf (gguf-q4_0) failed" in msg and "stderr tail" in msg
    assert "Traceback" in msg  # the child's own error, not just an exit code
