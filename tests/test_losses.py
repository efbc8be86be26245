"""Distillation losses: each one against a value computed by hand, a float64 gradient check, the
properties each promises, and a few training steps on the tiny teacher that lower it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_llama

from edgedistill.distill import losses
from edgedistill.distill.losses import (
    HiddenProjection,
    LossSpec,
    alpha_at,
    attention_transfer,
    collapse_to_buckets,
    divergence,
    hidden_state_mse,
    kd_loss,
    kd_loss_from_hidden,
    kd_loss_top_k,
    kd_loss_top_k_from_hidden,
    teacher_top_k,
)

# ---------------------------------------------------------------- plain-math references


def softmax(z, tau=1.0):
    e = [math.exp(x / tau) for x in z]
    return [x / sum(e) for x in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def cross_entropy(z, label):
    return math.log(sum(math.exp(x) for x in z)) - z[label]


# Two supervised positions and a prompt position that must not count (the existing KD test's data).
S = [[1.0, 2.0, 0.5], [0.3, -1.0, 2.0], [9.0, 9.0, 9.0]]
T = [[2.0, 0.0, 1.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]]
LABELS, MASK = [1, 2, 0], [1, 1, 0]


def batch(dtype=torch.float32):
    return (torch.tensor([S], dtype=dtype), torch.tensor([T], dtype=dtype), torch.tensor([MASK]),
            torch.tensor([LABELS]))


def hand_loss(divergence_of, tau, alpha, weights=(1.0, 1.0)):
    """alpha tau^2 mean_i w_i D(p_i, q_i) + (1 - alpha) mean_i CE_i over the two supervised positions."""
    soft = sum(w * divergence_of(softmax(T[i], tau), softmax(S[i], tau)) for i, w in zip(range(2), weights)) / 2
    ce = sum(cross_entropy(S[i], LABELS[i]) for i in range(2)) / 2
    return alpha * tau**2 * soft + (1 - alpha) * ce, soft, ce


def random_batch(seed, b=2, length=5, vocab=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, length, vocab, dtype=dtype, generator=g) * 2
    t = torch.randn(b, length, vocab, dtype=dtype, generator=g) * 2
    labels = torch.randint(0, vocab, (b, length), generator=g)
    mask = torch.randint(0, 2, (b, length), generator=g)
    mask[0, 0] = 1  # at least one supervised position
    return s, t, mask, labels


# ---------------------------------------------------------------- soft-target divergences


def test_forward_kl_matches_hand_computation():
    want, soft, ce = hand_loss(kl, tau=2.0, alpha=0.7)
    loss, parts = kd_loss(*batch(), temperature=2.0, alpha=0.7, objective="forward_kl")
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert parts["soft"].item() == pytest.approx(soft, rel=1e-6) and parts["ce"].item() == pytest.approx(ce, rel=1e-6)


def test_reverse_kl_matches_hand_computation():
    want, soft, _ = hand_loss(lambda p, q: kl(q, p), tau=2.0, alpha=0.6)
    loss, parts = kd_loss(*batch(), temperature=2.0, alpha=0.6, objective="reverse_kl")
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert parts["soft"].item() == pytest.approx(soft, rel=1e-6)


def test_jsd_matches_hand_computation():
    beta = 0.3

    def jsd(p, q):
        m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
        return beta * kl(p, m) + (1 - beta) * kl(q, m)

    want, soft, _ = hand_loss(jsd, tau=1.5, alpha=0.8)
    loss, parts = kd_loss(*batch(), temperature=1.5, alpha=0.8, objective="jsd", beta=beta)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert parts["soft"].item() == pytest.approx(soft, rel=1e-6)


def test_jsd_endpoints_are_the_kls_and_its_limits_approach_them():
    s, t, mask, labels = random_batch(0)
    for beta, objective in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd, _ = kd_loss(s, t, mask, labels, temperature=2.0, alpha=0.5, objective="jsd", beta=beta)
        exact, _ = kd_loss(s, t, mask, labels, temperature=2.0, alpha=0.5, objective=objective)
        assert torch.equal(jsd, exact)

    # Near the ends, JSD(beta) ~ beta KL(P||Q) and ~ (1 - beta) KL(Q||P): the same directions.
    log_p, log_q = F.log_softmax(t[0], -1), F.log_softmax(s[0], -1)
    eps = 1e-8  # the next terms are O(eps^2) chi-square sized; float64 cancellation is O(1e-16 / eps)
    assert torch.allclose(divergence(log_p, log_q, "jsd", eps) / eps, divergence(log_p, log_q, "forward_kl"), rtol=1e-4)
    assert torch.allclose(divergence(log_p, log_q, "jsd", 1 - eps) / eps, divergence(log_p, log_q, "reverse_kl"),
                          rtol=1e-4)


def test_divergences_are_zero_only_at_equality():
    s, t, mask, labels = random_batch(1)
    for objective in losses.OBJECTIVES:
        _, same = kd_loss(s, s.clone(), mask, labels, temperature=2.0, alpha=1.0, objective=objective)
        _, other = kd_loss(s, t, mask, labels, temperature=2.0, alpha=1.0, objective=objective)
        assert same["soft"].item() == pytest.approx(0.0, abs=1e-12) and other["soft"].item() > 0


@pytest.mark.parametrize("objective", losses.OBJECTIVES)
@pytest.mark.parametrize("top_k", [0, 3])
@pytest.mark.parametrize("confidence", [False, True])
def test_logit_loss_gradcheck_float64_across_chunks(monkeypatch, objective, top_k, confidence):
    monkeypatch.setattr(losses, "CHUNK_ROWS", 2)  # several checkpointed chunks, the last one short
    s, t, mask, labels = random_batch(2, vocab=5)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: kd_loss(x, t, mask, labels, temperature=1.5, alpha=0.4, objective=objective, beta=0.3,
                          top_k=top_k, confidence_weighting=confidence)[0], (s,))


@pytest.mark.parametrize("objective", losses.OBJECTIVES)
@pytest.mark.parametrize("top_k", [0, 3])
@pytest.mark.parametrize("confidence", [False, True])
def test_chunking_does_not_change_the_result(monkeypatch, objective, top_k, confidence):
    s, t, mask, labels = random_batch(3, b=3, length=7, vocab=11)
    settings = dict(temperature=2.0, alpha=0.5, objective=objective, beta=0.3, top_k=top_k,
                    confidence_weighting=confidence)
    whole, _ = kd_loss(s, t, mask, labels, **settings)
    monkeypatch.setattr(losses, "CHUNK_ROWS", 3)
    chunked, _ = kd_loss(s, t, mask, labels, **settings)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-12)


def test_all_masked_batch_gives_zero_loss_and_zero_gradient():
    s, t, mask, labels = random_batch(4)
    s.requires_grad_(True)
    for objective in losses.OBJECTIVES:
        loss, _ = kd_loss(s, t, torch.zeros_like(mask), labels, temperature=2.0, alpha=0.5, objective=objective,
                          top_k=3, confidence_weighting=True)
        loss.backward()
        assert loss.item() == 0.0 and torch.all(s.grad == 0)


# ---------------------------------------------------------------- alpha schedule


def test_alpha_schedule_values():
    assert [alpha_at(i, 11, 0.9, 0.1, "constant") for i in (0, 5, 10)] == [0.9, 0.9, 0.9]
    assert [alpha_at(i, 11, 0.9, 0.1, "linear") for i in (0, 5, 10)] == pytest.approx([0.9, 0.5, 0.1])
    assert alpha_at(2, 11, 0.9, 0.1, "linear") == pytest.approx(0.9 - 0.8 * 0.2)
    cosine = [alpha_at(i, 11, 0.9, 0.1, "cosine") for i in range(11)]
    assert cosine[0] == pytest.approx(0.9) and cosine[5] == pytest.approx(0.5) and cosine[10] == pytest.approx(0.1)
    assert cosine[2] == pytest.approx(0.1 + 0.8 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))  # monotone toward the hard labels
    assert alpha_at(0, 1, 0.9, 0.1, "linear") == 0.9  # a one-step run stays at the start


# ---------------------------------------------------------------- confidence weighting


def test_confidence_weighting_matches_hand_computation():
    tau = 2.0
    # the teacher's top-token probability at temperature 1 (its confidence), whatever tau the loss uses
    conf = [max(softmax(T[i])) for i in range(2)]
    weights = [c / (sum(conf) / 2) for c in conf]
    assert sum(weights) / 2 == pytest.approx(1.0)  # mean 1: the loss keeps its scale
    want, soft, _ = hand_loss(kl, tau=tau, alpha=0.7, weights=weights)
    loss, parts = kd_loss(*batch(), temperature=tau, alpha=0.7, confidence_weighting=True)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert parts["soft"].item() == pytest.approx(soft, rel=1e-6)

    # weights that are all equal change nothing
    flat = torch.zeros(1, 3, 3)
    s, _, mask, labels = batch()
    assert kd_loss(s, flat, mask, labels, temperature=tau, alpha=0.7, confidence_weighting=True)[0].item() == \
        pytest.approx(kd_loss(s, flat, mask, labels, temperature=tau, alpha=0.7)[0].item(), rel=1e-6)


def test_confidence_weights_divide_by_a_given_mean_and_every_loss_asks_for_it():
    """A multi-process run divides by the mean over every process's positions (the trainer's
    shared_confidence_mean). Each loss asks for it once, an all-masked batch too: it is a collective."""
    tau, shared = 2.0, 0.9
    conf = [max(softmax(T[i])) for i in range(2)]
    want, soft, _ = hand_loss(kl, tau=tau, alpha=0.7, weights=[c / shared for c in conf])
    asked = []

    def mean(c):
        asked.append(c.tolist())
        return torch.tensor(shared)

    loss, parts = kd_loss(*batch(), temperature=tau, alpha=0.7, confidence_weighting=True, confidence_mean=mean)
    assert loss.item() == pytest.approx(want, rel=1e-6) and parts["soft"].item() == pytest.approx(soft, rel=1e-6)
    assert asked == [pytest.approx(conf, rel=1e-6)]

    s, t, mask, labels = batch()
    s.requires_grad_()
    hidden, head = torch.randn(1, 3, 4, requires_grad=True), torch.randn(3, 4)
    none = torch.zeros_like(mask)
    top = torch.zeros(1, 3, 2, dtype=torch.long), torch.full((1, 3, 2), -2.0), torch.full((1, 3), -0.5)
    asked.clear()
    for run in (lambda m: kd_loss(s, t, m, labels, temperature=tau, alpha=0.7, confidence_weighting=True,
                                  confidence_mean=mean),
                lambda m: kd_loss_top_k(s, *top, m, labels, temperature=tau, alpha=0.7, confidence_weighting=True,
                                        confidence_mean=mean),
                lambda m: kd_loss_from_hidden(hidden, head, t, m, labels, temperature=tau, alpha=0.7, top_k=2,
                                              confidence_weighting=True, confidence_mean=mean),
                lambda m: kd_loss_top_k_from_hidden(hidden, head, *top, m, labels, temperature=tau, alpha=0.7,
                                                    confidence_weighting=True, confidence_mean=mean)):
        loss, _ = run(none)
        loss.backward()
    assert asked == [[]] * 4  # no supervised rows here, but the other processes' call is answered


def test_confidence_weights_favour_confident_positions():
    # the student is wrong by the same amount at both positions; the teacher is sure only at the first
    t = torch.tensor([[[8.0, 0.0, 0.0], [0.1, 0.0, 0.0]]])
    s = torch.tensor([[[0.0, 8.0, 0.0], [0.0, 0.1, 0.0]]])
    mask, labels = torch.ones(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)
    _, plain = kd_loss(s, t, mask, labels, temperature=1.0, alpha=1.0)
    _, weighted = kd_loss(s, t, mask, labels, temperature=1.0, alpha=1.0, confidence_weighting=True)
    assert weighted["soft"] > plain["soft"]  # the confident position, which has the larger KL, counts more


# ---------------------------------------------------------------- top-k with a tail bucket


def test_top_k_kl_matches_hand_computation():
    t, s = [3.0, 1.0, 0.0, -1.0], [1.0, 2.0, 0.5, 0.0]
    p, q = softmax(t), softmax(s)
    buckets_p, buckets_q = [p[0], p[1], p[2] + p[3]], [q[0], q[1], q[2] + q[3]]
    want = kl(buckets_p, buckets_q)
    one = torch.ones(1, 1, dtype=torch.long)
    args = (torch.tensor([[s]]), torch.tensor([[t]]), one, 0 * one)
    loss, parts = kd_loss(*args, temperature=1.0, alpha=1.0, top_k=2)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    # the same from a cache holding the teacher's top-2 ids, their log-probabilities and the tail's
    cached, _ = kd_loss_top_k(args[0], torch.tensor([[[0, 1]]]), torch.tensor([[[math.log(p[0]), math.log(p[1])]]]),
                              torch.tensor([[math.log(p[2] + p[3])]]), args[2], args[3], temperature=1.0, alpha=1.0)
    assert cached.item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("objective", losses.OBJECTIVES)
def test_top_k_with_k_equal_to_the_vocabulary_is_the_full_divergence(objective):
    s, t, mask, labels = random_batch(5, vocab=6)
    full, _ = kd_loss(s, t, mask, labels, temperature=2.0, alpha=0.6, objective=objective, beta=0.3)
    for k in (6, 50):  # k above the vocabulary means the whole vocabulary
        top, _ = kd_loss(s, t, mask, labels, temperature=2.0, alpha=0.6, objective=objective, beta=0.3, top_k=k)
        assert top.item() == pytest.approx(full.item(), rel=1e-12)


@pytest.mark.parametrize("objective", losses.OBJECTIVES)
def test_top_k_divergence_is_nonnegative_and_zero_exactly_when_buckets_agree(objective):
    g = torch.Generator().manual_seed(6)
    t = torch.randn(64, 9, dtype=torch.float64, generator=g) * 3
    log_p_full = F.log_softmax(t, -1)
    idx, log_p = teacher_top_k(log_p_full, 3)
    for _ in range(5):
        s = torch.randn(64, 9, dtype=torch.float64, generator=g) * 3
        d = divergence(log_p, collapse_to_buckets(F.log_softmax(s, -1), idx), objective, 0.3)
        assert torch.all(d > 0)
    # a student that moves mass around inside the tail, but keeps every bucket's total, is at 0
    tail = torch.ones_like(log_p_full, dtype=torch.bool).scatter(-1, idx, False)
    shuffled = log_p_full.clone()
    for row in range(len(t)):
        rest = shuffled[row, tail[row]]
        shuffled[row, tail[row]] = rest.flip(0)
    assert not torch.allclose(shuffled, log_p_full)
    d = divergence(log_p, collapse_to_buckets(shuffled, idx), objective, 0.3)
    assert torch.allclose(d, torch.zeros_like(d), atol=1e-12)


def test_top_k_buckets_hold_all_the_mass_and_an_empty_tail_is_safe():
    g = torch.Generator().manual_seed(7)
    log_p = F.log_softmax(torch.randn(4, 8, dtype=torch.float64, generator=g), -1)
    for k in (1, 3, 8):
        _, buckets = teacher_top_k(log_p, k)
        assert buckets.shape == (4, k + 1)
        assert torch.allclose(buckets.exp().sum(-1), torch.ones(4, dtype=torch.float64))
    _, buckets = teacher_top_k(log_p, 8)
    assert torch.all(buckets[:, -1] == -math.inf)  # nothing left in the tail, no NaN


@pytest.mark.parametrize("objective", losses.OBJECTIVES)
def test_cached_top_k_matches_the_online_teacher_and_passes_gradcheck(monkeypatch, objective):
    monkeypatch.setattr(losses, "CHUNK_ROWS", 2)
    s, t, mask, labels = random_batch(8, vocab=6)
    tau, k = 1.5, 3
    # what a logit cache holds: at the training temperature, top-k log-probs and the tail's log-mass
    log_p = F.log_softmax(t / tau, -1)
    top = log_p.topk(k, dim=-1)
    rest = log_p.scatter(-1, top.indices, -math.inf).logsumexp(-1)
    settings = dict(temperature=tau, alpha=0.6, objective=objective, beta=0.3)
    cached, _ = kd_loss_top_k(s, top.indices, top.values, rest, mask, labels, **settings)
    online, _ = kd_loss(s, t, mask, labels, top_k=k, **settings)
    assert cached.item() == pytest.approx(online.item(), rel=1e-12)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: kd_loss_top_k(x, top.indices, top.values, rest, mask, labels, **settings)[0], (s,))


# ---------------------------------------------------------------- hidden states


def test_hidden_state_mse_matches_hand_computation():
    proj = HiddenProjection(2, student_hidden=2, teacher_hidden=3)
    with torch.no_grad():
        proj.layers[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))  # h -> (h1, h2, h1 + h2)
        proj.layers[1].weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 1.0]]))
    h_s = [torch.tensor([[[1.0, 2.0], [0.0, -1.0]]]), torch.tensor([[[1.0, 1.0], [2.0, 0.0]]])]
    h_t = [torch.tensor([[[1.0, 1.0, 3.0], [1.0, -1.0, 0.0]]]),
           torch.tensor([[[2.0, 0.0, 1.0], [4.0, 0.0, 0.0]]])]  # exactly the second projection's output
    # layer 0: projected (1, 2, 3), (0, -1, -1); squared errors 0 1 0 and 1 0 1 -> mean 3/6;
    # teacher mean square (1 + 1 + 9 + 1 + 1 + 0)/6 -> term (3/6)/(13/6) = 3/13. Layer 1: 0.
    got = hidden_state_mse(proj(h_s), h_t)
    assert got.item() == pytest.approx((3 / 13 + 0) / 2, rel=1e-6)


def test_hidden_state_mse_gradcheck_float64():
    g = torch.Generator().manual_seed(9)
    h_s = torch.randn(2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    h_t = torch.randn(2, 3, 5, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda h, w: hidden_state_mse([F.linear(h, w)], [h_t]), (h_s, w))


def test_hidden_projection_is_seeded_apart_from_the_global_rng():
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    a = HiddenProjection(2, 4, 6, seed=3)
    after = torch.rand(1)
    assert torch.equal(before, after)  # creating it consumed none of the run's randomness
    assert torch.equal(a.layers[1].weight, HiddenProjection(2, 4, 6, seed=3).layers[1].weight)


# ---------------------------------------------------------------- attention maps


def test_attention_transfer_matches_hand_computation():
    # causal maps, one query row each of length 1 and 2; the teacher's two heads average into the student's one
    teacher = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]], [[1.0, 0.0], [0.9, 0.1]]]])  # [B=1, H=2, L=2, L=2]
    student = torch.tensor([[[[1.0, 0.0], [0.6, 0.4]]]])  # [1, 1, 2, 2]; teacher's average row 1: (0.7, 0.3)
    want_kl = (0.0 + 0.7 * math.log(0.7 / 0.6) + 0.3 * math.log(0.3 / 0.4)) / 2  # mean over the 2 query rows
    want_mse = (0.0 + 0.1**2 + 0.1**2) / 2  # squared error summed over keys, mean over rows
    assert attention_transfer([student], [teacher], "kl").item() == pytest.approx(want_kl, rel=1e-5)
    assert attention_transfer([student], [teacher], "mse").item() == pytest.approx(want_mse, rel=1e-5)

    # 3 teacher heads against 2 student heads do not group: both sides are compared head-averaged
    teacher3 = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]], [[1.0, 0.0], [0.8, 0.2]], [[1.0, 0.0], [0.2, 0.8]]]])
    student2 = torch.tensor([[[[1.0, 0.0], [0.6, 0.4]], [[1.0, 0.0], [0.2, 0.8]]]])  # average row 1: (0.4, 0.6)
    assert attention_transfer([student2], [teacher3], "mse").item() == pytest.approx((0.1**2 + 0.1**2) / 2, rel=1e-5)
    want = (0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.6)) / 2
    assert attention_transfer([student2], [teacher3], "kl").item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kind", losses.ATTENTION_KINDS)
def test_attention_transfer_gradcheck_float64(kind):
    g = torch.Generator().manual_seed(10)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    scores = torch.randn(1, 2, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    teacher = torch.randn(1, 4, 4, 4, dtype=torch.float64, generator=g).masked_fill(~causal, -math.inf).softmax(-1)
    assert torch.autograd.gradcheck(
        lambda x: attention_transfer([x.masked_fill(~causal, -math.inf).softmax(-1)], [teacher], kind), (scores,))


# ---------------------------------------------------------------- in the training loop, on the tiny teacher


@pytest.fixture(scope="module")
def tiny_pair(tiny_teacher_dir, tokenizer_dir, tmp_path_factory):
    """The tiny teacher (4 layers, width 64, 4 heads) and a smaller student (2 layers, width 32, 2 heads),
    so the projections and the head grouping have something to do."""
    from transformers import AutoModelForCausalLM

    student_dir = make_tiny_llama(tmp_path_factory.mktemp("student"), tokenizer_dir, layers=2, hidden=32,
                                  intermediate=64, heads=2, kv_heads=1, seed=1)
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # noqa: E731
    teacher = load(tiny_teacher_dir)
    with torch.no_grad():  # a random init predicts nearly uniformly; sharper logits give KD something to learn
        teacher.model.norm.weight.mul_(8.0)
    return teacher, lambda: load(student_dir)


SEQ_LEN = 24


@pytest.fixture(scope="module")
def few_examples(tiny_pair):
    """One example exactly a row long: every row, so every step, sees the same tokens, and a few
    steps show progress rather than the noise between batches."""
    teacher, _ = tiny_pair
    ids = torch.randint(0, teacher.config.vocab_size, (SEQ_LEN,), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": ids.tolist(), "loss_mask": [0] * 8 + [1] * (SEQ_LEN - 8)}]


def short_run(**overrides):
    from edgedistill.distill.trainer import TrainConfig

    settings = dict(steps=6, batch_size=1, seq_len=SEQ_LEN, lr=1e-2, warmup_steps=1, alpha=1.0, checkpoint_every=100)
    return TrainConfig(**{**settings, **overrides})


def early_and_late(curve):
    return sum(curve[:2]) / 2, sum(curve[-2:]) / 2


@pytest.mark.parametrize("spec, part", [
    (LossSpec(objective="reverse_kl"), "soft"),
    (LossSpec(objective="jsd", jsd_beta=0.3), "soft"),
    (LossSpec(top_k=16), "soft"),
    (LossSpec(confidence_weighting=True), "soft"),
    (LossSpec(hidden_weight=1.0), "hidden"),
    (LossSpec(attention_weight=100.0, attention_kind="mse"), "attention"),
    (LossSpec(attention_weight=100.0, attention_kind="kl"), "attention"),
], ids=["reverse_kl", "jsd", "top_k", "confidence", "hidden_mse", "attention_mse", "attention_kl"])
def test_a_few_steps_lower_each_objective(tiny_pair, few_examples, tmp_path, spec, part):
    from edgedistill.distill.trainer import distill

    teacher, new_student = tiny_pair
    result = distill(new_student(), teacher, few_examples, short_run(loss=spec), tmp_path, progress=False)
    early, late = early_and_late(result["loss_parts"][part])
    assert late < 0.9 * early, result["loss_parts"][part]
    assert teacher.config._attn_implementation == "sdpa"  # the eager switch for attention maps is undone


def test_alpha_schedule_moves_the_loss_to_the_hard_labels(tiny_pair, few_examples, tmp_path):
    from edgedistill.distill.trainer import distill

    teacher, new_student = tiny_pair
    spec = LossSpec(alpha_schedule="linear", alpha_end=0.0)
    result = distill(new_student(), teacher, few_examples, short_run(loss=spec), tmp_path, progress=False)
    ce, total = result["loss_parts"]["ce"], result["loss_curve"]
    assert total[-1] == pytest.approx(ce[-1], abs=1e-3)  # alpha = 0 at the last step: CE alone
    assert total[0] != pytest.approx(ce[0], abs=1e-3)  # alpha = 1 at the first: the soft term alone
    early, late = early_and_late(ce)
    assert late < early


def test_resume_with_a_hidden_projection_matches_an_uninterrupted_run(tiny_pair, few_examples, tmp_path):
    """The projections are in the optimizer and the checkpoints: a resumed run ends bit-identical."""
    from edgedistill.distill.trainer import distill

    teacher, new_student = tiny_pair
    cfg = short_run(loss=LossSpec(hidden_weight=1.0, attention_weight=1.0), layer_map=[0, 3], checkpoint_every=2)
    straight = new_student()
    full = distill(straight, teacher, few_examples, cfg, tmp_path / "a", progress=False)
    first = distill(new_student(), teacher, few_examples, cfg, tmp_path / "b", progress=False, stop_after=5)
    assert first["steps"] == 5
    assert (tmp_path / "b" / "ckpt" / "model_1.safetensors").is_file()  # the projection, beside the student
    resumed = new_student()
    second = distill(resumed, teacher, few_examples, cfg, tmp_path / "b", progress=False, resume=True)
    assert second["resumed_from"] == 4 and second["loss_curve"] == full["loss_curve"]
    assert second["loss_parts"]["hidden"] == full["loss_parts"]["hidden"]
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_layer_map_that_does_not_fit_is_refused(tiny_pair, few_examples, tmp_path):
    from edgedistill.distill.trainer import distill

    teacher, new_student = tiny_pair
    with pytest.raises(ValueError, match="layer map"):
        distill(new_student(), teacher, few_examples, short_run(loss=LossSpec(hidden_weight=1.0), layer_map=[0, 9]),
                tmp_path, progress=False)


# ---------------------------------------------------------------- config


def test_default_loss_section_leaves_the_config_hash_alone():
    from edgedistill.config import BuildConfig, dump_toml, resolve

    default = resolve({})
    assert "loss" not in default.model_dump(mode="json")["distill"]  # as before the section existed
    assert "[distill.loss]" not in dump_toml(default)
    jsd = resolve({"distill": {"loss": {"objective": "jsd", "jsd_beta": 0.25}}})
    assert jsd.model_dump(mode="json")["distill"]["loss"] == {"objective": "jsd", "jsd_beta": 0.25}
    assert jsd.section_hash("distill") != default.section_hash("distill")
    replayed = BuildConfig.model_validate(__import__("tomllib").loads(dump_toml(jsd).split("\n", 1)[1]))
    assert replayed == jsd


def test_train_config_carries_the_loss_section():
    from edgedistill.config import resolve
    from edgedistill.distill.stage import coach_layer_map, train_config

    cfg = resolve({"distill": {"loss": {"objective": "reverse_kl", "hidden_weight": 0.5}}})
    tc = train_config(cfg.distill, 10, None, 0, [0, 3])
    assert tc.loss == LossSpec(objective="reverse_kl", hidden_weight=0.5) and tc.layer_map == [0, 3]
    tc = train_config(cfg.distill, 10, None, 0, [0, 3], head_map=[[1], [0]], hidden_channels=[2, 5])
    assert tc.head_map == [[1], [0]] and tc.hidden_channels == [2, 5]
    # after a progressive init the student trains against the assistant: its layers, not the teacher's
    summary = {"layer_map": [0, 5, 11], "progressive": [{"layer_map": [0, 2, 5, 8, 11]}]}
    assert coach_layer_map(summary) == [0, 2, 4]
    assert coach_layer_map({"layer_map": [0, 5, 11], "progressive": []}) == [0, 5, 11]


# ---------------------------------------------------------------- zero teacher mass, empty buckets

# The teacher gives no mass to token 2 (a -inf logit) at both supervised positions.
T_ZERO = [[2.0, 0.0, -math.inf], [0.0, 1.0, -math.inf], [0.0, 0.0, 0.0]]


def jsd_of(beta):
    def jsd(p, q):
        m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    return jsd


@pytest.mark.parametrize("objective", losses.OBJECTIVES)
def test_teacher_without_mass_somewhere_gives_finite_loss_and_gradient(objective):
    s = torch.tensor([S], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([T_ZERO], dtype=torch.float64)
    mask, labels = torch.tensor([MASK]), torch.tensor([LABELS])
    loss, parts = kd_loss(s, t, mask, labels, temperature=1.0, alpha=1.0, objective=objective, beta=0.3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    # descent takes the student's mass off the token the teacher never produces
    assert (s.grad[0, :2, 2] > 0).all()
    p = [softmax(T_ZERO[i][:2]) + [0.0] for i in range(2)]
    q = [softmax(S[i]) for i in range(2)]
    if objective == "reverse_kl":  # infinite in exact arithmetic: floored at the smallest normal float
        floor = -math.log(torch.finfo(torch.float64).tiny)
        want = sum(kl(q[i][:2], p[i][:2]) + q[i][2] * (math.log(q[i][2]) + floor) for i in range(2)) / 2
    else:
        d = kl if objective == "forward_kl" else jsd_of(0.3)
        want = sum(d(p[i], q[i]) for i in range(2)) / 2
    assert parts["soft"].item() == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("objective", losses.OBJECTIVES)
def test_cached_top_k_with_an_empty_teacher_tail_gives_finite_loss_and_gradient(objective):
    # the teacher's top-2 hold all its mass: the cached tail is log 0 = -inf, the student's is not
    s, _, mask, labels = batch(torch.float64)
    s.requires_grad_(True)
    idx = torch.tensor([[[0, 1]] * 3])
    top = torch.log(torch.tensor([[[0.7, 0.3]] * 3], dtype=torch.float64))
    tail = torch.full((1, 3), -math.inf, dtype=torch.float64)
    loss, parts = kd_loss_top_k(s, idx, top, tail, mask, labels, temperature=1.0, alpha=1.0, objective=objective,
                                beta=0.3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert (s.grad[0, :2, 2] > 0).all()  # the tail token's logit goes down
    if objective != "reverse_kl":
        d = kl if objective == "forward_kl" else jsd_of(0.3)
        want = sum(d([0.7, 0.3, 0.0], [(q := softmax(S[i]))[0], q[1], q[2]]) for i in range(2)) / 2
        assert parts["soft"].item() == pytest.approx(want, rel=1e-9)
    assert torch.autograd.gradcheck(
        lambda x: kd_loss_top_k(x, idx, top, tail, mask, labels, temperature=1.0, alpha=0.5, objective=objective,
                                beta=0.3)[0], (s.detach().requires_grad_(True),))


@pytest.mark.parametrize("objective", losses.OBJECTIVES)
@pytest.mark.parametrize("top_k", [5, 50])
def test_top_k_at_or_above_the_vocabulary_has_a_finite_gradient(monkeypatch, objective, top_k):
    # k >= V leaves both tail buckets empty (-inf on both sides): JSD's mixture must not give NaN there
    monkeypatch.setattr(losses, "CHUNK_ROWS", 2)
    s, t, mask, labels = random_batch(11, vocab=5)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: kd_loss(x, t, mask, labels, temperature=1.5, alpha=0.4, objective=objective, beta=0.3,
                          top_k=top_k)[0], (s,))


def test_loss_spec_refuses_out_of_range_values():
    for bad in (dict(alpha_end=1.5), dict(alpha_end=-0.1), dict(hidden_weight=-1.0), dict(attention_weight=math.nan),
                dict(top_k=-1), dict(jsd_beta=2.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LossSpec(**bad)


# ---------------------------------------------------------------- heads and projections from the cut


def test_attention_heads_follow_the_head_map_not_contiguous_groups():
    g = torch.Generator().manual_seed(12)
    causal = torch.ones(3, 3, dtype=torch.bool).tril()
    teacher = torch.randn(1, 4, 3, 3, generator=g).masked_fill(~causal, -math.inf).softmax(-1)
    # student head 0 was cut from teacher head 3, head 1 from teacher head 1 (as _head_groups keeps them)
    student = teacher[:, [3, 1]].clone()
    for kind in losses.ATTENTION_KINDS:
        assert attention_transfer([student], [teacher], kind, [[3, 1]]).item() == pytest.approx(0.0, abs=1e-7)
        assert attention_transfer([student], [teacher], kind).item() > 1e-3  # the grouped fallback differs
    with pytest.raises(ValueError, match="head map"):
        attention_transfer([student], [teacher], "mse", [[3, 4]])


def test_hidden_projection_starts_at_the_cut_channels():
    channels = [2, 0]
    proj = HiddenProjection(2, student_hidden=2, teacher_hidden=3, channels=channels)
    h = torch.tensor([[[5.0, 7.0]]])
    for out in proj([h, h]):  # student channel j lands on teacher channel channels[j], the rest at 0
        assert torch.equal(out, torch.tensor([[[7.0, 0.0, 5.0]]]))
    assert torch.equal(losses.selection_matrix(None, 4, 4), torch.eye(4))  # same width, nothing recorded
    assert losses.selection_matrix(None, 2, 3) is None
    random = HiddenProjection(1, 2, 3, seed=3)
    assert torch.equal(random.layers[0].weight, HiddenProjection(1, 2, 3, seed=3).layers[0].weight)
    assert not torch.equal(random.layers[0].weight, proj.layers[0].weight)
    with pytest.raises(ValueError, match="channel selection"):
        HiddenProjection(1, 2, 3, channels=[0, 3])


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state, fixed by the first Accelerator: a test that wants other
    settings (fp32 instead of the host's bf16) starts from a fresh one and leaves one behind for the next."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_clip_each_clips_models_apart_and_unscales_once(fresh_accelerate_state):
    from accelerate import Accelerator

    from edgedistill.distill.trainer import clip_each

    accelerator = Accelerator(cpu=True, mixed_precision="no")
    student, projection = torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 2, bias=False)
    student.weight.grad = torch.full((2, 2), 0.25)  # norm 0.5
    projection.weight.grad = torch.full((2, 2), 50.0)  # norm 100
    calls = []

    def unscale_once(optimizer=None):  # GradScaler refuses a second unscale_ in one step
        assert not calls, "gradients unscaled twice"
        calls.append(1)
    accelerator.unscale_gradients = unscale_once
    clip_each(accelerator, [student, projection], 1.0)
    assert torch.equal(student.weight.grad, torch.full((2, 2), 0.25))  # a joint norm would have scaled it by 1/100
    assert projection.weight.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert calls == [1] and accelerator.unscale_gradients is unscale_once  # restored


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize("loss, says", [
    ({"jsd_beta": 0.3}, "jsd_beta only applies"),
    ({"objective": "reverse_kl", "jsd_beta": 0.3}, "jsd_beta only applies"),
    ({"alpha_end": 0.2}, "alpha_end only applies"),
    ({"attention_kind": "mse"}, "attention_kind only applies"),
    ({"attention_kind": "mse", "attention_weight": 0.0}, "attention_kind only applies"),
])
def test_settings_that_change_nothing_are_refused(loss, says):
    from edgedistill.config import resolve
    from edgedistill.errors import UserError

    with pytest.raises(UserError, match=says):
        resolve({"distill": {"loss": loss}})


def test_settings_with_what_they_need_are_accepted():
    from edgedistill.config import resolve

    for loss in ({"objective": "jsd", "jsd_beta": 0.3}, {"alpha_schedule": "cosine", "alpha_end": 0.2},
                 {"attention_weight": 0.5, "attention_kind": "mse"}):
        assert resolve({"distill": {"loss": loss}}).model_dump(mode="json")["distill"]["loss"] == loss


def test_cli_loss_flags_reach_the_config_and_a_silent_setting_exits_2(monkeypatch, capsys):
    import sys

    from typer.testing import CliRunner

    from edgedistill import cli

    seen = []
    monkeypatch.setattr("edgedistill.build.build", lambda cfg, **kw: seen.append(cfg) or 0)
    res = CliRunner().invoke(cli.app, ["build", "--attention-weight", "0.5", "--top-k", "8", "--loss", "jsd",
                                       "--jsd-beta", "0.25"])
    assert res.exit_code == 0, res.output
    assert seen[0].distill.loss.model_dump() == {"objective": "jsd", "jsd_beta": 0.25, "attention_weight": 0.5,
                                                 "top_k": 8}
    monkeypatch.setattr(sys, "argv", ["edgedistill", "build", "--jsd-beta", "0.25"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "jsd_beta only applies" in message and len(message.splitlines()) == 1


# ---------------------------------------------------------------- every setting reaches the loss functions

HEAD_MAP = [[3, 2], [1, 0]]  # per student layer, teacher heads not in contiguous-group order
CHANNELS = list(range(1, 64, 2))  # the student's 32 channels among the teacher's 64


def first_batch_parts(teacher, student, examples, cfg, spec, head_maps, channels):
    """The loss terms of the run's first batch, computed here with the loss functions themselves."""
    from edgedistill.distill.trainer import _attention_probabilities, pack_rows

    inputs, labels, mask, positions = (x[:cfg.batch_size]
                                       for x in pack_rows(examples, cfg.seq_len, cfg.batch_size, cfg.seed))
    wanted = dict(use_cache=False, output_hidden_states=True, output_attentions=True, position_ids=positions)
    with torch.no_grad(), _attention_probabilities([student, teacher], True):
        s, t = student(input_ids=inputs, **wanted), teacher(input_ids=inputs, **wanted)
    _, parts = kd_loss(s.logits, t.logits, mask, labels, temperature=cfg.temperature, alpha=cfg.alpha,
                       objective=spec.objective, beta=spec.jsd_beta, top_k=spec.top_k,
                       confidence_weighting=spec.confidence_weighting)
    pairs = list(enumerate(cfg.layer_map))
    projection = HiddenProjection(len(pairs), 32, 64, seed=cfg.seed, channels=channels)
    with torch.no_grad():
        parts["hidden"] = hidden_state_mse(projection([s.hidden_states[i + 1] for i, _ in pairs]),
                                           [t.hidden_states[j + 1] for _, j in pairs])
    parts["attention"] = attention_transfer([s.attentions[i] for i, _ in pairs], [t.attentions[j] for _, j in pairs],
                                            spec.attention_kind, head_maps)
    return {k: v.item() for k, v in parts.items()}


