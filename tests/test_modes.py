"""Distillation modes (distill/modes.py): white-box, black-box, on-policy (GKD), a teacher ensemble and
self-distillation with an EMA mean teacher. Each mode trains a few steps on tiny random teachers and
must lower its own objective, measured on fixed batches before and after; then the pieces one by one."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from edgedistill import config as cfgmod
from edgedistill.distill import modes, qat
from edgedistill.distill.losses import LossSpec, kd_loss, teacher_buckets
from edgedistill.distill.trainer import TrainConfig, _run_identity, distill, pack_rows
from edgedistill.errors import UserError
from test_distill import VOCAB, random_examples, tiny_llama

TAU = 1.0
# few steps, a high lr: enough to move a tiny student measurably on a 2-core machine
BASE = dict(steps=16, batch_size=4, seq_len=48, lr=1e-2, warmup_steps=2, checkpoint_every=100, temperature=TAU,
            mixed_precision="no")


@pytest.fixture(scope="module", autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state, fixed by the first Accelerator; these runs are in fp32
    (BASE), so the module starts from a fresh state and leaves a fresh one for the next module."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(0, layers=2, hidden=64)


@pytest.fixture(scope="module")
def second_teacher():
    return tiny_llama(5, layers=2, hidden=64)


@pytest.fixture(scope="module")
def examples():
    return random_examples(60, seed=1)


@pytest.fixture(scope="module")
def rows(examples):
    """Fixed rows the objectives are measured on, before and after training."""
    inputs, labels, mask, positions = pack_rows(examples, 48, 8, seed=123)
    return inputs, labels, mask, positions


def student():
    return tiny_llama(1, layers=1, hidden=32)


def logits(model, inputs, positions=None):
    with torch.no_grad():
        return model(input_ids=inputs, position_ids=positions, use_cache=False).logits.float()


def soft(student_logits, teacher_logits, mask, labels, objective="forward_kl"):
    """tau^2 D(teacher, student) on the supervised positions: the white-box soft term."""
    return kd_loss(student_logits, teacher_logits, mask, labels, temperature=TAU, alpha=1.0, objective=objective)[0].item()


class Counting(torch.nn.Module):
    """A teacher that counts its forward calls."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    @property
    def config(self):
        return self.model.config

    def forward(self, **kwargs):
        self.calls += 1
        return self.model(**kwargs)


# ---------------------------------------------------------------- each mode lowers its own objective

def test_white_box_lowers_the_kl_to_the_teacher(teacher, examples, rows, tmp_path):
    inputs, labels, mask, positions = rows
    target = logits(teacher, inputs, positions)
    s = student()
    before = soft(logits(s, inputs, positions), target, mask, labels)
    result = distill(s, teacher, examples, TrainConfig(**BASE, alpha=1.0), tmp_path, progress=False)
    assert soft(logits(s, inputs, positions), target, mask, labels) < 0.9 * before
    assert "mode" not in result and "on_policy_batches" not in result  # the default run's summary as before


def test_black_box_lowers_answer_cross_entropy_and_never_runs_the_teacher(teacher, examples, rows, tmp_path):
    inputs, labels, mask, positions = rows

    def ce(model):
        out = model(input_ids=inputs, position_ids=positions, use_cache=False)
        return modes.response_ce(out, labels, mask)[0].item()

    s = student()
    with torch.no_grad():
        before = ce(s)
    counting = Counting(teacher)
    cfg = TrainConfig(**BASE, mode="black_box")
    result = distill(s, counting, examples, cfg, tmp_path / "a", progress=False)
    assert counting.calls == 0
    with torch.no_grad():
        assert ce(s) < 0.95 * before
    assert result["mode"] == "black_box" and set(result["loss_parts"]) == {"ce"}
    # the loss is the CE alone, alpha ignored (the curves are rounded to 4 decimals and 4 digits)
    assert result["loss_parts"]["ce"] == pytest.approx(result["loss_curve"], rel=1e-3)

    # an API-only teacher: no model at all
    again = distill(student(), None, examples, cfg, tmp_path / "b", progress=False)
    assert again["loss_curve"] == result["loss_curve"]


