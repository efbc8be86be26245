"""Projection of an artifact's speed, memory and energy onto a hardware target.

Pure functions, no I/O. The model is a roofline with two regimes:

* decode is memory-bound: every generated token reads all weights once plus the KV cache so far;
  tokens/s = decode_efficiency x sustained x bandwidth / bytes read per token, with the KV cache
  taken at half the context (the average over a conversation that fills it);
* prefill is compute-bound: a prompt token costs 2 x params FLOPs (one multiply-add per weight);
  tokens/s = prefill_efficiency x sustained x compute / (2 x params).

Fixed per-token costs (sampling over the vocabulary, thread synchronisation, framework overhead)
are not modelled, so projections for very small students are optimistic; host measurements in
the report show how far off the model is on the build machine.

Units: decimal megabytes (1 MB = 1e6 bytes) and gigabytes, as the target profiles state them.
"""

from __future__ import annotations

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


def project(target: TargetProfile, *, weight_bytes: float, params: float, kv_bytes_per_token: float,
            context: int | None = None) -> dict:
    """Decode/prefill speed, time to first token, footprint and energy of a model on `target`.

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

    eff_bw = d.decode_efficiency * d.sustained * d.bandwidth_gb_s * GB  # bytes/s
    kv_read = kv_bytes_per_token * ctx / 2
    bytes_per_token = weight_bytes + kv_read
    decode = eff_bw / bytes_per_token

    eff_flops = d.prefill_efficiency * d.sustained * d.compute_gflops * 1e9  # FLOP/s
    flops_per_token = 2.0 * params
    prefill = eff_flops / flops_per_token
    ttft_ms = b.prompt_tokens / prefill * 1000.0

    fp = footprint(weight_bytes, kv_bytes_per_token, ctx, b.runtime_overhead_mb)
    energy_100 = d.active_power_w / decode * 100.0

    battery = None
    if d.battery_wh is not None:
        active_s_per_min = CHAT_GENERATED_TOKENS_PER_MIN / decode + CHAT_PROMPT_TOKENS_PER_MIN / prefill
        joules_per_hour = 60.0 * active_s_per_min * d.active_power_w
        battery = joules_per_hour / (d.battery_wh * 3600.0) * 100.0

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
        "energy_j_per_100_tokens": energy_100,
        "battery_pct_per_hour": battery,
        "memory_tier": memory_tier(fp["total_mb"] * MB),
        "footprint": fp,
        "basis": basis,
    }