def test_first_step_parts_are_the_loss_functions_on_the_first_batch(tiny_pair, few_examples, tmp_path, monkeypatch,
                                                                   fresh_accelerate_state):
    """Every setting reaches the loss functions: the recorded first-step terms equal the functions'
    values on the same batch with the same settings, and differ from them with any one setting changed."""
    from edgedistill.distill import trainer

    teacher, new_student = tiny_pair
    spec = LossSpec(objective="jsd", jsd_beta=0.1, top_k=16, confidence_weighting=True, hidden_weight=1.0,
                    attention_weight=1.0, attention_kind="mse")
    cfg = short_run(steps=1, loss=spec, temperature=1.5, alpha=0.8, layer_map=[0, 3], head_map=HEAD_MAP,
                    hidden_channels=CHANNELS, mixed_precision="no")
    clipped = []
    real_clip = trainer.clip_each
    monkeypatch.setattr(trainer, "clip_each", lambda acc, models, norm: clipped.append(len(models)) or
                        real_clip(acc, models, norm))
    recorded = trainer.distill(new_student(), teacher, few_examples, cfg, tmp_path, progress=False)["loss_parts"]
    assert clipped == [2]  # the student and the projections, each on its own
    want = first_batch_parts(teacher, new_student(), few_examples, cfg, spec, HEAD_MAP, CHANNELS)
    for name in ("soft", "ce", "hidden", "attention"):
        assert recorded[name][0] == pytest.approx(want[name], rel=1e-3), name

    def differs(name, loss=None, head_maps=HEAD_MAP, channels=CHANNELS):
        changed = LossSpec(**{**spec.__dict__, **(loss or {})})
        got = first_batch_parts(teacher, new_student(), few_examples, cfg, changed, head_maps, channels)[name]
        return abs(got - recorded[name][0]) > 0.01 * abs(recorded[name][0])

    assert differs("soft", loss={"jsd_beta": 0.5}) and differs("soft", loss={"objective": "forward_kl"})
    assert differs("soft", loss={"top_k": 0}) and differs("soft", loss={"confidence_weighting": False})
    assert differs("attention", head_maps=None)  # grouped heads instead of the cut's
    assert differs("hidden", channels=None)  # a random projection instead of the cut's channels