def on_policy_objective(model, teacher, pool, objective):
    """The GKD objective: the divergence on the student's own samples of fixed prompts (fixed seed)."""
    inputs, labels, mask, positions = modes.on_policy_batch(model, pool, rows=8, max_new_tokens=12, seed=99, step=0)
    return soft(logits(model, inputs, positions), logits(teacher, inputs, positions), mask, labels, objective)


@pytest.mark.parametrize("fraction,objective", [(0.5, "forward_kl"), (1.0, "reverse_kl")])
def test_on_policy_lowers_the_divergence_on_the_students_own_samples(teacher, examples, tmp_path, fraction,
                                                                     objective):
    pool = modes.prompt_pool(examples, 48, 12)
    s = student()
    before = on_policy_objective(s, teacher, pool, objective)
    cfg = TrainConfig(**BASE, alpha=1.0, loss=LossSpec(objective=objective), on_policy_fraction=fraction,
                      on_policy_max_new_tokens=12)
    counting = Counting(teacher)
    result = distill(s, counting, examples, cfg, tmp_path, progress=False)
    assert on_policy_objective(s, teacher, pool, objective) < 0.9 * before
    expected = sum(modes.on_policy_step(i, fraction, 0) for i in range(cfg.steps))
    assert result["on_policy_batches"] == expected and counting.calls == cfg.steps
    if fraction == 1.0:
        assert expected == cfg.steps
        # no CE in the loss on the student's own samples: the loss is tau^2 times the soft term alone
        assert all(math.isclose(loss, TAU**2 * d, rel_tol=1e-3, abs_tol=1e-4)
                   for loss, d in zip(result["loss_curve"], result["loss_parts"]["soft"]))
    else:
        assert 0 < expected < cfg.steps


def test_ensemble_lowers_the_kl_to_the_mean_of_the_teachers(teacher, second_teacher, examples, rows, tmp_path):
    inputs, labels, mask, positions = rows
    mean = TAU * modes.ensemble_log_probs([logits(teacher, inputs, positions),
                                           logits(second_teacher, inputs, positions)], TAU)
    s = student()
    before = soft(logits(s, inputs, positions), mean, mask, labels)
    first, second = Counting(teacher), Counting(second_teacher)
    result = distill(s, [first, second], examples, TrainConfig(**BASE, alpha=1.0), tmp_path, progress=False)
    assert soft(logits(s, inputs, positions), mean, mask, labels) < 0.9 * before
    assert first.calls == second.calls == BASE["steps"]
    assert result["steps"] == BASE["steps"]


def test_self_distillation_lowers_its_objective_against_the_mean_teacher(examples, rows, tmp_path):
    inputs, labels, mask, positions = rows
    alpha = 0.5

    def objective(model, mean_teacher):
        z = logits(model, inputs, positions)
        return kd_loss(z, logits(mean_teacher, inputs, positions), mask, labels, temperature=TAU, alpha=alpha)[0].item()

    s = student()
    start = student()  # the mean teacher starts as the student itself
    before = objective(s, start)
    cfg = TrainConfig(**BASE, alpha=alpha, mode="self", ema_momentum=0.8, ema_momentum_end=0.99)
    result = distill(s, None, examples, cfg, tmp_path, progress=False)
    assert result["mode"] == "self" and result["ema_momentum"] == pytest.approx(0.99)

    mean_teacher = student()  # the EMA at the end, from the last checkpoint
    state = load_file(str(tmp_path / "ckpt" / modes.EMA_FILE))
    mean_teacher.load_state_dict(state, strict=False)
    assert torch.equal(mean_teacher.model.embed_tokens.weight, state["model.embed_tokens.weight"])
    moved = mean_teacher.model.norm.weight - start.model.norm.weight
    assert moved.abs().max() > 0  # it followed the student...
    assert not torch.equal(mean_teacher.model.norm.weight, s.model.norm.weight)  # ...and lags behind it
    assert objective(s, mean_teacher) < 0.95 * before


