"""Host calibration: micro-benchmarks, the projection model checked on the host, trust and --strict,
the energy cross-check and the largest context that fits, all with hand-computed figures."""

from __future__ import annotations

import json

import pytest

from edgedistill.budget import apply_host_trust, check_artifact, measured_kv_tokens
from edgedistill.measure.calibrate import calibrate_host, rate_stats
from edgedistill.measure.project import (energy, error_pct, max_context, predict_on_host, project, trust_summary,
                                         validate_on_host)
from edgedistill.targets import TargetProfile

# Round numbers (as in test_budget_report): every figure below is checked by hand.
BASE = {
    "name": "round-numbers",
    "context": 1000,
    "formats": ["gguf-q4_0"],
    "device": {"ram_gb": 4.0, "bandwidth_gb_s": 10.0, "compute_gflops": 100.0, "decode_efficiency": 0.5,
               "prefill_efficiency": 0.2, "sustained": 0.5, "active_power_w": 2.0, "battery_wh": 10.0, "threads": 4,
               "dram_pj_per_byte": 40.0, "pj_per_op": 2.0},
    "budget": {"memory_gb": 0.2, "artifact_gb": 0.1, "min_decode_tok_s": 50.0, "max_ttft_s": 1.0,
               "prompt_tokens": 100, "max_energy_j_per_100_tok": 5.0, "max_battery_pct_per_hour": 1.0,
               "runtime_overhead_mb": 100.0},
}
WEIGHTS, PARAMS, KV = 20e6, 25e6, 5000
# The host: 20 GB/s read bandwidth, 200 GOP/s int8 matmul (given, not measured, so the arithmetic is exact).
HOST = {"bandwidth_gb_s": 20.0, "compute_gflops": 200.0, "compute_kind": "int8", "threads": 1}


def target(**device) -> TargetProfile:
    data = json.loads(json.dumps(BASE))
    data["device"].update(device)
    if data["device"]["battery_wh"] is None:  # mains powered: no battery budget
        data["budget"]["max_battery_pct_per_hour"] = None
    return TargetProfile.model_validate(data)


# ---------------------------------------------------------------------------------------- micro-benchmarks


def test_micro_benchmarks_give_sane_positive_figures():
    cal = calibrate_host(1, array_mb=64, n=256, repeats=3)
    assert cal["threads"] == 1 and cal["compute_kind"] in ("int8", "fp32")
    for key in ("memory_read_gb_s", "memory_copy_gb_s", "matmul_fp32_gflop_s"):
        s = cal[key]
        assert s["n"] == 3 and 0 < s["min"] <= s["median"] <= s["max"], (key, s)
    # any CPU of this decade: between 0.1 GB/s and 10 TB/s, and 0.1 to 100,000 GOP/s on one thread
    assert 0.1 < cal["bandwidth_gb_s"] < 10_000 and cal["bandwidth_gb_s"] == cal["memory_read_gb_s"]["median"]
    assert 0.1 < cal["compute_gflops"] < 100_000
    assert "median of 3" in cal["basis"] and "64 MB" in cal["basis"]


def test_rate_stats_hand_checked():
    s = rate_stats(2e9, [1.0, 2.0, 0.5], 1e9)  # 2, 1 and 4 GB/s
    assert s == {"median": 2.0, "min": 1.0, "max": 4.0, "n": 3}
    with pytest.raises(ValueError):
        rate_stats(1.0, [0.0], 1e9)


def test_calibration_rejects_bad_arguments():
    with pytest.raises(ValueError):
        calibrate_host(0)


# ------------------------------------------------------------------------------ the model on the host


def host_check(measured_decode: float, measured_prefill: float, t: TargetProfile | None = None) -> dict:
    t = t or target()
    pred = predict_on_host(HOST, t, weight_bytes=WEIGHTS, params=PARAMS, kv_bytes_per_token=KV, kv_tokens=1000)
    return validate_on_host(pred, {"decode_tok_s": measured_decode, "prefill_tok_s": measured_prefill},
                            calibration=HOST, target=t)