def test_the_eager_attention_switch_is_undone_when_training_raises(tiny_pair, few_examples, tmp_path, monkeypatch):
    from edgedistill.distill import trainer

    class Boom(Exception):
        pass

    def boom(*args, **kwargs):
        raise Boom
    monkeypatch.setattr(trainer, "_step_loss", boom)
    teacher, new_student = tiny_pair
    student = new_student()
    before = (teacher.config._attn_implementation, student.config._attn_implementation)
    with pytest.raises(Boom):
        trainer.distill(student, teacher, few_examples, short_run(loss=LossSpec(attention_weight=1.0)), tmp_path,
                        progress=False)
    assert (teacher.config._attn_implementation, student.config._attn_implementation) == before == ("sdpa", "sdpa")


def test_run_identity_leaves_out_maps_no_term_reads(tiny_pair, few_examples):
    from edgedistill.distill.trainer import _run_identity

    data = (torch.zeros(1, 2, dtype=torch.long),)
    plain = _run_identity(short_run(), data, 1)["config"]
    with_maps = _run_identity(short_run(layer_map=[0, 3], head_map=HEAD_MAP, hidden_channels=CHANNELS), data, 1)
    assert with_maps["config"] == plain and not {"loss", "layer_map", "head_map", "hidden_channels"} & set(plain)
    attention = _run_identity(short_run(loss=LossSpec(attention_weight=1.0), layer_map=[0, 3], head_map=HEAD_MAP,
                                        hidden_channels=CHANNELS), data, 1)["config"]
    assert attention["head_map"] == HEAD_MAP and "hidden_channels" not in attention


