"""The evaluation that finds what distillation broke, and the refinement that repairs it (issue 9):
the per-category scorecard and retention, the failure-mode flags, `--refine`, and the evaluate
stage in a real (tiny) build, with the generalization corpus kept out of every training path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import cli, fast_config
from edgedistill.distill import refine
from edgedistill.distill.trainer import TrainConfig, distill
from edgedistill.evaluate import scorecard
from edgedistill.evaluate.stage import collapse_flag, degeneration_flags, reasoning_flag
from edgedistill.config import EvalConfig
from edgedistill.measure.quality import evaluate, teacher_targets

# ---- a teacher with three capabilities the student can keep or lose: each category is a counting
# rule over its own token range (a: +1, b: -1, c: +3); the teacher learns all three.
V = 256
RULES = {"a": (4, 84, 1), "b": (84, 164, -1), "c": (164, 244, 3)}


def _llama(seed: int, layers: int, hidden: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      max_position_embeddings=128)
    return LlamaForCausalLM(cfg)


def _sequence(cat: str, g: torch.Generator, n: int = 24) -> list[int]:
    lo, hi, step = RULES[cat]
    x = int(torch.randint(lo, hi, (1,), generator=g))
    out = []
    for _ in range(n):
        out.append(x)
        x = lo + (x - lo + step) % (hi - lo)
    return out


def _examples(cat: str, n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": _sequence(cat, g), "loss_mask": [0] * 4 + [1] * 20, "category": cat} for _ in range(n)]


@pytest.fixture(scope="module", autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state, fixed by the first Accelerator; these runs are in fp32,
    so the module starts from a fresh state and leaves a fresh one for the next module."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def rule_teacher() -> LlamaForCausalLM:
    teacher = _llama(0, 2, 64)
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(99)
    for _ in range(100):
        batch = torch.tensor([_sequence("abc"[i % 3], g) for i in range(24)])
        teacher(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return teacher.eval()


@pytest.fixture(scope="module")
def heldout():
    return _examples("a", 6, 11) + _examples("b", 6, 12) + _examples("c", 6, 13)


def _train(student, teacher, examples, seed: int, workdir: Path) -> dict:
    cfg = TrainConfig(steps=30, batch_size=4, seq_len=48, lr=1e-2, warmup_steps=2, mixed_precision="no", seed=seed)
    return distill(student, teacher, examples, cfg, workdir, progress=False)


# ---- the scorecard


def test_by_category_figures_add_up_to_the_overall_ones(rule_teacher, heldout):
    student = _llama(5, 1, 32).eval()
    targets = teacher_targets(rule_teacher, heldout)
    q = evaluate(student, targets, heldout, by_category=True)
    cats = q["by_category"]
    assert set(cats) == {"a", "b", "c"}
    assert sum(c["tokens"] for c in cats.values()) == q["tokens"]
    weighted = sum(c["top1_agreement"] * c["tokens"] for c in cats.values()) / q["tokens"]
    assert weighted == pytest.approx(q["top1_agreement"])
    plain = evaluate(student, targets, heldout)
    assert "by_category" not in plain and plain["kl"] == pytest.approx(q["kl"])


def test_retention_collapse_and_weakest_by_hand():
    teacher = {"by_category": {c: {"top1_agreement": 1.0, "perplexity": p} for c, p in (("x", 2.0), ("y", 4.0),
                                                                                        ("z", 3.0))}}
    model = {"by_category": {c: {"top1_agreement": a, "perplexity": p} for c, a, p in (("x", 0.5, 4.0), ("y", 0.8, 5.0),
                                                                                        ("z", 0.1, 30.0))}}
    cats = scorecard.by_category(model, teacher)
    assert {c: f["retention"] for c, f in cats.items()} == pytest.approx({"x": 0.5, "y": 0.8, "z": 0.1})
    assert {c: f["likelihood_retention"] for c, f in cats.items()} == pytest.approx({"x": 0.5, "y": 0.8, "z": 0.1})
    low = scorecard.collapsed(cats, 0.5)
    assert low["mean_retention"] == pytest.approx(1.4 / 3)
    assert list(low["categories"]) == ["z"] and not low["ok"]  # 0.1 < 0.5 * 0.467
    assert scorecard.collapsed(cats, 0.2)["ok"]  # 0.1 >= 0.2 * 0.467: the threshold decides
    assert scorecard.weakest(cats, 2) == ["z", "x"]
    assert scorecard.retention({"top1_agreement": None}, {"top1_agreement": 1.0}) is None


# ---- the must-show: a category whose training data was removed is flagged, and a round raises it


def test_a_category_trained_without_data_is_flagged_and_a_refine_round_raises_it(rule_teacher, heldout, tmp_path):
    targets = teacher_targets(rule_teacher, heldout)
    teacher_q = evaluate(rule_teacher, targets, heldout, by_category=True)
    student = _llama(5, 1, 32).eval()
    _train(student, rule_teacher, _examples("a", 24, 1) + _examples("b", 24, 2), 0, tmp_path / "main")  # no "c"
    first = evaluate(student, targets, heldout, by_category=True)
    cats = scorecard.by_category(first, teacher_q)
    flag = collapse_flag(cats, 0.5, "the student")
    assert not flag["ok"] and list(flag["collapsed"]) == ["c"], flag["message"]

    def prepare(r: int, weak: list[str]) -> refine.RoundData:
        # the teacher's own continuations of new prompts of the weak categories, oversampled
        new = []
        for cat in weak:
            for ex in _examples(cat, 24, 100 + r):
                with torch.no_grad():
                    out = rule_teacher.generate(torch.tensor([ex["input_ids"][:4]]), max_new_tokens=20,
                                                do_sample=False, pad_token_id=0)
                new.append({"input_ids": out[0].tolist(), "loss_mask": [0] * 4 + [1] * (out.shape[1] - 4),
                            "category": cat})
        train = _examples("a", 24, 1) + _examples("b", 24, 2)
        return refine.RoundData(len(new), refine.oversampled(train, new, weak, 2))

    final, rounds = refine.run_rounds(
        student, first=first, teacher_quality=teacher_q, rounds=1, collapse_ratio=0.5, n_weak=1, prepare=prepare,
        train=lambda r, ex: _train(student, rule_teacher, ex, r, tmp_path / f"round-{r}"),
        measure=lambda: evaluate(student, targets, heldout, by_category=True))
    (round1,) = rounds
    assert round1["weakest"] == ["c"] and round1["kept"]
    assert round1["retention_before"]["c"] < 0.2 and round1["retention_after"]["c"] > 0.5, round1
    after = scorecard.by_category(final, teacher_q)
    assert collapse_flag(after, 0.5, "the student")["ok"]  # no longer flagged, and nothing else is
    table = refine.summary_table(first, teacher_q, rounds)
    assert [row["category"] for row in table] == ["a", "b", "c"]
    assert all("before" in row and "round_1" in row for row in table)


def test_a_round_that_collapses_another_category_is_rolled_back():
    student = torch.nn.Linear(2, 2)
    before_weights = {k: v.clone() for k, v in student.state_dict().items()}
    teacher = {"by_category": {c: {"top1_agreement": 1.0} for c in "xyz"}}
    first = {"by_category": {"x": {"top1_agreement": 0.6}, "y": {"top1_agreement": 0.6}, "z": {"top1_agreement": 0.05}}}
    worse = {"by_category": {"x": {"top1_agreement": 0.02}, "y": {"top1_agreement": 0.6}, "z": {"top1_agreement": 0.6}}}

    def train(r, examples):
        with torch.no_grad():
            student.weight.add_(1.0)
        return {"steps": 1, "final_loss": 0.0}

    final, (rec,) = refine.run_rounds(
        student, first=first, teacher_quality=teacher, rounds=1, collapse_ratio=0.5, n_weak=1,
        prepare=lambda r, weak: refine.RoundData(0, []), train=train, measure=lambda: worse)
    assert rec["weakest"] == ["z"] and not rec["kept"] and rec["new_collapses"] == ["x"]
    assert final is first  # the rolled-back round's figures are not the student's
    for k, v in student.state_dict().items():
        assert torch.equal(v, before_weights[k])


# ---- the other flags, each failing and passing at its threshold


def _tasks(t_direct, s_direct, t_step, s_step, step_ci=(0.2, 0.6)) -> dict:
    return {"teacher": {"direct": {"accuracy": t_direct}, "step_by_step": {"accuracy": t_step}},
            "student": {"direct": {"accuracy": s_direct}, "step_by_step": {"accuracy": s_step}},
            "difference": {"step_by_step": {"ci95": list(step_ci)}}}


def test_reasoning_degradation_flag():
    lost_reasoning = _tasks(0.5, 0.45, 0.6, 0.2)  # direct -0.05, step by step -0.40
    flag = reasoning_flag(lost_reasoning, 0.15)
    assert not flag["ok"] and flag["value"] == pytest.approx(0.35) and flag["basis"] == "evaluated"
    assert reasoning_flag(lost_reasoning, 0.4)["ok"]
    assert reasoning_flag(_tasks(0.5, 0.3, 0.6, 0.4), 0.15)["ok"]  # both dropped alike
    # the same drop on too few tasks to tell from noise: the interval holds 0
    noisy = reasoning_flag(_tasks(0.5, 0.45, 0.6, 0.2, step_ci=(-0.1, 0.7)), 0.15)
    assert noisy["ok"] and "within the paired 95% interval" in noisy["message"]


def test_degeneration_flags_compare_the_student_with_the_teacher():
    e = EvalConfig()
    teacher = {"loop_fraction": 0.1, "distinct_2": 0.6}
    looping = {"loop_fraction": 0.9, "distinct_2": 0.05}
    assert [f["ok"] for f in degeneration_flags(looping, teacher, e)] == [False, False]
    assert [f["ok"] for f in degeneration_flags({"loop_fraction": 0.2, "distinct_2": 0.5}, teacher, e)] == [True, True]
    # as repetitive as its own teacher: nothing that distillation broke
    assert [f["ok"] for f in degeneration_flags(looping, looping, e)] == [True, True]
    empty = {"loop_fraction": None, "distinct_2": None}
    assert [f["value"] for f in degeneration_flags(empty, teacher, e)] == [None, None]


# ---- the evaluate stage in a build: report, verdict, refinement, and the corpus kept out of training


@pytest.fixture(scope="module")
def evaluated_build(tmp_path_factory, tiny_teacher_dir, small_prompts):
    tmp = tmp_path_factory.mktemp("evaluate")
    out = tmp / "out"
    cfg = fast_config(tmp, out, tiny_teacher_dir, small_prompts)
    # the teacher's logits from the cache, so the test can see what the cache was built from
    cfg.write_text(cfg.read_text().replace("[distill]\n", "[distill]\nlogit_cache = true\n")
                   + "[distill.loss]\ntop_k = 8\n")
    res = cli("build", "--config", cfg, "--no-progress", "--refine", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_report_has_the_scorecard_tasks_calibration_and_refinement(evaluated_build):
    report = json.loads((evaluated_build / "phone-4gb" / "report.json").read_text())
    ev = report["evaluation"]
    sc = ev["scorecard"]
    assert sc["categories"] and {"teacher", "student_init", "student"} <= set(sc["models"])
    for a in report["artifacts"]:  # every artifact, scored in its runtime, per category
        assert set(sc["models"][a["format"]]) == set(sc["categories"])
        names = [c["name"] for c in a["checks"]]
        assert {"capability_collapse", "reasoning_degradation", "degeneration_loops"} <= set(names)
    for model in ("teacher", "student"):
        for mode in ("direct", "step_by_step"):
            score = ev["tasks"][model][mode]
            lo, hi = score["ci95"]
            assert 0 <= lo <= score["accuracy"] <= hi <= 1 and score["n"] == ev["tasks"]["tasks"]
    assert all(v is not None and v > 1 for v in ev["generalization"]["perplexity"].values())
    assert ev["calibration"]["student_vs_teacher"]["ece"] is not None
    assert 0 <= ev["speculative"]["acceptance"]["acceptance_rate"] <= 1
    assert ev["speculative"]["speedup"]["plain_tok_s"] > 0
    (round1,) = ev["refine"]["rounds"]
    assert round1["steps"] == 2 and round1["new_teacher_answers"] > 0
    md = (evaluated_build / "phone-4gb" / "report.md").read_text()
    assert "Per-capability scorecard" in md and "Refinement" in md and "95% Wilson" in md
    html = (evaluated_build / "phone-4gb" / "report.html").read_text()
    assert 'aria-label="reliability diagram"' in html


def test_the_generalization_corpus_never_enters_training_data_or_the_logit_cache(evaluated_build):
    from transformers import AutoTokenizer

    from edgedistill.data.teacher_answers import read_jsonl, tokenize_records
    from edgedistill.distill.logit_cache import read_metadata
    from edgedistill.evaluate.corpus import contains_corpus, corpus_examples, corpus_fingerprints

    stages = evaluated_build / ".stages"
    (data,) = stages.glob("data-*")
    (distilled,) = stages.glob("distill-*")
    tok = AutoTokenizer.from_pretrained(distilled / "student")
    prints = corpus_fingerprints(tok, n=8)
    rows = [ex["input_ids"] for part in ("train", "heldout") for ex in read_jsonl(data / f"{part}_tokens.jsonl")]
    refined = [r for f in distilled.glob("refine-*/answers-*.jsonl") for r in read_jsonl(f)]
    assert rows and refined
    rows += [ex["input_ids"] for ex in tokenize_records(tok, refined, max_len=1024)]
    assert not contains_corpus(rows, prints, 8)
    # negative control: the same check finds the corpus where it is
    assert contains_corpus(rows + [corpus_examples(tok, max_len=64, max_examples=1)[0]["input_ids"]], prints, 8)
    # the cache holds exactly the training rows of the main run and the refine round (steps x batch),
    # nothing from the evaluate stage's passes over the corpus
    shards = sorted((evaluated_build / ".cache" / "teacher-logits").rglob("*.safetensors"))
    positions = sum(int(read_metadata(s)["positions"]) for s in shards)
    assert positions == (4 + 2) * 2 * 64


def test_heldout_examples_take_every_category_before_a_second_of_any():
    from edgedistill.measure.quality import heldout_examples

    records = [{"category": c, "i": i} for c, n in (("code", 5), ("math", 1), ("mine", 2)) for i in range(n)]
    picked = heldout_examples(records, 4)
    assert [(r["category"], r["i"]) for r in picked] == [("code", 0), ("math", 0), ("mine", 0), ("code", 1)]
    assert records[:4] != picked  # the first n would have left the user's category out
    assert heldout_examples(records, 100) == sorted(records, key=lambda r: (r["i"], ["code", "math", "mine"].index(r["category"])))


def test_a_raised_flag_warns_and_fails_the_build_only_under_strict():
    from types import SimpleNamespace

    from edgedistill.budget import failure_flags, raised_flags
    from edgedistill.config import BuildConfig

    class Ctx(dict):
        pass

    def ctx(strict: bool) -> Ctx:
        c = Ctx(distill=SimpleNamespace(summary={"quality": {"teacher": {"by_category": {
                    "x": {"top1_agreement": 1.0}, "y": {"top1_agreement": 1.0}}}}}),
                profile=SimpleNamespace(summary={"quality": {"gguf-q4_0": {"by_category": {
                    "x": {"top1_agreement": 0.6}, "y": {"top1_agreement": 0.01}}}}}),  # y collapsed
                evaluate=SimpleNamespace(summary={"flags": [
                    {"name": "degeneration_loops", "ok": True, "message": "fine"}]}))
        c.cfg = BuildConfig(strict=strict)
        return c

    warned = failure_flags(ctx(False), "gguf-q4_0")
    collapse = next(f for f in warned if f["name"] == "capability_collapse")
    assert collapse["raised"] and collapse["ok"] and "--strict fails on it" in collapse["message"]
    assert list(collapse["collapsed"]) == ["y"]
    assert raised_flags(warned) == [collapse["message"]]
    strict = failure_flags(ctx(True), "gguf-q4_0")
    collapse = next(f for f in strict if f["name"] == "capability_collapse")
    assert collapse["raised"] and not collapse["ok"]
    assert all(f["ok"] for f in strict if f["name"] != "capability_collapse")