# ---------------------------------------------------------------- the pieces

def test_ensemble_log_probs_are_the_log_of_the_mean_of_softmaxes():
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 3 for _ in range(3)]
    tau = 2.0
    by_hand = torch.log(sum(torch.softmax(z / tau, -1) for z in zs) / 3)
    assert torch.allclose(modes.ensemble_log_probs(zs, tau), by_hand, atol=1e-12)

    # as the "logits" kd_loss reads (tau * log p_bar), the loss sees p_bar exactly, top-k path included
    ensemble_logits = tau * modes.ensemble_log_probs(zs, tau)
    s = torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    labels, mask = torch.randint(0, 11, (3, 5), generator=g), torch.ones(3, 5, dtype=torch.long)
    _, parts = kd_loss(s, ensemble_logits, mask, labels, temperature=tau, alpha=1.0)
    p_bar = by_hand.exp()
    kl = (p_bar * (by_hand - F.log_softmax(s / tau, -1))).sum(-1).mean()
    assert parts["soft"].item() == pytest.approx(kl.item(), rel=1e-9)
    ids, buckets = teacher_buckets(ensemble_logits.reshape(-1, 11), 4, tau, torch.float64)
    assert torch.equal(ids, by_hand.reshape(-1, 11).topk(4).indices)
    assert torch.allclose(buckets[:, :4].exp(), p_bar.reshape(-1, 11).gather(1, ids), atol=1e-12)


def test_teacher_ensemble_module(teacher, second_teacher):
    x = torch.randint(0, VOCAB, (2, 9))
    ensemble = modes.TeacherEnsemble([teacher, second_teacher], temperature=2.0)
    with torch.no_grad():
        out = ensemble(input_ids=x, use_cache=False, output_hidden_states=True)
        first = teacher(input_ids=x, use_cache=False, output_hidden_states=True)
    want = 2.0 * modes.ensemble_log_probs([first.logits, logits(second_teacher, x)], 2.0)
    assert torch.allclose(out.logits, want)
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, first.hidden_states))  # the first teacher's
    assert ensemble.config is teacher.config
    other = tiny_llama(0, layers=1, hidden=32)
    other.config.vocab_size = VOCAB + 1
    with pytest.raises(ValueError, match="vocabulary"):
        modes.TeacherEnsemble([teacher, other], 1.0)


def _word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def test_teachers_with_different_tokenizers_are_refused():
    a, same, other = (_word_tokenizer(["hello", "world"]), _word_tokenizer(["hello", "world"]),
                      _word_tokenizer(["hello", "there"]))
    modes.check_shared_tokenizer([("teacher-a", a), ("teacher-b", same)])
    with pytest.raises(UserError) as e:
        modes.check_shared_tokenizer([("teacher-a", a), ("teacher-b", same), ("teacher-c", other)])
    assert "'teacher-a'" in str(e.value) and "'teacher-c'" in str(e.value) and "tokenizer" in str(e.value)