# ---------------------------------------------------------------- the fused top-k loss from hidden states


def cached_top_k(t, tau, k):
    """What a logit cache holds for teacher logits t: top-k ids, their log-probs and the tail's log-mass."""
    log_p = F.log_softmax(t / tau, -1)
    top = log_p.topk(k, dim=-1)
    return top.indices, top.values, log_p.scatter(-1, top.indices, -math.inf).logsumexp(-1)


def hidden_batch(seed, b=2, length=5, width=4, vocab=7):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, length, width, dtype=torch.float64, generator=g) * 2
    w = torch.randn(vocab, width, dtype=torch.float64, generator=g)
    _, t, mask, labels = random_batch(seed, b, length, vocab)
    return h, w, t, mask, labels


def test_fused_top_k_matches_hand_computation():
    # identity head: the hidden states are the logits; top-2 buckets plus the tail, and CE at alpha < 1
    t, s = [3.0, 1.0, 0.0, -1.0], [1.0, 2.0, 0.5, 0.0]
    p, q = softmax(t, 2.0), softmax(s, 2.0)
    soft = kl([p[0], p[1], p[2] + p[3]], [q[0], q[1], q[2] + q[3]])
    ce = cross_entropy(s, 3)
    one = torch.ones(1, 1, dtype=torch.long)
    args = (torch.tensor([[s]]), torch.eye(4), torch.tensor([[[0, 1]]]),
            torch.tensor([[[math.log(p[0]), math.log(p[1])]]]), torch.tensor([[math.log(p[2] + p[3])]]), one, 3 * one)
    loss, parts = losses.kd_loss_top_k_from_hidden(*args, temperature=2.0, alpha=0.7)
    assert loss.item() == pytest.approx(0.7 * 4 * soft + 0.3 * ce, rel=1e-6)
    assert parts["soft"].item() == pytest.approx(soft, rel=1e-6) and parts["ce"].item() == pytest.approx(ce, rel=1e-6)
    online, _ = losses.kd_loss_from_hidden(args[0], args[1], torch.tensor([[t]]), one, 3 * one, temperature=2.0,
                                           alpha=0.7, top_k=2)
    assert online.item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("objective", losses.OBJECTIVES)