def test_host_prediction_uses_the_targets_efficiencies_and_the_hosts_figures():
    v = host_check(400.0, 1000.0)
    # decode: 0.5 x 1 (sustained) x 20e9 B/s / (20e6 weights + 5000 B x 1000 tokens) = 400 tok/s
    assert v["predicted"]["decode_tok_s"] == pytest.approx(400.0)
    # prefill: 0.2 x 200e9 / (2 x 25e6) = 800 tok/s
    assert v["predicted"]["prefill_tok_s"] == pytest.approx(800.0)
    assert v["error_pct"]["decode"] == pytest.approx(0.0)
    assert v["error_pct"]["prefill"] == pytest.approx(-20.0)  # (800 - 1000) / 1000
    assert v["trusted"] == {"decode": True, "prefill": True} and v["ok"]
    # implied efficiency: what would have made the model exact; 1000 tok/s x 50e6 ops / 200e9 = 0.25
    assert v["implied_efficiency"]["prefill"] == pytest.approx(0.25)
    assert v["implied_efficiency"]["decode"] == pytest.approx(0.5)
    assert v["assumed_efficiency"] == {"decode": 0.5, "prefill": 0.2}
    # the target's sustained factor is not applied on the host (runs of seconds)
    assert host_check(400.0, 1000.0, target(sustained=0.25))["predicted"]["decode_tok_s"] == pytest.approx(400.0)


@pytest.mark.parametrize("measured_decode, trusted", [
    (400 / 1.299, True),   # predicted 400 is +29.9%: inside
    (400 / 1.301, False),  # +30.1%: outside
    (400 / 0.701, True),   # -29.9%
    (400 / 0.699, False),  # -30.1%
    (4000.0, False),       # -90%: the model is far too pessimistic
])
def test_host_error_beyond_30_percent_is_untrusted(measured_decode, trusted):
    v = host_check(measured_decode, 800.0)
    assert v["trusted"]["decode"] is trusted and v["trusted"]["prefill"] is True
    assert v["ok"] is trusted


def test_error_sign_and_missing_measurement():
    assert error_pct(130.0, 100.0) == pytest.approx(30.0)  # + : optimistic model
    assert error_pct(70.0, 100.0) == pytest.approx(-30.0)
    assert error_pct(70.0, None) is None and error_pct(70.0, 0.0) is None
    v = host_check(None, 800.0)  # every run stopped at a stop token: nothing to compare with
    assert v["error_pct"]["decode"] is None and v["trusted"]["decode"] is False and not v["ok"]


def test_trust_summary_says_plainly_when_the_model_is_not_trusted():
    good, bad = host_check(400.0, 800.0), host_check(200.0, 800.0)  # decode +100%
    assert trust_summary({"gguf-q4_0": good})["trusted"] is True
    s = trust_summary({"gguf-q4_0": good, "onnx-int4": bad})
    assert s["trusted"] is False and s["out_of_bounds"] == ["onnx-int4: decode +100%"]
    assert s["message"].startswith("projection model NOT trusted for targets") and "\u00b130%" in s["message"]
    assert trust_summary({})["trusted"] is False  # nothing validated is not a pass


def test_measured_kv_tokens_is_prompt_plus_half_the_generated():
    assert measured_kv_tokens({"prompt_tokens": 256, "new_tokens": 32, "stats": {"tokens": {"median": 32}}}) == 272
    assert measured_kv_tokens({"prompt_tokens": 256, "new_tokens": 32, "stats": {"tokens": {"median": 10}}}) == 261


# ----------------------------------------------------------------------------------------------- strict


def checks(t: TargetProfile) -> list[dict]:
    p = project(t, weight_bytes=WEIGHTS, params=PARAMS, kv_bytes_per_token=KV)
    return check_artifact(t, artifact_bytes=20_000_000, projected=p, footprint=p["footprint"])


def test_strict_fails_only_figures_of_an_untrusted_model():
    t = target()
    base = checks(t)
    assert all(c["ok"] for c in base)
    untrusted_decode = host_check(200.0, 800.0)  # decode +100%, prefill exact
    lenient = {c["name"]: c for c in apply_host_trust(base, untrusted_decode, strict=False)}
    strict = {c["name"]: c for c in apply_host_trust(base, untrusted_decode, strict=True)}
    assert all(c["ok"] for c in lenient.values())  # without --strict the verdict stands, the message warns
    assert "untrusted: the decode model's host error is +100%" in lenient["decode_tok_s"]["message"]
    # decode, energy (decode model) and battery (both models) fail; TTFT (prefill) and the rest stand
    assert {n for n, c in strict.items() if not c["ok"]} == {"decode_tok_s", "energy_j_per_100_tokens",
                                                             "battery_pct_per_hour"}
    assert "fails under --strict" in strict["decode_tok_s"]["message"]
    assert strict["decode_tok_s"]["margin_pct"] == lenient["decode_tok_s"]["margin_pct"] > 0  # margin unchanged
    assert strict["ttft_ms"]["trusted"] is True and strict["ttft_ms"]["host_error_pct"] == pytest.approx(0.0)
    assert "trusted" not in strict["artifact_mb"]  # measured: nothing to validate
    assert "trusted" not in strict["footprint_mb"]  # the memory model is not a speed model
    assert all(c["ok"] for c in apply_host_trust(base, host_check(400.0, 800.0), strict=True))
    assert base == checks(t)  # the input checks are not modified


