"""Projection of an artifact's speed, memory and energy onto a hardware target.

Pure functions, no I/O. The model is a roofline with two regimes:

* decode is memory-bound: every generated token reads all weights once plus the KV cache so far;
  tokens/s = decode_efficiency x sustained x bandwidth / bytes read per token, with the KV cache
  taken at half the context (the average over a conversation that fills it);
* prefill is compute-bound: a prompt token costs 2 x params FLOPs (one multiply-add per weight);
  tokens/s = prefill_efficiency x sustained x compute / (2 x params).

Fixed per-token costs (sampling over the vocabulary, thread synchronisation, framework overhead)
are not modelled, so projections for very small students are optimistic. The same `roofline` is
therefore run on the build host with the host's measured bandwidth and matrix throughput
(measure.calibrate) and compared with the host's measured speeds (`validate_on_host`): the model is
trusted for targets only while that error stays within TRUST_BOUND_PCT.

Energy: top-down J/token = the profile's active power / decode tok/s, cross-checked bottom-up from
bytes moved x pJ/byte + operations x pJ/op (the profile's figures); battery figures for battery
devices only. Memory: footprint, tier, and the largest context that still fits the budget.

Units: decimal megabytes (1 MB = 1e6 bytes) and gigabytes, as the target profiles state them.
"""

from __future__ import annotations

import math

from edgedistill.targets import GB, TargetProfile

MB = 1e6

# The usage pattern behind "battery % per hour of chat": each minute the user sends a turn of
# CHAT_PROMPT_TOKENS_PER_MIN new tokens (earlier turns stay in the KV cache) and the model answers
# with CHAT_GENERATED_TOKENS_PER_MIN tokens. Only the active compute is counted, not the screen or
# the idle device between turns.
CHAT_PROMPT_TOKENS_PER_MIN = 30
CHAT_GENERATED_TOKENS_PER_MIN = 30
CHAT_PATTERN = (f"chat of {CHAT_PROMPT_TOKENS_PER_MIN} prompt + {CHAT_GENERATED_TOKENS_PER_MIN} generated "
                f"tokens per minute, active power only (idle time between turns not counted)")

MEMORY_TIERS = ("<1 GB", "1-10 GB", "10-50 GB", ">50 GB")


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
    """KV cache bytes one token adds: K and V, for every layer and KV head (fp16 by default, as llama.cpp)."""
    for name, v in (("layers", layers), ("kv_heads", kv_heads), ("head_dim", head_dim), ("dtype_bytes", dtype_bytes)):
        if v <= 0:
            raise ValueError(f"kv_bytes_per_token: {name} must be positive, got {v}")
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def footprint(weight_bytes: float, kv_bytes_per_token: float, context: int, runtime_overhead_mb: float) -> dict:
    """Resident memory of a loaded model: weights + a full KV cache at `context` + runtime overhead."""
    if weight_bytes < 0 or kv_bytes_per_token < 0 or context < 0 or runtime_overhead_mb < 0:
        raise ValueError("footprint: sizes, context and overhead must not be negative")
    weights_mb = weight_bytes / MB
    kv_mb = kv_bytes_per_token * context / MB
    total = weights_mb + kv_mb + runtime_overhead_mb
    return {
        "weights_mb": weights_mb,
        "kv_cache_mb": kv_mb,
        "overhead_mb": float(runtime_overhead_mb),
        "total_mb": total,
        "basis": (f"weights {weights_mb:.1f} MB + KV cache {kv_bytes_per_token:g} B/token x {context} tokens "
                  f"({kv_mb:.1f} MB, allocated for the full context) + runtime overhead {runtime_overhead_mb:g} MB "
                  f"(profile figure)"),
    }


def memory_tier(total_bytes: float) -> str:
    """The memory tier DESIGN.md reports beside each target's own budget."""
    if total_bytes < 0:
        raise ValueError("memory_tier: negative size")
    if total_bytes < 1 * GB:
        return MEMORY_TIERS[0]
    if total_bytes < 10 * GB:
        return MEMORY_TIERS[1]
    if total_bytes < 50 * GB:
        return MEMORY_TIERS[2]
    return MEMORY_TIERS[3]