@pytest.mark.parametrize("confidence", [False, True])
@pytest.mark.parametrize("source", ["cached", "online"])
def test_fused_top_k_equals_the_logits_path_and_passes_gradcheck(monkeypatch, objective, confidence, source):
    """Value and gradients of hidden and head weight equal kd_loss(_top_k) on h W^T; gradcheck across chunks."""
    monkeypatch.setattr(losses, "CHUNK_ROWS", 2)  # several chunks, the last one short
    h, w, t, mask, labels = hidden_batch(12)
    tau, k = 1.5, 3
    settings = dict(temperature=tau, alpha=0.6, objective=objective, beta=0.3, confidence_weighting=confidence)
    cache = cached_top_k(t, tau, k)
    if source == "cached":
        fused = lambda a, b: losses.kd_loss_top_k_from_hidden(a, b, *cache, mask, labels, **settings)  # noqa: E731
        plain = lambda a, b: kd_loss_top_k(a @ b.T, *cache, mask, labels, **settings)  # noqa: E731
    else:
        fused = lambda a, b: losses.kd_loss_from_hidden(a, b, t, mask, labels, top_k=k, **settings)  # noqa: E731
        plain = lambda a, b: kd_loss(a @ b.T, t, mask, labels, top_k=k, **settings)  # noqa: E731
    h.requires_grad_(True)
    w.requires_grad_(True)
    (got, got_parts), (want, want_parts) = fused(h, w), plain(h, w)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    for name in ("soft", "ce"):
        assert got_parts[name].item() == pytest.approx(want_parts[name].item(), rel=1e-12)
    for a, b in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(want, (h, w))):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
    assert torch.autograd.gradcheck(lambda a, b: fused(a, b)[0], (h, w))