# ----------------------------------------------------------------------------------------------- energy


def test_energy_cross_check_hand_computed():
    t = target()
    p = project(t, weight_bytes=WEIGHTS, params=PARAMS, kv_bytes_per_token=KV)
    en = p["energy"]
    # top-down: 2 W / 111.11 tok/s = 0.018 J/token
    assert en["j_per_token"] == pytest.approx(0.018) and en["watts"] == 2.0 and en["powered"] == "battery"
    # bottom-up: (20e6 + 2.5e6 KV read) B x 40 pJ = 0.9 mJ; 2 x 25e6 ops x 2 pJ = 0.1 mJ; 1 mJ per token
    bu = en["bottom_up"]
    assert bu["memory_j_per_token"] == pytest.approx(0.0009)
    assert bu["compute_j_per_token"] == pytest.approx(0.0001)
    assert bu["j_per_token"] == pytest.approx(0.001)
    assert bu["top_down_over_bottom_up"] == pytest.approx(18.0) and bu["consistent"] is True
    assert bu["watts_at_projected_speed"] == pytest.approx(0.001 * 2.5e9 / 22.5e6)  # 0.111 W
    # battery per 1,000 generated tokens: 18 J of 36,000 J = 0.05%
    assert en["battery_pct_per_1000_tokens"] == pytest.approx(0.05)
    assert en["battery_pct_per_hour"] == pytest.approx(0.14) == p["battery_pct_per_hour"]
    assert p["energy_j_per_100_tokens"] == pytest.approx(1.8)


def test_energy_bottom_up_above_top_down_is_flagged_and_mains_reports_watts_only():
    # 1000 pJ/byte: 22.5 mJ per token of DRAM traffic, more than the 18 mJ the whole device spends
    hot = energy(target(dram_pj_per_byte=1000.0).device, decode_tok_s=2.5e9 / 22.5e6, prefill_tok_s=200.0,
                 bytes_per_token=22.5e6, ops_per_token=50e6)
    assert hot["bottom_up"]["consistent"] is False
    mains = energy(target(battery_wh=None).device, decode_tok_s=100.0, prefill_tok_s=200.0, bytes_per_token=22.5e6,
                   ops_per_token=50e6)
    assert mains["powered"] == "mains" and mains["j_per_token"] == pytest.approx(0.02)
    assert not any(k.startswith("battery") for k in mains) and "mains" in mains["basis"]
    no_pj = energy(target(dram_pj_per_byte=None, pj_per_op=None).device, decode_tok_s=100.0, prefill_tok_s=200.0,
                   bytes_per_token=1.0, ops_per_token=1.0)
    assert no_pj["bottom_up"] is None and "no bottom-up" in no_pj["basis"]


# --------------------------------------------------------------------------------------- largest context


def test_max_context_hand_computed():
    # (200 MB budget - 20 MB weights - 100 MB runtime) / 5000 B per token = 16,000 tokens
    assert max_context(200.0, 20e6, 5000, 100.0) == 16_000
    assert max_context(200.0, 20e6, 4999, 100.0) == 16_003  # floor of 16,003.2
    assert max_context(100.0, 20e6, 5000, 100.0) == 0  # weights and runtime alone miss the budget
    assert max_context(200.0, 20e6, 0, 100.0) is None  # no KV cache: not bounded by memory
    p = project(target(), weight_bytes=WEIGHTS, params=PARAMS, kv_bytes_per_token=KV)
    assert p["max_context"] == p["footprint"]["max_context"] == 16_000 and p["footprint"]["budget_mb"] == 200.0
    # at that context the footprint is exactly the budget
    at_max = project(target(), weight_bytes=WEIGHTS, params=PARAMS, kv_bytes_per_token=KV, context=16_000)
    assert at_max["footprint_mb"] == pytest.approx(200.0)
