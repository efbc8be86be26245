"""Distillation: KD loss, fake-quant switch, the training loop with resume, and quality metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from edgedistill.distill import losses, qat
from edgedistill.distill.losses import kd_loss
from edgedistill.distill.trainer import TrainConfig, distill, lr_at, pack_rows
from edgedistill.errors import UserError
from edgedistill.measure.quality import evaluate, teacher_targets

VOCAB = 256


def tiny_llama(seed: int, *, layers: int, hidden: int, tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                      max_position_embeddings=256, rms_norm_eps=1e-5)
    return LlamaForCausalLM(cfg).eval()


def random_examples(n: int, seed: int) -> list[dict]:
    """Prompt then answer; answers are loss-masked like the data stage's chat examples."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt, answer = (int(x) for x in torch.randint(4, 20, (2,), generator=g))
        ids = torch.randint(0, VOCAB, (prompt + answer,), generator=g).tolist()
        out.append({"input_ids": ids, "loss_mask": [0] * prompt + [1] * answer})
    return out


@pytest.fixture
def test_format() -> str:
    return "gguf-q4_0"


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(0, layers=2, hidden=64)


@pytest.fixture(scope="module")
def train_examples():
    return random_examples(60, seed=1)


@pytest.fixture(scope="module")
def heldout_examples():
    return random_examples(16, seed=2)


# ---------------------------------------------------------------- losses

def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[[1.0, 2.0, 0.5], [0.3, -1.0, 2.0], [9.0, 9.0, 9.0]]])
    t = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, 2, 0]])
    mask = torch.tensor([[1, 1, 0]])  # the third position is a prompt token: it must not count
    tau, alpha = 2.0, 0.7

    def softmax(z):
        e = [math.exp(x / tau) for x in z]
        return [x / sum(e) for x in e]

    kls, ces = [], []
    for pos in range(2):
        p, q = softmax(t[0, pos].tolist()), softmax(s[0, pos].tolist())
        kls.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
        z = s[0, pos].tolist()
        ces.append(math.log(sum(math.exp(x) for x in z)) - z[labels[0, pos]])
    kl, ce = sum(kls) / 2, sum(ces) / 2

    loss, parts = kd_loss(s, t, mask, labels, temperature=tau, alpha=alpha)
    assert loss.item() == pytest.approx(alpha * tau**2 * kl + (1 - alpha) * ce, rel=1e-6)
    assert parts["soft"].item() == pytest.approx(kl, rel=1e-6)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-6)


def test_kd_loss_gradcheck_float64_across_chunks(monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ROWS", 2)  # 5 supervised rows -> chunks of 2, 2, 1
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(2, 4, 5, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 5, (2, 4), generator=g)
    mask = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0]])
    assert torch.autograd.gradcheck(
        lambda x: kd_loss(x, t, mask, labels, temperature=1.5, alpha=0.4)[0], (s,))


def test_kd_loss_chunking_does_not_change_the_result(monkeypatch):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 7, 11, generator=g), torch.randn(3, 7, 11, generator=g)
    labels, mask = torch.randint(0, 11, (3, 7), generator=g), torch.randint(0, 2, (3, 7), generator=g)
    whole, _ = kd_loss(s, t, mask, labels, temperature=2.0, alpha=0.5)
    monkeypatch.setattr(losses, "CHUNK_ROWS", 3)
    chunked, _ = kd_loss(s, t, mask, labels, temperature=2.0, alpha=0.5)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)


def test_kd_loss_limits():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 5, 9, generator=g), torch.randn(2, 5, 9, generator=g)
    labels, mask = torch.randint(0, 9, (2, 5), generator=g), torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]])
    keep = mask.bool()

    pure_kd, parts = kd_loss(s, t, mask, labels, temperature=3.0, alpha=1.0)
    ref_kl = F.kl_div(F.log_softmax(s[keep] / 3, -1), F.log_softmax(t[keep] / 3, -1), log_target=True,
                      reduction="batchmean")
    assert pure_kd.item() == pytest.approx(9.0 * ref_kl.item(), rel=1e-5)

    pure_ce, _ = kd_loss(s, t, mask, labels, temperature=3.0, alpha=0.0)
    assert pure_ce.item() == pytest.approx(F.cross_entropy(s[keep], labels[keep]).item(), rel=1e-6)

    same, parts = kd_loss(s, s.clone(), mask, labels, temperature=3.0, alpha=0.5)
    assert parts["soft"].item() == pytest.approx(0.0, abs=1e-6)

    nothing, _ = kd_loss(s.requires_grad_(), t, torch.zeros_like(mask), labels, temperature=2.0, alpha=0.5)
    nothing.backward()
    assert nothing.item() == 0.0 and torch.all(s.grad == 0)


