"""The plan: fits every budget, respects compression and explicit shapes, refuses impossible budgets."""

import pytest

from edgedistill.config import PlanConfig, StudentShape
from edgedistill.errors import UserError
from edgedistill.plan import Shape, budget_checks, solve
from edgedistill.targets import builtin_names, load_target

SMOLLM2 = {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
           "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True}
TEACHER = {"id": "smollm2", "params": 134_515_008, "config": SMOLLM2}


def test_shape_params_match_the_real_teacher():
    s = Shape(30, 576, 1536, 9, 3, 64, 49152, True)
    assert s.params() == 134_515_008  # the figure transformers reports for SmolLM2-135M


@pytest.mark.parametrize("name", builtin_names())
def test_every_target_gets_a_plan_that_meets_every_budget(name):
    target = load_target(name)
    plan = solve(TEACHER, target, PlanConfig())
    assert plan["params"] <= TEACHER["params"] / 4
    assert all(c["ok"] for c in plan["checks"]), plan["checks"]
    s = plan["shape"]
    assert s["heads"] % s["kv_heads"] == 0 and s["hidden"] % 32 == 0 and s["intermediate"] % 32 == 0
    shape = Shape(**s)
    assert all(c["ok"] for c in budget_checks(shape, target, plan["context"]))


def test_compression_is_respected():
    small = solve(TEACHER, load_target("laptop-16gb"), PlanConfig(compression=10))
    big = solve(TEACHER, load_target("laptop-16gb"), PlanConfig(compression=2))
    assert small["params"] <= TEACHER["params"] / 10 < big["params"] <= TEACHER["params"] / 2


def test_explicit_student_shape_is_used_and_validated():
    shape = StudentShape(layers=6, hidden=384, intermediate=1024, heads=6, kv_heads=2)
    plan = solve(TEACHER, load_target("phone-8gb"), PlanConfig(student=shape))
    assert plan["shape"]["layers"] == 6 and plan["shape"]["hidden"] == 384
    with pytest.raises(UserError, match="GQA"):
        solve(TEACHER, load_target("phone-8gb"),
              PlanConfig(student=StudentShape(layers=6, hidden=384, intermediate=1024, heads=5, kv_heads=2)))


def test_impossible_budget_names_the_budget():
    target = load_target("wearable-1gb").model_copy(deep=True)
    tight = target.budget.model_copy(update={"artifact_gb": 0.001})
    target = target.model_copy(update={"budget": tight})
    with pytest.raises(UserError, match="artifact"):
        solve(TEACHER, target, PlanConfig())


# ---- the fit solver over random teachers and targets -------------------------------------------

import math  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from edgedistill.plan import progressive_chain, teacher_shape  # noqa: E402
from edgedistill.targets import Budget, Device, TargetProfile  # noqa: E402


@st.composite
def teachers(draw):
    kv = draw(st.integers(1, 4))
    group = draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([32, 64, 128]))
    hidden = kv * group * head_dim
    cfg = {"num_hidden_layers": draw(st.integers(2, 24)), "hidden_size": hidden,
           "intermediate_size": 32 * draw(st.integers(1, 4 * hidden // 32)), "num_attention_heads": kv * group,
           "num_key_value_heads": kv, "head_dim": head_dim, "vocab_size": draw(st.integers(256, 64000)),
           "tie_word_embeddings": draw(st.booleans())}
    return {"id": "random", "params": teacher_shape(cfg).params(), "config": cfg}


@st.composite
def targets(draw):
    log = lambda lo, hi: draw(st.floats(lo, hi)).__rpow__(10)  # noqa: E731 - log-uniform floats
    battery = draw(st.one_of(st.none(), st.floats(1, 60)))
    device = Device(ram_gb=4, bandwidth_gb_s=log(0, 2.5), compute_gflops=log(0.5, 3.5), active_power_w=log(-0.5, 1.5),
                    battery_wh=battery)
    budget = Budget(memory_gb=log(-3, 0.5), artifact_gb=log(-3.5, 0.5), min_decode_tok_s=log(0, 2),
                    max_ttft_s=log(-1.5, 1), prompt_tokens=draw(st.integers(16, 512)),
                    max_energy_j_per_100_tok=draw(st.one_of(st.none(), st.floats(1, 500))),
                    max_battery_pct_per_hour=draw(st.one_of(st.none(), st.floats(0.5, 50))) if battery else None,
                    runtime_overhead_mb=draw(st.floats(0, 200)))
    formats = draw(st.lists(st.sampled_from(["gguf-q4_0", "gguf-q8_0", "onnx-int4", "onnx-int8"]),
                            min_size=1, max_size=4, unique=True))
    return TargetProfile(name="random", context=draw(st.sampled_from([256, 512, 2048, 8192])), formats=formats,
                         device=device, budget=budget)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(teacher=teachers(), target=targets(), compression=st.floats(1.0, 12.0))
def test_solver_never_returns_a_plan_that_breaks_a_budget(teacher, target, compression):
    try:
        plan = solve(teacher, target, PlanConfig(compression=compression))
    except UserError as e:
        # a refusal names a budget or the compression, and the nearest feasible setting when one exists
        assert "fits" in str(e) or "--compression" in str(e)
        return
    t = teacher_shape(teacher["config"])
    shape = Shape(**plan["shape"])
    assert plan["fits"] and all(c["ok"] for c in plan["checks"])
    # independently re-checked, for every format the target builds
    for c in budget_checks(shape, target, plan["context"], plan["group_bits"]):
        assert c["ok"], c
    assert plan["params"] <= teacher["params"] / compression + 1
    assert shape.fits_inside(t) and shape.head_dim == t.head_dim
    assert shape.heads % shape.kv_heads == 0 and shape.hidden % 32 == 0 and shape.intermediate % 32 == 0
    assert plan["context"] <= target.context


@given(teacher=teachers(), target=targets())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_suggested_compression_really_fits(teacher, target):
    try:
        solve(teacher, target, PlanConfig(compression=1.5))
    except UserError as e:
        text = str(e)
        if "nearest feasible: --compression" in text:
            suggested = float(text.rsplit("--compression ", 1)[1].split()[0].rstrip(";"))
            plan = solve(teacher, target, PlanConfig(compression=suggested))
            assert plan["fits"]


def test_context_is_shortened_only_when_nothing_fits_at_the_target_context():
    target = load_target("phone-4gb")
    long = target.model_copy(update={"context": 1 << 20})  # a KV cache of a million tokens cannot fit
    plan = solve(TEACHER, long, PlanConfig())
    assert plan["context"] < long.context and "context shortened" in plan["why"]
    assert solve(TEACHER, target, PlanConfig())["context"] == target.context
    with pytest.raises(UserError, match="memory"):  # an explicit --context is never shortened
        solve(TEACHER, long, PlanConfig(context=1 << 20))


def test_explicit_context_that_cannot_fit_suggests_one_that_does():
    target = load_target("wearable-1gb")
    with pytest.raises(UserError, match=r"nearest feasible: --(context|compression) \d+"):
        solve(TEACHER, target, PlanConfig(context=1 << 20))


def test_embedding_group_goes_to_8_bits_when_it_fits_and_stays_4_bits_when_not():
    roomy = solve(TEACHER, load_target("phone-4gb"), PlanConfig())
    assert roomy["group_bits"] == {"embed": 8}
    shape = Shape(**roomy["shape"])
    assert shape.weight_bytes("gguf-q4_0", {"embed": 8}) > shape.weight_bytes("gguf-q4_0")
    assert shape.weight_bytes("gguf-q8_0", {"embed": 8}) == shape.weight_bytes("gguf-q8_0")  # never lowered
    # an artifact budget between the all-4-bit and the mixed size forces 4 bits for the same shape
    target = load_target("phone-4gb")
    limit = (shape.weight_bytes("onnx-int4") + shape.weight_bytes("onnx-int4", {"embed": 8})) / 2 / 1e9
    tight = target.model_copy(update={"formats": ["gguf-q4_0", "onnx-int4"],
                                      "budget": target.budget.model_copy(update={"artifact_gb": limit})})
    plan = solve(TEACHER, tight, PlanConfig(student=StudentShape(**{k: roomy["shape"][k] for k in
                                                                     ("layers", "hidden", "intermediate", "heads", "kv_heads")})))
    assert plan["group_bits"] == {} and plan["fits"]


def test_wearable_and_phone_get_different_justified_shapes():
    wear = solve(TEACHER, load_target("wearable-1gb"), PlanConfig())
    phone = solve(TEACHER, load_target("phone-4gb"), PlanConfig())
    assert wear["params"] < phone["params"]
    assert all(c["ok"] for c in wear["checks"] + phone["checks"])
    # the phone's student is as large as the compression allows; the watch's is held back by a budget
    assert phone["params"] >= 0.9 * TEACHER["params"] / 4 and "--compression alone" in phone["why"]
    assert "held back by" in wear["why"]
    bigger = [s for s in phone["runners_up"] if s["params"] > wear["params"]]
    assert bigger and not all(c["ok"] for c in budget_checks(Shape(**{k: v for k, v in bigger[0].items() if k != "params"}),
                                                            load_target("wearable-1gb"), wear["context"]))


def test_progressive_chain_nests_and_halves():
    t = teacher_shape(SMOLLM2)
    final = Shape(**solve(TEACHER, load_target("wearable-1gb"), PlanConfig())["shape"])
    chain = [Shape(**s) for s in progressive_chain(t, final, 2.0)]
    assert chain, "a >4x compression has at least one intermediate stage"
    sizes = [t] + chain + [final]
    for big, small in zip(sizes, sizes[1:]):
        assert small.fits_inside(big) and small.params() < big.params()
    # about 2x per stage: geometric steps between teacher and final
    assert len(chain) + 1 >= math.log2(t.params() / final.params()) - 0.1
    for big, small in zip(sizes, sizes[1:]):
        assert 1.3 < big.params() / small.params() < 2.6
    assert progressive_chain(t, final, 1e6) == []  # one stage covers the whole ratio