def max_context(budget_mb: float, weight_bytes: float, kv_bytes_per_token: float, runtime_overhead_mb: float) -> int | None:
    """The longest context whose full KV cache still fits `budget_mb` beside the weights and the runtime.

    0 when weights and overhead alone exceed the budget; None when the model keeps no KV cache
    (the context is then not bounded by memory).
    """
    if budget_mb < 0 or weight_bytes < 0 or kv_bytes_per_token < 0 or runtime_overhead_mb < 0:
        raise ValueError("max_context: sizes and budget must not be negative")
    if kv_bytes_per_token == 0:
        return None
    room = budget_mb * MB - weight_bytes - runtime_overhead_mb * MB
    return max(0, math.floor(room / kv_bytes_per_token))


def roofline(*, bandwidth_gb_s: float, compute_gflops: float, decode_efficiency: float, prefill_efficiency: float,
             sustained: float, weight_bytes: float, params: float, kv_read_bytes: float) -> dict:
    """The one speed model, used for targets and for the host check alike.

    decode (memory-bound): every token reads the weights and the KV cache so far once;
    prefill (compute-bound): a prompt token costs one multiply-add (2 FLOPs) per weight.
    """
    if weight_bytes <= 0 or params <= 0:
        raise ValueError("roofline: weight_bytes and params must be positive")
    if kv_read_bytes < 0:
        raise ValueError("roofline: kv_read_bytes must not be negative")
    bytes_per_token = weight_bytes + kv_read_bytes
    ops_per_token = 2.0 * params
    return {
        "decode_tok_s": decode_efficiency * sustained * bandwidth_gb_s * GB / bytes_per_token,
        "prefill_tok_s": prefill_efficiency * sustained * compute_gflops * 1e9 / ops_per_token,
        "bytes_per_token": bytes_per_token,
        "ops_per_token": ops_per_token,
    }


def energy(device, *, decode_tok_s: float, prefill_tok_s: float, bytes_per_token: float, ops_per_token: float) -> dict:
    """Energy of generating on `device`: top-down from its active power, and a bottom-up cross-check.

    Top-down: J/token = active power / decode tok/s (whole device: screen, static power, idle cores).
    Bottom-up: bytes moved from DRAM x pJ/byte + arithmetic operations x pJ/op (the profile's
    figures); it counts only the work itself, so it should come out below the top-down figure. A
    bottom-up figure above it says the profile's power cannot move those bytes at that speed.
    Battery figures only for battery-powered devices; mains-powered ones report J/token and watts.
    """
    if decode_tok_s <= 0 or prefill_tok_s <= 0:
        raise ValueError("energy: speeds must be positive")
    p = device.active_power_w
    j_per_token = p / decode_tok_s
    out = {"powered": "mains" if device.battery_wh is None else "battery", "watts": p, "j_per_token": j_per_token}
    basis = f"top-down: {p:g} W active power / {decode_tok_s:.4g} tok/s decode"
    if device.battery_wh is not None:
        battery_j = device.battery_wh * 3600.0
        active_s_per_min = CHAT_GENERATED_TOKENS_PER_MIN / decode_tok_s + CHAT_PROMPT_TOKENS_PER_MIN / prefill_tok_s
        out["battery_pct_per_hour"] = 60.0 * active_s_per_min * p / battery_j * 100.0
        out["battery_pct_per_1000_tokens"] = 1000.0 * j_per_token / battery_j * 100.0
        out["chat_pattern"] = CHAT_PATTERN
        basis += (f"; battery % per hour: {CHAT_PATTERN}, of {device.battery_wh:g} Wh; battery % per 1,000 "
                  f"generated tokens at the decode J/token")
    else:
        basis += "; mains powered: J/token and watts only"
    pj_byte, pj_op = device.dram_pj_per_byte, device.pj_per_op
    if pj_byte is not None and pj_op is not None:
        memory_j = bytes_per_token * pj_byte * 1e-12
        compute_j = ops_per_token * pj_op * 1e-12
        bottom = memory_j + compute_j
        out["bottom_up"] = {
            "j_per_token": bottom, "memory_j_per_token": memory_j, "compute_j_per_token": compute_j,
            "dram_pj_per_byte": pj_byte, "pj_per_op": pj_op,
            "watts_at_projected_speed": bottom * decode_tok_s,
            "top_down_over_bottom_up": j_per_token / bottom,
            "consistent": bottom <= j_per_token,
        }
        basis += (f"; bottom-up: {bytes_per_token / MB:.1f} MB x {pj_byte:g} pJ/byte + {ops_per_token / 1e6:.1f}M "
                  f"ops x {pj_op:g} pJ/op per token")
    else:
        out["bottom_up"] = None
        basis += "; no bottom-up cross-check (the profile states no pJ/byte and pJ/op)"
    out["basis"] = basis
    return out