# ---------------------------------------------------------------- fake-quant switch

def test_fake_quant_parametrization_keeps_ties_and_is_removable(test_format):
    model = tiny_llama(3, layers=1, hidden=64)
    embed = model.model.embed_tokens.weight
    keys = list(model.state_dict())
    x = torch.randint(0, VOCAB, (2, 9))
    float_logits = model(x).logits

    qat.enable_fake_quant(model, test_format)
    assert qat.fake_quant_spec(model).fmt == test_format
    master = model.model.embed_tokens.parametrizations.weight.original
    assert master is embed and model.lm_head.parametrizations.weight.original is embed
    parametrized = sum(torch.nn.utils.parametrize.is_parametrized(m) for m in model.modules())
    assert parametrized == 7 + 1 + 1  # q k v o gate up down, embedding, lm_head
    quant_logits = model(x).logits
    assert not torch.allclose(quant_logits, float_logits)
    quant_logits.sum().backward()  # straight-through: the float master gets a gradient
    assert embed.grad is not None and embed.grad.abs().sum() > 0

    reference = qat.fake_quant_model_copy(model, test_format)
    assert torch.allclose(reference(x).logits, quant_logits, atol=1e-5)
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in reference.modules())
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    assert qat.fake_quant_spec(model).fmt == test_format  # the copy left the original as it was

    qat.disable_fake_quant(model)
    assert list(model.state_dict()) == keys
    assert model.model.embed_tokens.weight is embed and model.lm_head.weight is embed
    assert torch.equal(model(x).logits, float_logits)


def test_unknown_fake_quant_format_is_a_user_error():
    with pytest.raises(UserError):
        qat.enable_fake_quant(tiny_llama(0, layers=1, hidden=32), "gguf-q3_k")
    with pytest.raises(UserError, match="6-bit"):
        qat.enable_fake_quant(tiny_llama(0, layers=1, hidden=32), "gguf-q4_0", {"embed": 6})


@pytest.mark.parametrize("tied", [True, False])
def test_group_bits_give_the_embedding_and_lm_head_their_own_format(tied):
    model = tiny_llama(3, layers=1, hidden=64, tied=tied)
    x = torch.randint(0, VOCAB, (2, 9))
    qat.enable_fake_quant(model, "gguf-q4_0", {"embed": 8})
    formats = {name: m.parametrizations.weight[0].scheme.fmt for name, m in model.named_modules()
               if torch.nn.utils.parametrize.is_parametrized(m)}
    assert formats.pop("model.embed_tokens") == formats.pop("lm_head") == "gguf-q8_0"
    assert len(formats) == 7 and set(formats.values()) == {"gguf-q4_0"}
    assert qat.fake_quant_spec(model) == qat.QuantSpec("gguf-q4_0", {"embed": 8})
    with torch.no_grad():
        mixed_logits = model(x).logits

    # the copy the verify stage compares artifacts with computes what the mixed training model does,
    # and differs from the all-Q4_0 copy
    with torch.no_grad():
        copy_logits = qat.fake_quant_model_copy(model, "gguf-q4_0", {"embed": 8})(x).logits
        plain_logits = qat.fake_quant_model_copy(model, "gguf-q4_0")(x).logits
    assert torch.allclose(copy_logits, mixed_logits, atol=1e-5)
    assert not torch.allclose(plain_logits, mixed_logits, atol=1e-3)
    assert qat.fake_quant_spec(model).group_bits == {"embed": 8}  # the copies left the setting as it was


# ---------------------------------------------------------------- trainer