@pytest.mark.parametrize("objective", losses.OBJECTIVES)
def test_fused_top_k_with_empty_tails_is_finite_and_exact(monkeypatch, objective):
    monkeypatch.setattr(losses, "CHUNK_ROWS", 2)
    h, w, t, mask, labels = hidden_batch(13, vocab=5)
    h.requires_grad_(True)
    settings = dict(temperature=1.5, alpha=0.4, objective=objective, beta=0.3)
    for k in (5, 50):  # k >= V: both tails empty, the whole divergence
        got, _ = losses.kd_loss_from_hidden(h, w, t, mask, labels, top_k=k, **settings)
        full, _ = kd_loss(h @ w.T, t, mask, labels, **settings)
        assert got.item() == pytest.approx(full.item(), rel=1e-12)
        assert torch.autograd.gradcheck(
            lambda a: losses.kd_loss_from_hidden(a, w, t, mask, labels, top_k=k, **settings)[0], (h,))
    # a cached teacher whose top-2 hold all its mass: its tail is -inf, the student's is not
    idx = torch.tensor([[0, 1]]).expand(2, 5, 2)
    top = torch.log(torch.tensor([0.7, 0.3], dtype=torch.float64)).expand(2, 5, 2)
    tail = torch.full((2, 5), -math.inf, dtype=torch.float64)
    got, _ = losses.kd_loss_top_k_from_hidden(h, w, idx, top, tail, mask, labels, **settings)
    want, _ = kd_loss_top_k(h @ w.T, idx, top, tail, mask, labels, **settings)
    assert torch.isfinite(got) and got.item() == pytest.approx(want.item(), rel=1e-12)
    assert torch.autograd.gradcheck(
        lambda a: losses.kd_loss_top_k_from_hidden(a, w, idx, top, tail, mask, labels, **settings)[0], (h,))


