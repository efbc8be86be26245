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