def project(target: TargetProfile, *, weight_bytes: float, params: float, kv_bytes_per_token: float,
            context: int | None = None) -> dict:
    """Decode/prefill speed, time to first token, footprint, largest fitting context and energy on `target`.

    `context` overrides the profile's context (a build run with --context).
    """
    if weight_bytes <= 0 or params <= 0:
        raise ValueError("project: weight_bytes and params must be positive")
    if kv_bytes_per_token < 0:
        raise ValueError("project: kv_bytes_per_token must not be negative")
    d, b = target.device, target.budget
    ctx = target.context if context is None else int(context)
    if ctx <= 0:
        raise ValueError("project: context must be positive")

    kv_read = kv_bytes_per_token * ctx / 2  # the average over a conversation that fills the context
    speed = roofline(bandwidth_gb_s=d.bandwidth_gb_s, compute_gflops=d.compute_gflops,
                     decode_efficiency=d.decode_efficiency, prefill_efficiency=d.prefill_efficiency,
                     sustained=d.sustained, weight_bytes=weight_bytes, params=params, kv_read_bytes=kv_read)
    decode, prefill = speed["decode_tok_s"], speed["prefill_tok_s"]
    ttft_ms = b.prompt_tokens / prefill * 1000.0

    budget_mb = b.memory_gb * GB / MB
    fp = footprint(weight_bytes, kv_bytes_per_token, ctx, b.runtime_overhead_mb)
    fp["budget_mb"] = budget_mb
    fp["max_context"] = max_context(budget_mb, weight_bytes, kv_bytes_per_token, b.runtime_overhead_mb)
    fp["max_context_basis"] = (f"({budget_mb:g} MB budget - {weight_bytes / MB:.1f} MB weights - "
                               f"{b.runtime_overhead_mb:g} MB runtime) / {kv_bytes_per_token:g} B of KV cache per token")
    en = energy(d, decode_tok_s=decode, prefill_tok_s=prefill, bytes_per_token=speed["bytes_per_token"],
                ops_per_token=speed["ops_per_token"])

    basis = (
        f"roofline projection to {target.name}: decode = {d.decode_efficiency:g} efficiency x {d.sustained:g} "
        f"sustained x {d.bandwidth_gb_s:g} GB/s / ({weight_bytes / MB:.1f} MB weights + {kv_read / MB:.1f} MB KV "
        f"read at half of {ctx} context) per token; prefill = {d.prefill_efficiency:g} x {d.sustained:g} "
        f"x {d.compute_gflops:g} GFLOP/s / (2 x {params / 1e6:.1f}M params) FLOPs per token; "
        f"TTFT = {b.prompt_tokens} prompt tokens / prefill; energy = {d.active_power_w:g} W x decode time; "
        + (f"battery % per hour: {CHAT_PATTERN}, {d.battery_wh:g} Wh; " if d.battery_wh is not None
           else "mains powered (no battery figure); ")
        + "fixed per-token overheads (sampling, thread sync) not modelled"
    )
    return {
        "decode_tok_s": decode,
        "prefill_tok_s": prefill,
        "ttft_ms": ttft_ms,
        "footprint_mb": fp["total_mb"],
        "energy_j_per_100_tokens": en["j_per_token"] * 100.0,
        "battery_pct_per_hour": en.get("battery_pct_per_hour"),
        "memory_tier": memory_tier(fp["total_mb"] * MB),
        "max_context": fp["max_context"],
        "footprint": fp,
        "energy": en,
        "basis": basis,
    }


# ------------------------------------------------------------------------------ the model on the host

# The projection is trusted for targets only while it predicts this host's own measurements within
# this many percent (issue 6); a looser model would turn a projected "fits" into a guess.
TRUST_BOUND_PCT = 30.0
SPEED_MODELS = ("decode", "prefill")