def test_fused_top_k_tail_does_not_underflow_in_float32():
    """exp of the tail's logits relative to the row's top would be 0 in float32 (a -inf tail, an
    infinite loss): the fused loss takes the tail relative to its own largest logit."""
    s = torch.tensor([[[0.0, -1.0, -400.0, -401.0, -402.0]]])
    cache = (torch.tensor([[[0, 1]]]), torch.log(torch.tensor([[[0.5, 0.3]]])), torch.log(torch.tensor([[0.2]])))
    one = torch.ones(1, 1, dtype=torch.long)
    settings = dict(temperature=2.0, alpha=0.7)
    got, parts = losses.kd_loss_top_k_from_hidden(s.clone().requires_grad_(True), torch.eye(5), *cache, one, 0 * one,
                                                  **settings)
    want, want_parts = kd_loss_top_k(s.double(), *(c.double() if c.is_floating_point() else c for c in cache), one,
                                     0 * one, **settings)
    assert torch.isfinite(got) and got.item() == pytest.approx(want.item(), rel=1e-5)
    assert parts["soft"].item() == pytest.approx(want_parts["soft"].item(), rel=1e-5)


def test_fused_top_k_bf16_matmuls_stay_close_to_float32():
    g = torch.Generator().manual_seed(14)
    h = torch.randn(3, 40, 16, generator=g)
    w = torch.randn(300, 16, generator=g) * 0.3
    t = torch.randn(3, 40, 300, generator=g) * 3
    mask, labels = torch.ones(3, 40, dtype=torch.long), torch.randint(0, 300, (3, 40), generator=g)
    cache = cached_top_k(t, 2.0, 8)
    runs = []
    for dtype in (None, torch.bfloat16):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss, _ = losses.kd_loss_top_k_from_hidden(hh, ww, *cache, mask, labels, temperature=2.0, alpha=0.7,
                                                   matmul_dtype=dtype)
        runs.append((loss.item(), *torch.autograd.grad(loss, (hh, ww))))
    (l32, gh32, gw32), (l16, gh16, gw16) = runs
    assert gh16.dtype == torch.float32 and gw16.dtype == torch.float32
    assert l16 == pytest.approx(l32, rel=1e-2)
    for a, b in ((gh16, gh32), (gw16, gw32)):
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


