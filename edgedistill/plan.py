"""Plan the student: depth, width, weight format and context that fit a target's budgets."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from edgedistill.config import PlanConfig
from edgedistill.errors import UserError
from edgedistill.formats import FORMATS
from edgedistill.measure import project as projection
from edgedistill.targets import GB, TargetProfile

QUANT_MULTIPLE = max(f.block for f in FORMATS.values())  # student dims must fill whole quantization blocks


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    def matrix_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * (attn + mlp) + embed

    def params(self) -> int:
        return self.matrix_params() + (2 * self.layers + 1) * self.hidden  # + RMSNorm weights

    def weight_bytes(self, fmt: str) -> int:
        f = FORMATS[fmt]
        return int(self.matrix_params() * f.bytes_per_weight) + (2 * self.layers + 1) * self.hidden * 4

    def kv_bytes_per_token(self) -> int:
        return projection.kv_bytes_per_token(self.layers, self.kv_heads, self.head_dim)


def teacher_shape(cfg: dict) -> Shape:
    heads = cfg["num_attention_heads"]
    return Shape(
        layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
        heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab=cfg["vocab_size"],
        tied=bool(cfg.get("tie_word_embeddings", False)),
    )


def budget_checks(shape: Shape, target: TargetProfile, context: int) -> list[dict]:
    """Every budget of the target, for this shape, with the arithmetic behind each figure."""
    # Every format the target builds must fit, so each budget is checked for the largest one.
    fmt = max(target.formats, key=shape.weight_bytes)
    wbytes = shape.weight_bytes(fmt)
    kvt = shape.kv_bytes_per_token()
    fp = projection.footprint(wbytes, kvt, context, target.budget.runtime_overhead_mb)
    proj = projection.project(target, weight_bytes=wbytes, params=shape.params(), kv_bytes_per_token=kvt,
                              context=context)
    b = target.budget
    checks = [
        ("memory", fp["total_mb"], b.memory_gb * GB / 1e6, "MB", "le",
         f"weights {fp['weights_mb']:.1f} + KV {fp['kv_cache_mb']:.1f} ({kvt} B/token x {context}) "
         f"+ overhead {fp['overhead_mb']:.0f}"),
        ("artifact", wbytes / 1e6, b.artifact_gb * GB / 1e6, "MB", "le",
         f"{fmt}, the largest of {', '.join(target.formats)}: {shape.matrix_params():,} quantized weights"),
        ("decode_tok_s", proj["decode_tok_s"], b.min_decode_tok_s, "tok/s", "ge",
         f"{target.device.decode_efficiency:g} x {target.device.sustained:g} x {target.device.bandwidth_gb_s:g} GB/s "
         f"/ ({wbytes / 1e6:.1f} MB weights + KV read at half context) per token"),
        ("ttft_s", proj["ttft_ms"] / 1000, b.max_ttft_s, "s", "le",
         f"{b.prompt_tokens} prompt tokens at {proj['prefill_tok_s']:.0f} tok/s projected prefill"),
    ]
    if b.max_energy_j_per_100_tok is not None:
        checks.append(("energy_j_per_100_tok", proj["energy_j_per_100_tokens"], b.max_energy_j_per_100_tok, "J",
                       "le", f"{target.device.active_power_w} W / {proj['decode_tok_s']:.1f} tok/s x 100"))
    if b.max_battery_pct_per_hour is not None and proj["battery_pct_per_hour"] is not None:
        checks.append(("battery_pct_per_hour", proj["battery_pct_per_hour"], b.max_battery_pct_per_hour, "%", "le",
                       "chat pattern of the projection model"))
    out = []
    for name, value, limit, unit, sense, how in checks:
        ok = value <= limit if sense == "le" else value >= limit
        out.append({"name": name, "value": value, "limit": limit, "unit": unit, "ok": ok,
                    "sense": sense, "arithmetic": how})
    return out


def _candidates(t: Shape, min_layers: int):
    """Student shapes that keep head_dim and whole GQA groups, so the teacher's heads can be sliced."""
    group = t.heads // t.kv_heads
    ratio = t.intermediate / t.hidden
    for kv in range(1, t.kv_heads + 1):
        for g in range(1, group + 1):
            heads = kv * g
            hidden = heads * t.head_dim
            if hidden > t.hidden or hidden % QUANT_MULTIPLE:
                continue
            for scale in (1.0, 0.75, 0.5):
                inter = int(round(hidden * ratio * scale / QUANT_MULTIPLE)) * QUANT_MULTIPLE
                inter = min(inter, t.intermediate)
                if inter <= 0:
                    continue
                for layers in range(min_layers, t.layers + 1):
                    yield Shape(layers, hidden, inter, heads, kv, t.head_dim, t.vocab, t.tied)


