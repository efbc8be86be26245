"""Plan the student: depth, width, per-group weight format and context that fit a target's budgets.

The solver enumerates student shapes that can be cut from the teacher (whole GQA groups, the
teacher's head_dim, dimensions in whole quantization blocks), and for each a precision for the
embedding group, and keeps those that meet every budget at once. The order of preference is
fixed and stated in each plan's `why`:

1. the target's context (the longest context at which anything fits, when --context is not given);
2. capacity: the most parameters within --compression (near-ties of 5% go to the wider student);
3. precision: the embedding / output group at 8 bits when that still fits (it holds most of a
   small student's weights and is where 4-bit rounding costs most; llama.cpp keeps it wider too).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from edgedistill.config import PlanConfig
from edgedistill.errors import UserError
from edgedistill.formats import FORMATS, tensor_format
from edgedistill.measure import project as projection
from edgedistill.targets import GB, TargetProfile

QUANT_MULTIPLE = max(f.block for f in FORMATS.values())  # student dims must fill whole quantization blocks
NORM_BYTES = 4  # RMSNorm weights stay float32 in every format
MIN_CONTEXT = 256  # the solver shortens the context no further than this
NEAR_TIE = 0.95
MIN_LAYERS = 2
# Per-tensor-group precisions the solver tries, in order of preference among equally large students.
GROUP_BITS_OPTIONS: tuple[dict, ...] = ({"embed": 8}, {})


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

    def group_params(self) -> dict[str, int]:
        """Quantized weights per tensor group (the groups of formats.TENSOR_GROUPS)."""
        return {"embed": self.vocab * self.hidden * (1 if self.tied else 2),
                "attn": self.layers * self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads),
                "mlp": self.layers * 3 * self.hidden * self.intermediate}

    def matrix_params(self) -> int:
        return sum(self.group_params().values())

    def params(self) -> int:
        return self.matrix_params() + (2 * self.layers + 1) * self.hidden  # + RMSNorm weights

    def weight_bytes(self, fmt: str, group_bits: dict | None = None) -> int:
        """Artifact weight bytes: each group in fmt, or in the same runtime's format of group_bits[group]."""
        total = 0.0
        for group, n in self.group_params().items():
            total += n * FORMATS[tensor_format(fmt, group, group_bits)].bytes_per_weight
        return int(total) + (2 * self.layers + 1) * self.hidden * NORM_BYTES

    def kv_bytes_per_token(self) -> int:
        return projection.kv_bytes_per_token(self.layers, self.kv_heads, self.head_dim)

    def fits_inside(self, other: "Shape") -> bool:
        """Every dimension <= other's, so this shape can be pruned from a model of that shape."""
        return (self.layers <= other.layers and self.hidden <= other.hidden and self.intermediate <= other.intermediate
                and self.kv_heads <= other.kv_heads and self.heads // self.kv_heads <= other.heads // other.kv_heads)


def describe(shape: dict) -> str:
    """One line for a shape dict (a plan's, a runner-up's, a progressive stage's); params when it has them."""
    return (f"{shape['layers']} layers x {shape['hidden']} (inter {shape['intermediate']}, "
            f"heads {shape['heads']}/{shape['kv_heads']})"
            + (f": {shape['params'] / 1e6:.1f}M params" if "params" in shape else ""))


def teacher_shape(cfg: dict) -> Shape:
    heads = cfg["num_attention_heads"]
    return Shape(
        layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
        heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab=cfg["vocab_size"],
        tied=bool(cfg.get("tie_word_embeddings", False)),
    )


def budget_checks(shape: Shape, target: TargetProfile, context: int, group_bits: dict | None = None) -> list[dict]:
    """Every budget of the target, for this shape, with the arithmetic behind each figure."""
    # Every format the target builds must fit, so each budget is checked for the largest one.
    fmt = max(target.formats, key=lambda f: shape.weight_bytes(f, group_bits))
    wbytes = shape.weight_bytes(fmt, group_bits)
    kvt = shape.kv_bytes_per_token()
    fp = projection.footprint(wbytes, kvt, context, target.budget.runtime_overhead_mb)
    proj = projection.project(target, weight_bytes=wbytes, params=shape.params(), kv_bytes_per_token=kvt,
                              context=context)
    b = target.budget
    groups = f" ({', '.join(f'{g} at {n} bits' for g, n in group_bits.items())})" if group_bits else ""
    checks = [
        ("memory", fp["total_mb"], b.memory_gb * GB / 1e6, "MB", "le",
         f"weights {fp['weights_mb']:.1f} + KV {fp['kv_cache_mb']:.1f} ({kvt} B/token x {context}) "
         f"+ overhead {fp['overhead_mb']:.0f}"),
        ("artifact", wbytes / 1e6, b.artifact_gb * GB / 1e6, "MB", "le",
         f"{fmt}{groups}, the largest of {', '.join(target.formats)}: {shape.matrix_params():,} quantized weights"),
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


def _fits(shape: Shape, target: TargetProfile, context: int, group_bits: dict | None = None) -> bool:
    return all(c["ok"] for c in budget_checks(shape, target, context, group_bits))


def candidates(t: Shape, min_layers: int = MIN_LAYERS) -> list[Shape]:
    """Student shapes that keep head_dim and whole GQA groups, so the teacher's heads can be sliced."""
    group = t.heads // t.kv_heads
    ratio = t.intermediate / t.hidden
    out = []
    for kv in range(1, t.kv_heads + 1):
        for g in range(1, group + 1):
            heads = kv * g
            hidden = heads * t.head_dim
            if hidden > t.hidden or hidden % QUANT_MULTIPLE:
                continue
            inters = set()
            for scale in (1.0, 0.75, 0.5):
                inter = min(int(round(hidden * ratio * scale / QUANT_MULTIPLE)) * QUANT_MULTIPLE, t.intermediate)
                if inter > 0 and inter % QUANT_MULTIPLE == 0:
                    inters.add(inter)
            for inter in sorted(inters):
                for layers in range(min(max(1, min_layers), t.layers), t.layers + 1):
                    out.append(Shape(layers, hidden, inter, heads, kv, t.head_dim, t.vocab, t.tied))
    return out


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


def _contexts(target: TargetProfile, cfg: PlanConfig) -> list[int]:
    """The context asked for, or the target's and then ever shorter ones the solver may fall back to."""
    if cfg.context:
        return [cfg.context]
    out, c = [], target.context
    while c >= min(MIN_CONTEXT, target.context):
        out.append(c)
        c //= 2
    return out


def min_layers_for(t: Shape, compression: float) -> int:
    # Depth is cut no more than twice as hard as the overall compression: very shallow students
    # lose too much (benchmarks/init_compare.py measures what depth cuts cost at step 0).
    return max(MIN_LAYERS, math.ceil(t.layers / (2 * compression)))


def solve(teacher: dict, target: TargetProfile, cfg: PlanConfig) -> dict:
    """The largest student within the compression that meets every budget, with the runners-up."""
    return _solve(teacher_shape(teacher["config"]), teacher["params"], target, cfg)


def _solve(t: Shape, teacher_params: int, target: TargetProfile, cfg: PlanConfig) -> dict:
    if cfg.student is not None:
        s = cfg.student
        shape = Shape(s.layers, s.hidden, s.intermediate, s.heads, s.kv_heads, t.head_dim, t.vocab, t.tied)
        validate_explicit(shape, t)
        context = cfg.context or target.context
        bits = next((b for b in GROUP_BITS_OPTIONS if _fits(shape, target, context, b)), {})
        chain = progressive_chain(t, shape, cfg.progressive_ratio) if cfg.progressive else []
        return _plan_dict(shape, t, target, context, bits, cfg, "explicit --student shape", [], chain)

    max_params = teacher_params / cfg.compression
    pool = _pool(t, teacher_params, cfg.compression)
    if not pool:
        smallest = min(candidates(t, MIN_LAYERS), key=Shape.params)
        why = (f"--compression {cfg.compression:g} asks for at most {max_params / 1e6:.2f}M params, but the "
               f"smallest student this teacher allows has {smallest.params() / 1e6:.2f}M")
        most = _max_compression(t, teacher_params)
        pool = _pool(t, teacher_params, most)
        if _first_feasible(pool, target, _contexts(target, cfg)):
            raise UserError(f"{why}; nearest feasible: --compression {most:g}")
        raise UserError(f"{why}; and at --compression {most:g}, "
                        + _impossible(t, pool, target, cfg.model_copy(update={"compression": most}), teacher_params))
    found = _first_feasible(pool, target, _contexts(target, cfg))
    if found is None:
        raise UserError(_impossible(t, pool, target, cfg, teacher_params))
    context, feasible = found
    best_params = feasible[0].params()
    # Near-ties go to the wider student: width keeps more of the teacher's knowledge than depth.
    near = [s for s in feasible if s.params() >= NEAR_TIE * best_params]
    ranked = sorted(near, key=lambda s: (s.hidden, s.params()), reverse=True)
    chosen = ranked[0]
    bits = next(b for b in GROUP_BITS_OPTIONS if _fits(chosen, target, context, b))
    runners = [asdict(s) | {"params": s.params()} for s in ranked[1:4]]
    why = [f"largest of {len(feasible)} feasible shapes with params <= {max_params / 1e6:.1f}M "
           f"(teacher {teacher_params / 1e6:.1f}M / compression {cfg.compression:g}); near-ties prefer width"]
    bigger = [s for s in pool if s.params() > best_params]
    if bigger:  # what stops the next larger shape: the budget that sizes this student
        nxt = bigger[-1]
        missed = [c for c in budget_checks(nxt, target, context) if not c["ok"]]
        why.append(f"held back by {', '.join(c['name'] for c in missed)}: the next larger shape "
                   f"({nxt.params() / 1e6:.1f}M params) would give "
                   + ", ".join(f"{c['value']:.3g} {c['unit']} vs {c['limit']:.3g}" for c in missed))
    else:
        why.append("every budget has room: --compression alone sets the size")
    if context != (cfg.context or target.context):
        why.append(f"context shortened from {target.context} to {context}: no student fits the budgets at longer ones")
    why.append("embedding/output group at 8 bits: it fits" if bits else
               "embedding/output group stays at the artifact's bits: 8 bits would break a budget")
    chain = progressive_chain(t, chosen, cfg.progressive_ratio) if cfg.progressive else []
    return _plan_dict(chosen, t, target, context, bits, cfg, "; ".join(why), runners, chain)


def _pool(t: Shape, teacher_params: int, compression: float) -> list[Shape]:
    """Candidate shapes within the compression, largest first."""
    pool = [s for s in candidates(t, min_layers_for(t, compression)) if s.params() <= teacher_params / compression]
    return sorted(pool, key=Shape.params, reverse=True)


def _first_feasible(pool: list[Shape], target: TargetProfile, contexts: list[int]) -> tuple[int, list[Shape]] | None:
    """The longest context at which some shape of pool meets every budget, and those shapes."""
    for context in contexts:
        feasible = [s for s in pool if _fits(s, target, context)]
        if feasible:
            return context, feasible
    return None


def _round_away(x: float, up: bool) -> float:
    """x rounded to 3 significant figures, up or down, so a printed limit really admits x."""
    if x <= 0:
        return x
    q = 10 ** (math.floor(math.log10(x)) - 2)
    return (math.ceil(x / q) if up else math.floor(x / q)) * q


def _max_compression(t: Shape, teacher_params: int) -> float:
    """The highest compression (one decimal) that leaves any candidate shape."""
    values = {math.floor(teacher_params / s.params() * 10) / 10 for s in candidates(t, MIN_LAYERS)}
    return next(c for c in sorted(values, reverse=True) if c >= 1 and _pool(t, teacher_params, c))


def _compression_ladder(start: float, stop: float) -> list[float]:
    """Compressions from just above start to stop in steps of 10%, rounded up to one decimal."""
    out, c = [], start
    while c < stop:
        c = min(c * 1.1, stop)
        out.append(math.ceil(c * 10) / 10)
    return out


def _impossible(t: Shape, pool: list[Shape], target: TargetProfile, cfg: PlanConfig, teacher_params: int) -> str:
    """Which budget no student can meet, by how much, and the nearest setting that would fit."""
    contexts = _contexts(target, cfg)
    smallest = pool[-1]
    failing = [c for c in budget_checks(smallest, target, contexts[-1]) if not c["ok"]]
    detail = "; ".join(f"{c['name']} {c['value']:.3g} {c['unit']} vs limit {c['limit']:.3g} "
                       f"({'over' if c['sense'] == 'le' else 'short'} by {abs(c['value'] - c['limit']):.3g})"
                       for c in failing)
    msg = (f"no student of this teacher fits {target.name}: even the smallest allowed "
           f"({smallest.params() / 1e6:.1f}M params, context {contexts[-1]}) fails {detail}")
    # Nearest feasible: the least extra compression, else a shorter explicit context, else the budget to relax.
    for compression in _compression_ladder(cfg.compression, _max_compression(t, teacher_params)):
        if _first_feasible(_pool(t, teacher_params, compression), target, contexts):
            return msg + f"; nearest feasible: --compression {compression:g}"
    if cfg.context:
        for c in _contexts(target, PlanConfig()):
            if c < cfg.context and _fits(smallest, target, c):
                return msg + f"; nearest feasible: --context {c}"
    relax = ", ".join(f"{c['name']} limit {'>=' if c['sense'] == 'le' else '<='} "
                      f"{_round_away(c['value'], up=c['sense'] == 'le'):.3g} {c['unit']}" for c in failing)
    return msg + f"; no shape or context fits: the target's budget would need {relax}"


def progressive_chain(t: Shape, final: Shape, ratio: float) -> list[dict]:
    """Intermediate shapes from teacher to `final`, about `ratio` times smaller each, largest first.

    Each intermediate sits on the geometric path from the teacher's dimensions to the final ones
    (depth and width shrink together, as in Minitron's 15B -> 8B -> 4B), picked as the valid shape
    nearest that point. Intermediates are never shipped, so only the nesting matters (each can be
    pruned from the one before and the final from the last), not the target's budgets.
    """
    if final.params() >= t.params():
        return []
    # 5% slack: a 4.02x compression at ratio 2 is two stages, not three
    stages = max(1, math.ceil(math.log(t.params() / final.params() / 1.05) / math.log(ratio)))
    dims = ("layers", "hidden", "intermediate", "kv_heads")
    chain, prev = [], t
    nested = [s for s in candidates(t, final.layers) if final.fits_inside(s) and final.params() < s.params()]
    for i in range(1, stages):
        f = i / stages
        goal = {d: getattr(t, d) ** (1 - f) * getattr(final, d) ** f for d in dims}
        goal["params"] = t.params() ** (1 - f) * final.params() ** f
        options = [s for s in nested if s.fits_inside(prev) and s.params() < prev.params()]
        if not options:
            break

        def distance(s: Shape) -> float:
            # mostly the size (the embedding does not shrink with depth, so dims alone miss it), then the path
            return 4 * math.log(s.params() / goal["params"]) ** 2 + sum(
                math.log(getattr(s, d) / goal[d]) ** 2 for d in dims)

        prev = min(options, key=distance)
        chain.append(asdict(prev))
    return chain


def _plan_dict(shape: Shape, t: Shape, target: TargetProfile, context: int, group_bits: dict, cfg: PlanConfig,
               why: str, runners: list, chain: list) -> dict:
    checks = budget_checks(shape, target, context, group_bits)
    # Only an explicit --student shape can miss a budget here: the build goes on as asked, and the
    # verdict fails with the figures (exit 1) rather than refusing the user's own choice.
    return {
        "shape": asdict(shape),
        "params": shape.params(),
        "teacher_params": t.params(),
        "compression": t.params() / shape.params(),
        "format": target.primary_format,
        "formats": list(target.formats),
        "group_bits": dict(group_bits),
        "context": context,
        "weight_bytes": {f: shape.weight_bytes(f, group_bits) for f in target.formats},
        "checks": checks,
        "fits": all(c["ok"] for c in checks),
        "why": why,
        "runners_up": runners,
        "progressive": chain,
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
    """What later stages key on: the student (shared by targets with the same plan) and the artifacts."""
    return {"student": {"shape": plan["shape"], "context": plan["context"], "qat_format": plan["format"],
                        "group_bits": plan["group_bits"], "progressive": plan["progressive"]},
            "export": {"formats": plan["formats"], "group_bits": plan["group_bits"]},
            "plan": plan}