def test_fused_top_k_all_masked_batch_gives_zero_loss_and_zero_gradient():
    h, w, t, mask, labels = hidden_batch(15)
    h.requires_grad_(True)
    w.requires_grad_(True)
    loss, parts = losses.kd_loss_top_k_from_hidden(h, w, *cached_top_k(t, 2.0, 3), torch.zeros_like(mask), labels,
                                                   temperature=2.0, alpha=0.5, confidence_weighting=True)
    loss.backward()
    assert loss.item() == 0.0 and parts["soft"].item() == 0.0
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0)


@pytest.mark.parametrize("logit_cache", [False, True], ids=["online", "cached"])
def test_top_k_training_runs_fused_and_matches_the_logits_path(tiny_pair, few_examples, tmp_path, monkeypatch,
                                                               fresh_accelerate_state, logit_cache):
    """A top-k run never asks the student for its [B, L, V] logits, and trains as the logits path does."""
    from edgedistill.distill import trainer

    teacher, new_student = tiny_pair
    student = new_student()
    ids = torch.tensor([few_examples[0]["input_ids"]])
    with torch.no_grad():  # what the fused loss multiplies: hidden_states[-1] is after the final norm
        out = student(input_ids=ids, output_hidden_states=True)
    assert torch.allclose(out.hidden_states[-1] @ student.lm_head.weight.T, out.logits, atol=1e-5)

    seen = []
    real_loss = losses.kd_loss_top_k_from_hidden if logit_cache else losses.kd_loss_from_hidden
    monkeypatch.setattr(trainer, real_loss.__name__, lambda hidden, *a, **k: seen.append(hidden.shape) or
                        real_loss(hidden, *a, **k))  # the name the trainer calls
    cfg = short_run(steps=3, loss=LossSpec(top_k=16, objective="jsd", jsd_beta=0.3), alpha=0.7,
                    mixed_precision="no", logit_cache=logit_cache)
    fused = trainer.distill(student, teacher, few_examples, cfg, tmp_path / "fused", progress=False)
    assert len(seen) == 3 and seen[0][-1] == student.config.hidden_size

    monkeypatch.setattr(trainer, "_fused_head", lambda *a: None)
    plain_student = new_student()
    plain = trainer.distill(plain_student, teacher, few_examples, cfg, tmp_path / "plain", progress=False)
    assert len(seen) == 3  # the logits path this time
    assert fused["loss_curve"] == pytest.approx(plain["loss_curve"], rel=1e-4)
    for name in ("soft", "ce"):
        assert fused["loss_parts"][name] == pytest.approx(plain["loss_parts"][name], rel=1e-3)
    a, b = student.state_dict(), plain_student.state_dict()
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)


def test_fused_head_is_kept_off_where_the_logits_path_is_needed(tiny_pair):
    from edgedistill.distill.trainer import TrainConfig, _fused_head

    _, new_student = tiny_pair
    student = new_student()
    top_k = TrainConfig(steps=1, batch_size=1, seq_len=8, loss=LossSpec(top_k=4))
    assert _fused_head(student, student, top_k) is student.lm_head
    assert _fused_head(student, student, TrainConfig(steps=1, batch_size=1, seq_len=8)) is None  # full vocabulary
    assert _fused_head(torch.nn.Sequential(student), student, top_k) is None  # some other wrapper (FSDP, ...)
    handle = student.lm_head.register_forward_pre_hook(lambda module, args: None)  # QAT's activation rounding
    assert _fused_head(student, student, top_k) is None
    handle.remove()
    black_box = TrainConfig(steps=1, batch_size=1, seq_len=8, loss=LossSpec(top_k=4), mode="black_box")
    assert _fused_head(student, student, black_box) is None