def test_the_stage_loads_extra_teachers_and_refuses_another_tokenizer(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    from conftest import make_tiny_llama
    from edgedistill.distill.stage import extra_teachers

    first = make_tiny_llama(tmp_path / "a", tokenizer_dir, layers=1, hidden=32, intermediate=64)
    same = make_tiny_llama(tmp_path / "b", tokenizer_dir, layers=1, hidden=32, intermediate=64, seed=1)
    tok = AutoTokenizer.from_pretrained(first)
    cfg = cfgmod.resolve({"teacher": str(first), "distill": {"teachers": [str(same)]}})
    [model] = extra_teachers(cfg, tok, len(tok))
    assert model.config.vocab_size == len(tok)
    with pytest.raises(UserError, match="vocabulary width"):
        extra_teachers(cfg, tok, len(tok) + 64)

    widened = AutoTokenizer.from_pretrained(tokenizer_dir)
    widened.add_tokens(["<extra-token>"])
    widened.save_pretrained(tmp_path / "tok2")
    different = make_tiny_llama(tmp_path / "c", tmp_path / "tok2", layers=1, hidden=32, intermediate=64)
    cfg = cfgmod.resolve({"teacher": str(first), "distill": {"teachers": [str(same), str(different)]}})
    with pytest.raises(UserError) as e:
        extra_teachers(cfg, tok, len(tok))
    assert str(first) in str(e.value) and str(different) in str(e.value) and "share a tokenizer" in str(e.value)


def test_ema_update_is_the_formula_and_the_momentum_schedule_hits_its_ends():
    s = student()
    ema = modes.EmaTeacher(s, steps=10, start=0.9, end=1.0)
    assert ema.momentum(0) == pytest.approx(0.9) and ema.momentum(9) == pytest.approx(1.0)
    ms = [ema.momentum(i) for i in range(10)]
    assert ms == sorted(ms) and modes.momentum_at(0, 1, 0.5, 0.99) == 0.99

    before = {n: p.clone() for n, p in ema.model.named_parameters()}
    with torch.no_grad():
        for p in s.parameters():
            p.add_(torch.randn_like(p))
    qat.enable_fake_quant(s, "gguf-q4_0")  # the EMA follows the float master weights, not the fake-quant ones
    m = ema.update(s, 3)
    assert m == pytest.approx(ema.momentum(3)) and 0.9 < m < 1.0
    qat.disable_fake_quant(s)
    student_params = dict(s.named_parameters())
    for name, p in ema.model.named_parameters():
        assert torch.allclose(p, m * before[name] + (1 - m) * student_params[name], atol=1e-6), name
    assert ema.model.lm_head.weight is ema.model.model.embed_tokens.weight  # still tied
    assert not any(p.requires_grad for p in ema.model.parameters())

    last = {n: p.clone() for n, p in ema.model.named_parameters()}
    ema.update(s, 9)  # momentum 1: nothing moves
    assert all(torch.equal(p, last[n]) for n, p in ema.model.named_parameters())


def test_on_policy_choice_and_batches_are_deterministic(examples):
    steps = [modes.on_policy_step(i, 0.3, seed=7) for i in range(2000)]
    assert steps == [modes.on_policy_step(i, 0.3, seed=7) for i in range(2000)]
    assert abs(sum(steps) / 2000 - 0.3) < 0.05
    assert steps != [modes.on_policy_step(i, 0.3, seed=8) for i in range(2000)]
    assert not any(modes.on_policy_step(i, 0.0, 7) for i in range(50))
    assert all(modes.on_policy_step(i, 1.0, 7) for i in range(50))

    pool = modes.prompt_pool(examples, 48, 10)
    assert all(0 < len(p) <= 39 for p in pool)
    model = student()
    rng = torch.get_rng_state()
    one = modes.on_policy_batch(model, pool, rows=4, max_new_tokens=10, seed=3, step=5)
    assert torch.equal(torch.get_rng_state(), rng)  # the run's own randomness is left as it was
    two = modes.on_policy_batch(model, pool, rows=4, max_new_tokens=10, seed=3, step=5)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    other = modes.on_policy_batch(model, pool, rows=4, max_new_tokens=10, seed=3, step=5, rank=1)
    assert not torch.equal(one[0][:, :8], other[0][:, :8]) or not torch.equal(one[1], other[1])

    inputs, labels, mask, positions = one
    assert torch.equal(inputs[:, 1:][mask[:, :-1].bool() & mask[:, 1:].bool()],
                       labels[:, :-1][mask[:, :-1].bool() & mask[:, 1:].bool()])
    assert torch.equal(positions, torch.arange(inputs.shape[1]).expand_as(inputs))
    for r in range(4):
        sampled = mask[r].nonzero().flatten()
        assert 1 <= len(sampled) <= 10 and torch.equal(sampled, torch.arange(sampled[0], sampled[-1] + 1))
        prompt = inputs[r, :sampled[0] + 1]
        assert any(torch.equal(prompt, p) for p in pool)  # supervised: exactly the tokens after a prompt
    with pytest.raises(UserError, match="on-policy"):
        modes.prompt_pool(examples, 48, 48)


def test_resume_of_a_self_distillation_run_with_on_policy_steps_is_bit_identical(examples, tmp_path):
    cfg = TrainConfig(**{**BASE, "steps": 10, "checkpoint_every": 4}, mode="self", ema_momentum=0.9,
                      on_policy_fraction=0.5, on_policy_max_new_tokens=8)
    straight = student()
    full = distill(straight, None, examples, cfg, tmp_path / "a", progress=False)
    assert 0 < full["on_policy_batches"] < 10

    first = distill(student(), None, examples, cfg, tmp_path / "b", progress=False, stop_after=7)
    assert first["steps"] == 7
    resumed = student()
    second = distill(resumed, None, examples, cfg, tmp_path / "b", progress=False, resume=True)
    assert second["resumed_from"] == 4 and second["loss_curve"] == full["loss_curve"]
    assert second["on_policy_batches"] == full["on_policy_batches"]
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ema_a, ema_b = (load_file(str(tmp_path / d / "ckpt" / modes.EMA_FILE)) for d in ("a", "b"))
    assert ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


# ---------------------------------------------------------------- settings

def test_mode_settings_at_their_defaults_change_no_config_or_run_identity():
    default = cfgmod.resolve({})
    dumped = default.model_dump(mode="json")["distill"]
    assert not set(dumped) & {"mode", "teachers", "on_policy_fraction", "on_policy_max_new_tokens", "ema_momentum",
                              "ema_momentum_end"}
    data = (torch.zeros(2, 3, dtype=torch.long),)
    plain = TrainConfig(steps=5, batch_size=1, seq_len=8)
    assert _run_identity(plain, data, 1) == _run_identity(TrainConfig(
        steps=5, batch_size=1, seq_len=8, on_policy_max_new_tokens=9, ema_momentum=0.5), data, 1)  # unused: idle
    on = _run_identity(TrainConfig(steps=5, batch_size=1, seq_len=8, on_policy_fraction=0.5), data, 1)
    assert on["config"]["on_policy_fraction"] == 0.5 and "on_policy_max_new_tokens" not in on["config"]

    cfg = cfgmod.resolve({"distill": {"mode": "self", "ema_momentum": 0.99, "on_policy_fraction": 0.25}})
    assert cfgmod.resolve(json.loads(json.dumps(cfg.model_dump(mode="json")))) == cfg  # replays
    from edgedistill.distill.stage import train_config
    run = train_config(cfg.distill, 10, None, 0)
    assert (run.mode, run.ema_momentum, run.ema_momentum_end, run.on_policy_fraction) == ("self", 0.99, 1.0, 0.25)


@pytest.mark.parametrize("distill_section,needle", [
    ({"mode": "black_box", "on_policy_fraction": 0.5}, "black_box"),
    ({"mode": "black_box", "teachers": ["x"]}, "teachers"),
    ({"mode": "black_box", "loss": {"objective": "jsd"}}, "loss"),
    ({"mode": "black_box", "loss": {"top_k": 8}, "logit_cache": True}, "logit_cache"),
    ({"mode": "self", "teachers": ["x"]}, "self"),
    ({"mode": "self", "loss": {"top_k": 8}, "logit_cache": True}, "logit_cache"),
    ({"mode": "self", "loss": {"hidden_weight": 1.0}}, "hidden_weight"),
    ({"ema_momentum": 0.99}, "ema_momentum only applies"),
    ({"on_policy_max_new_tokens": 16}, "on_policy_max_new_tokens only applies"),
    ({"mode": "self", "ema_momentum": 0.999, "ema_momentum_end": 0.99}, "must not exceed"),
    ({"on_policy_fraction": 0.5, "on_policy_max_new_tokens": 300}, "room for a prompt"),
    ({"teachers": ["x"], "loss": {"confidence_weighting": True}}, "ensemble"),
    ({"teachers": ["x", "x"]}, "once"),
    ({"on_policy_fraction": 1.5}, "on_policy_fraction"),
])
def test_mode_settings_that_mean_nothing_are_refused(distill_section, needle):
    with pytest.raises(UserError, match=needle):
        cfgmod.resolve({"distill": distill_section})


def test_the_trainer_refuses_them_too(examples, tmp_path):
    with pytest.raises(ValueError, match="black_box"):
        distill(student(), None, examples, TrainConfig(**BASE, mode="black_box", on_policy_fraction=0.5), tmp_path)
    with pytest.raises(ValueError, match="pass the teacher"):
        distill(student(), None, examples, TrainConfig(**BASE), tmp_path)


def test_cli_maps_the_mode_options(monkeypatch):
    from typer.testing import CliRunner

    import edgedistill.build
    from edgedistill.cli import app

    seen = {}
    monkeypatch.setattr(edgedistill.build, "build", lambda cfg, **kw: seen.update(cfg=cfg) or 0)
    result = CliRunner().invoke(app, ["build", "--on-policy", "0.5", "--extra-teacher", "a", "--extra-teacher", "b"])
    assert result.exit_code == 0, result.output
    d = seen["cfg"].distill
    assert (d.mode, d.on_policy_fraction, d.teachers) == ("white_box", 0.5, ["a", "b"])
    assert CliRunner().invoke(app, ["build", "--mode", "self"]).exit_code == 0 and seen["cfg"].distill.mode == "self"
    refused = CliRunner().invoke(app, ["build", "--mode", "black_box", "--on-policy", "0.5"])
    assert isinstance(refused.exception, UserError) and "black_box" in str(refused.exception)


def test_black_box_input_is_a_jsonl_chat_ending_with_the_answer(tmp_path, tiny_teacher_dir):
    """The black-box data path: the user's prompts with the API teacher's answers, no generation."""
    from transformers import AutoTokenizer

    from edgedistill.data.prompts import load_user_file
    from edgedistill.data.teacher_answers import generate_answers, tokenize_records

    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Name a color."},
                                             {"role": "assistant", "content": "Blue."}]}) + "\n")
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)

    class NoGeneration(torch.nn.Module):
        generation_config = None

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, **kwargs):
            raise AssertionError("the teacher must not be asked")

    [record] = generate_answers(NoGeneration(), tok, load_user_file(path), max_new_tokens=8, batch_size=2)
    assert record["answer"] == "Blue." and record["messages"] == [{"role": "user", "content": "Name a color."}]
    [tokens] = tokenize_records(tok, [record], max_len=64)
    answer = [t for t, m in zip(tokens["input_ids"], tokens["loss_mask"]) if m]
    assert tok.decode(answer).strip().startswith("Blue.")


def test_ensemble_settings_refused_before_anything_is_written(tmp_path, tiny_teacher_dir):
    # a progressive build's last stage trains against its intermediate student: refused at config time
    with pytest.raises(UserError, match="distill.teachers with plan.progressive"):
        cfgmod.resolve({"plan": {"progressive": True}, "distill": {"teachers": [str(tiny_teacher_dir)]}})
    # a missing extra teacher stops the build before its output folder exists (exit 2)
    from conftest import cli

    out = tmp_path / "out"
    res = cli("build", "--teacher", tiny_teacher_dir, "--extra-teacher", tmp_path / "nowhere", "--out", out,
              "--no-progress")
    assert res.returncode == 2, res.stderr
    assert "nowhere" in res.stderr and not out.exists()