def validate_explicit(shape: Shape, t: Shape) -> None:
    problems = []
    if shape.layers > t.layers:
        problems.append(f"layers {shape.layers} > teacher's {t.layers}")
    if shape.hidden > t.hidden or shape.intermediate > t.intermediate:
        problems.append("hidden/intermediate must not exceed the teacher's")
    if shape.heads % shape.kv_heads or shape.kv_heads > t.kv_heads or shape.heads // shape.kv_heads > t.heads // t.kv_heads:
        problems.append(f"heads/kv_heads must form whole GQA groups of at most {t.heads // t.kv_heads} "
                        f"with at most {t.kv_heads} kv heads")
    if shape.hidden % QUANT_MULTIPLE or shape.intermediate % QUANT_MULTIPLE:
        problems.append(f"hidden and intermediate must be multiples of {QUANT_MULTIPLE} (quantization blocks)")
    if problems:
        raise UserError("invalid --student shape: " + "; ".join(problems))


def solve(teacher: dict, target: TargetProfile, cfg: PlanConfig) -> dict:
    """The largest student within the compression that meets every budget, with the runners-up."""
    t = teacher_shape(teacher["config"])
    context = cfg.context or target.context
    if cfg.student is not None:
        s = cfg.student
        shape = Shape(s.layers, s.hidden, s.intermediate, s.heads, s.kv_heads, t.head_dim, t.vocab, t.tied)
        validate_explicit(shape, t)
        return _plan_dict(shape, t, target, context, cfg, "explicit --student shape", [])
    max_params = teacher["params"] / cfg.compression
    # Depth is cut no more than twice as hard as the overall compression: very shallow students
    # lose too much (a later issue measures depth vs width properly).
    min_layers = max(2, math.ceil(t.layers / (2 * cfg.compression)))
    feasible = [s for s in _candidates(t, min_layers)
                if s.params() <= max_params and all(c["ok"] for c in budget_checks(s, target, context))]
    if not feasible:
        smallest = min(_candidates(t, 2), key=Shape.params)
        failing = [c for c in budget_checks(smallest, target, context) if not c["ok"]]
        detail = "; ".join(f"{c['name']} {c['value']:.3g} {c['unit']} vs limit {c['limit']:.3g}" for c in failing)
        raise UserError(f"no student of this teacher fits {target.name}: even the smallest "
                        f"({smallest.params() / 1e6:.1f}M params) fails {detail or 'the compression'}; "
                        f"try a larger --compression, a shorter --context or another target")
    best_params = max(s.params() for s in feasible)
    # Near-ties (within 5%) go to the wider student: width keeps more of the teacher's knowledge than depth.
    near = [s for s in feasible if s.params() >= 0.95 * best_params]
    ranked = sorted(near, key=lambda s: (s.hidden, s.params()), reverse=True)
    chosen = ranked[0]
    runners = [asdict(s) | {"params": s.params()} for s in ranked[1:4]]
    why = (f"largest of {len(feasible)} feasible shapes with params <= {max_params / 1e6:.1f}M "
           f"(teacher {teacher['params'] / 1e6:.1f}M / compression {cfg.compression:g}); near-ties prefer width")
    return _plan_dict(chosen, t, target, context, cfg, why, runners)


def _plan_dict(shape: Shape, t: Shape, target: TargetProfile, context: int, cfg: PlanConfig, why: str,
               runners: list) -> dict:
    checks = budget_checks(shape, target, context)
    # Only an explicit --student shape can miss a budget here: the build goes on as asked, and the
    # verdict fails with the figures (exit 1) rather than refusing the user's own choice.
    return {
        "shape": asdict(shape),
        "params": shape.params(),
        "teacher_params": t.params(),
        "compression": t.params() / shape.params(),
        "format": target.primary_format,
        "formats": list(target.formats),
        "context": context,
        "weight_bytes": {f: shape.weight_bytes(f) for f in target.formats},
        "checks": checks,
        "fits": all(c["ok"] for c in checks),
        "why": why,
        "runners_up": runners,
    }


def student_config(teacher_cfg: dict, shape: dict, context: int) -> dict:
    """The teacher's HF config with the student's dimensions: same family, tokenizer and RoPE."""
    cfg = dict(teacher_cfg)
    cfg.update(num_hidden_layers=shape["layers"], hidden_size=shape["hidden"],
               intermediate_size=shape["intermediate"], num_attention_heads=shape["heads"],
               num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"],
               max_position_embeddings=max(context, 16))
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
              "layer_types"):
        cfg.pop(k, None)
    return cfg



def run(ctx) -> dict:
    """Stage `plan`: the student for this target. Targets with the same student share what follows."""
    return summary(solve(ctx["teacher"].summary, ctx.target, ctx.cfg.plan))


def summary(plan: dict) -> dict:
    """What later stages key on: the student (shared by targets with the same plan) and the formats."""
    return {"student": {"shape": plan["shape"], "context": plan["context"], "qat_format": plan["format"]},
            "formats": plan["formats"], "plan": plan}