def test_pack_rows_keeps_mask_aligned_with_labels():
    # Tokens >= 100 are exactly the answer tokens, so the label mask must equal (label >= 100).
    g = torch.Generator().manual_seed(5)
    examples = []
    for _ in range(7):
        prompt, answer = torch.randint(0, 100, (5,), generator=g), torch.randint(100, 200, (4,), generator=g)
        examples.append({"input_ids": prompt.tolist() + answer.tolist(), "loss_mask": [0] * 5 + [1] * 4})
    inputs, labels, mask, positions = pack_rows(examples, seq_len=16, rows=12, seed=0)  # 12 rows > one epoch
    assert inputs.shape == labels.shape == mask.shape == positions.shape == (12, 16)
    # every 9-token example counts its own positions 0..8, across row cuts too
    assert torch.equal(positions.flatten(), torch.arange(12 * 16) % 9)
    assert torch.equal(mask.bool(), labels >= 100)
    assert torch.equal(inputs[:, 1:], labels[:, :-1])
    assert torch.equal(inputs[1:, 0], labels[:-1, -1])  # rows continue the stream without a gap
    assert torch.equal(pack_rows(examples, 16, 12, seed=0)[0], inputs)
    assert not torch.equal(pack_rows(examples, 16, 12, seed=1)[0], inputs)


def test_packed_rows_keep_attention_inside_each_example(teacher):
    # Each example's logits in a packed row equal its logits when run alone: no attention across the
    # boundary, and its positions start from 0 as at inference.
    examples = random_examples(6, seed=11)
    inputs, _, _, positions = pack_rows(examples, seq_len=96, rows=1, seed=0)
    with torch.no_grad():
        # use_cache=False as in training: transformers reads boundaries from positions only without a cache
        packed = teacher(input_ids=inputs, position_ids=positions, use_cache=False).logits[0]
        unbounded = teacher(input_ids=inputs, use_cache=False).logits[0]
    starts = (positions[0] == 0).nonzero().flatten().tolist()
    assert len(starts) >= 3
    for a, b in zip(starts, starts[1:]):
        with torch.no_grad():
            alone = teacher(input_ids=inputs[:, a:b]).logits[0]
        assert torch.allclose(packed[a:b], alone, atol=1e-5)
    a, b = starts[1], starts[2]
    assert not torch.allclose(unbounded[a:b], packed[a:b], atol=1e-3)  # the check above can fail


def test_lr_schedule():
    cfg = TrainConfig(steps=100, batch_size=1, seq_len=8, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    assert all(lr_at(i, cfg) >= lr_at(i + 1, cfg) for i in range(10, 100))


# The data are random tokens, not the teacher's answers, so hard-label CE would pull the student
# away from the teacher: the quality check trains on the teacher's distribution alone (alpha=1).
TRAIN = dict(steps=30, batch_size=4, seq_len=48, lr=1e-2, alpha=1.0, warmup_steps=3, checkpoint_every=10)
RESUME = dict(steps=12, batch_size=4, seq_len=48, lr=3e-3, alpha=0.7, warmup_steps=3, checkpoint_every=4)


@pytest.fixture(scope="module")
def distilled(teacher, train_examples, tmp_path_factory):
    student = tiny_llama(1, layers=1, hidden=32)
    result = distill(student, teacher, train_examples, TrainConfig(**TRAIN), tmp_path_factory.mktemp("run"),
                     progress=False)
    return student, result


def test_distill_lowers_the_loss(distilled):
    student, result = distilled
    curve = result["loss_curve"]
    assert result["steps"] == 30 and len(curve) == 30 and result["resumed_from"] == 0
    assert result["tokens"] == 30 * 4 * 48 and result["tokens_per_s"] > 0
    assert sum(curve[-5:]) / 5 < 0.95 * sum(curve[:5]) / 5
    assert result["final_loss"] == curve[-1]
    assert not student.training
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in student.modules())


def test_resume_matches_an_uninterrupted_run_with_qat(teacher, train_examples, tmp_path, test_format):
    cfg = TrainConfig(**RESUME, qat=qat.QuantSpec(test_format), qat_start_step=5)
    straight = tiny_llama(1, layers=1, hidden=32)
    full = distill(straight, teacher, train_examples, cfg, tmp_path / "a", progress=False)

    # Killed after step 10: the last checkpoint is step 8 (fake-quant already on), 9-10 are redone.
    interrupted = tiny_llama(1, layers=1, hidden=32)
    first = distill(interrupted, teacher, train_examples, cfg, tmp_path / "b", progress=False, stop_after=10)
    assert first["steps"] == 10
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["ckpt"]
    resumed = tiny_llama(1, layers=1, hidden=32)
    second = distill(resumed, teacher, train_examples, cfg, tmp_path / "b", progress=False, resume=True)
    assert second["resumed_from"] == 8 and second["steps"] == 12
    assert second["loss_curve"] == full["loss_curve"]

    a, b = straight.state_dict(), resumed.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.lm_head.weight is resumed.model.embed_tokens.weight

    # A finished run resumes to its end without training; a changed config starts over.
    again = distill(tiny_llama(1, layers=1, hidden=32), teacher, train_examples, cfg, tmp_path / "b",
                    progress=False, resume=True)
    assert again["resumed_from"] == 12
    changed = TrainConfig(**{**RESUME, "steps": 5})
    other = distill(tiny_llama(1, layers=1, hidden=32), teacher, train_examples, changed, tmp_path / "b",
                    progress=False, resume=True)
    assert other["resumed_from"] == 0 and other["steps"] == 5