def error_pct(predicted: float | None, measured: float | None) -> float | None:
    """Signed error of a prediction against a measurement: + the model is optimistic, - pessimistic."""
    if predicted is None or measured is None or measured <= 0:
        return None
    return (predicted - measured) / measured * 100.0


def predict_on_host(calibration: dict, target: TargetProfile, *, weight_bytes: float, params: float,
                    kv_bytes_per_token: float, kv_tokens: float) -> dict:
    """The target's model with the host's measured bandwidth and compute in place of the profile's peaks.

    The efficiency factors are the target profile's own, unchanged (the check is of the model as it
    projects to that target); sustained = 1 because host runs last seconds, not minutes of thermal load.
    `kv_tokens` is the average cached context while the host measured decode.
    """
    d = target.device
    return roofline(bandwidth_gb_s=calibration["bandwidth_gb_s"], compute_gflops=calibration["compute_gflops"],
                    decode_efficiency=d.decode_efficiency, prefill_efficiency=d.prefill_efficiency, sustained=1.0,
                    weight_bytes=weight_bytes, params=params, kv_read_bytes=kv_bytes_per_token * kv_tokens)


def validate_on_host(predicted: dict, measured: dict, *, calibration: dict, target: TargetProfile,
                     bound_pct: float = TRUST_BOUND_PCT) -> dict:
    """Predicted vs measured decode and prefill tok/s on the host, the signed error and the trust verdict.

    `implied_efficiency` is the efficiency that would have made the prediction exact (measured speed x
    work per token / the host's micro-benchmark figure): shown beside the profile's assumption, never
    fed back into any projection.
    """
    d = target.device
    errors = {m: error_pct(predicted.get(f"{m}_tok_s"), measured.get(f"{m}_tok_s")) for m in SPEED_MODELS}
    trusted = {m: e is not None and abs(e) <= bound_pct for m, e in errors.items()}
    md, mp = measured.get("decode_tok_s"), measured.get("prefill_tok_s")
    implied = {
        "decode": md * predicted["bytes_per_token"] / (calibration["bandwidth_gb_s"] * GB) if md else None,
        "prefill": mp * predicted["ops_per_token"] / (calibration["compute_gflops"] * 1e9) if mp else None,
    }
    return {
        "predicted": {"decode_tok_s": predicted["decode_tok_s"], "prefill_tok_s": predicted["prefill_tok_s"]},
        "measured": {"decode_tok_s": md, "prefill_tok_s": mp},
        "error_pct": errors,
        "trusted": trusted,
        "ok": all(trusted.values()),
        "bound_pct": bound_pct,
        "assumed_efficiency": {"decode": d.decode_efficiency, "prefill": d.prefill_efficiency},
        "implied_efficiency": implied,
        "basis": (f"the {target.name} roofline run on this host: the host's measured memory bandwidth "
                  f"({calibration['bandwidth_gb_s']:.3g} GB/s) and matrix throughput "
                  f"({calibration['compute_gflops']:.3g} GOP/s, {calibration.get('compute_kind', '?')}) replace the "
                  f"profile's peak figures; the profile's efficiencies ({d.decode_efficiency:g} decode, "
                  f"{d.prefill_efficiency:g} prefill) are kept and sustained = 1; error = (predicted - measured) / "
                  f"measured; trusted within \u00b1{bound_pct:g}%"),
    }


def trust_summary(validations: dict[str, dict], bound_pct: float = TRUST_BOUND_PCT) -> dict:
    """The verdict over every artifact: is the projection model trusted for targets, and if not, why."""
    bad = [f"{fmt}: {m} {e:+.0f}%" if e is not None else f"{fmt}: {m} not measured"
           for fmt, v in validations.items() for m, e in v["error_pct"].items() if not v["trusted"][m]]
    ok = not bad and bool(validations)
    return {
        "trusted": ok,
        "bound_pct": bound_pct,
        "out_of_bounds": bad,
        "message": (f"projection model trusted for targets: every artifact's host error is within \u00b1{bound_pct:g}%"
                    if ok else
                    f"projection model NOT trusted for targets: host error outside \u00b1{bound_pct:g}% "
                    f"({'; '.join(bad) or 'no artifact validated'}); treat projected figures as rough estimates"),
    }