def test_resume_keeps_the_qat_spec(teacher, train_examples, tmp_path):
    spec = qat.QuantSpec("gguf-q4_0", {"embed": 8}, act=True)
    cfg = TrainConfig(**RESUME, qat=spec, qat_start_step=5)
    full = distill(tiny_llama(1, layers=1, hidden=32), teacher, train_examples, cfg, tmp_path / "a", progress=False)
    # the group bits matter: without them training takes another path
    plain = distill(tiny_llama(1, layers=1, hidden=32), teacher, train_examples,
                    TrainConfig(**RESUME, qat=qat.QuantSpec("gguf-q4_0"), qat_start_step=5), tmp_path / "p",
                    progress=False)
    assert plain["loss_curve"][:5] == full["loss_curve"][:5] and plain["loss_curve"] != full["loss_curve"]

    distill(tiny_llama(1, layers=1, hidden=32), teacher, train_examples, cfg, tmp_path / "b", progress=False,
            stop_after=10)
    meta = json.loads((tmp_path / "b" / "ckpt" / "meta.json").read_text())
    assert qat.QuantSpec.from_dict(meta["state"]["qat"]) == spec and meta["state"]["step"] == 8
    resumed = distill(tiny_llama(1, layers=1, hidden=32), teacher, train_examples, cfg, tmp_path / "b",
                      progress=False, resume=True)
    assert resumed["resumed_from"] == 8 and resumed["loss_curve"] == full["loss_curve"]


# ---------------------------------------------------------------- quality

def test_teacher_against_itself(teacher, heldout_examples):
    answers = sum(sum(ex["loss_mask"][1:]) for ex in heldout_examples)
    for top_k in (None, 16):
        got = evaluate(teacher, teacher, heldout_examples, batch_size=5, top_k=top_k)
        assert got["tokens"] == answers
        assert got["top1_agreement"] == 1.0
        assert got["kl"] == pytest.approx(0.0, abs=1e-6)

    # The same model behind a per-sequence callable (as a runtime would be) scores the same.
    as_callable = lambda ids: teacher(input_ids=torch.tensor([ids])).logits[0]  # noqa: E731
    got = evaluate(as_callable, teacher_targets(teacher, heldout_examples, top_k=None), heldout_examples)
    assert got["top1_agreement"] == 1.0 and got["kl"] == pytest.approx(0.0, abs=1e-5)


def test_perplexity_is_exp_of_answer_cross_entropy(teacher, heldout_examples):
    ex = heldout_examples[0]
    ids, mask = torch.tensor([ex["input_ids"]]), torch.tensor(ex["loss_mask"])
    with torch.no_grad():
        logits = teacher(input_ids=ids).logits[0, :-1]
    keep = mask[1:].bool()
    ce = F.cross_entropy(logits[keep], ids[0, 1:][keep])
    got = evaluate(teacher, teacher, [ex])
    assert got["perplexity"] == pytest.approx(math.exp(ce.item()), rel=1e-4)


def test_topk_kl_is_a_lower_bound_of_the_full_kl(teacher, heldout_examples):
    other = tiny_llama(9, layers=1, hidden=32)
    full = evaluate(other, teacher, heldout_examples, top_k=None)["kl"]
    assert 0 < evaluate(other, teacher, heldout_examples, top_k=8)["kl"] <= full + 1e-9


def test_distilled_student_is_closer_to_the_teacher(teacher, heldout_examples, distilled):
    student, _ = distilled
    targets = teacher_targets(teacher, heldout_examples)
    before = evaluate(tiny_llama(1, layers=1, hidden=32), targets, heldout_examples)
    after = evaluate(student, targets, heldout_examples)
    assert after["kl"] < before["kl"]
    assert after["tokens"] == before["tokens"] > 0
