"""The student as a speculative-decoding draft: acceptance counting, losslessness, measured speed-up."""
from __future__ import annotations

import copy

import pytest
import torch

from edgedistill.evaluate.speculative import acceptance, speedup
from test_distill import VOCAB, tiny_llama

K, NEW = 4, 16


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 3)]


# Untied heads: a random tied-embedding model greedily repeats its last input token, so any two of
# them "agree" perfectly and the low/middle acceptance cases would test nothing.
@pytest.fixture(scope="module")
def target():
    return tiny_llama(0, layers=2, hidden=64, tied=False)


@pytest.fixture(scope="module")
def unrelated():
    return tiny_llama(1, layers=1, hidden=32, tied=False)


@pytest.fixture(scope="module")
def perturbed(target):
    draft = copy.deepcopy(target)
    torch.manual_seed(5)
    with torch.no_grad():
        for w in draft.model.layers[1].parameters():
            if w.dim() > 1:
                w.add_(0.3 * w.std() * torch.randn_like(w))
    return draft


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_self_draft_accepts_everything(target):
    r = acceptance(target, target, _prompts(), k=K, max_new_tokens=NEW, eos_ids=None)
    assert r["acceptance_rate"] == 1.0 and r["accepted"] == r["proposed"] > 0
    assert r["generated_tokens"] == 3 * NEW and r["prompts"] == 3 and r["lossless"]
    # Each prompt: full rounds of k+1 tokens, then a last round drafting only what fits.
    full, rest = divmod(NEW, K + 1)
    assert r["target_calls"] == 3 * (full + (rest > 0))
    assert r["tokens_per_target_call"] == pytest.approx(3 * NEW / r["target_calls"])
    assert r["proposed"] == 3 * (full * K + max(rest - 1, 0))
    exact = acceptance(target, target, _prompts(), k=K, max_new_tokens=2 * (K + 1), eos_ids=None)
    assert exact["tokens_per_target_call"] == K + 1


def test_unrelated_draft_rarely_accepted_but_lossless(target, unrelated):
    r = acceptance(unrelated, target, _prompts(), k=K, max_new_tokens=NEW, eos_ids=None)
    assert r["acceptance_rate"] < 0.5
    assert r["lossless"] and r["mismatched_prompts"] == 0
    assert r["tokens_per_target_call"] < 2


def test_lossless_reference_is_generate(target, unrelated):
    # The in-function reference is a hand-written one-token-per-pass loop; pin it to transformers' greedy generate.
    from edgedistill.evaluate.speculative import _plain_greedy, _speculate_one
    for p in _prompts():
        with torch.inference_mode():
            spec = _speculate_one(unrelated, target, p, K, NEW, set())["new"]
            ref = _plain_greedy(target, p, NEW, set())
        assert spec == ref == _greedy(target, p, NEW)


def test_perturbed_copy_in_between(target, unrelated, perturbed):
    low = acceptance(unrelated, target, _prompts(), k=K, max_new_tokens=NEW, eos_ids=None)
    mid = acceptance(perturbed, target, _prompts(), k=K, max_new_tokens=NEW, eos_ids=None)
    assert low["acceptance_rate"] < mid["acceptance_rate"] < 1.0
    assert 1.0 < mid["tokens_per_target_call"] < K + 1
    assert mid["lossless"]


def test_eos_stops_and_stays_lossless(target, perturbed):
    prompt = _prompts()[0]
    eos = _greedy(target, prompt, NEW)[6]
    r = acceptance(perturbed, target, [prompt], k=K, max_new_tokens=NEW, eos_ids=[eos])
    assert r["lossless"]
    assert r["generated_tokens"] <= 7


def test_restores_train_mode(target, perturbed):
    perturbed.train()
    try:
        acceptance(perturbed, target, _prompts()[:1], k=2, max_new_tokens=4, eos_ids=None)
        assert perturbed.training and not target.training
    finally:
        perturbed.eval()


def test_speedup_measured(target):
    draft = copy.deepcopy(target)
    draft.generation_config.num_assistant_tokens = 7
    r = speedup(draft, target, _prompts()[:2], k=K, max_new_tokens=8)
    assert r["plain_tok_s"] > 0 and r["assisted_tok_s"] > 0 and r["speedup"] > 0
    assert r["same_output"] is True
    assert r["k"] == K and r["new_tokens"] > 0 and r["threads"] == torch.get_num_threads()
    assert r["basis"] == "measured on this host"
    assert draft.generation_config.num_assistant_tokens == 7  # the caller's config is given back


@pytest.mark.parametrize("kw", [{"k": 0}, {"k": -1}, {"k": 2.5}, {"max_new_tokens": 0}])
def test_bad_numbers(target, kw):
    args = {"k": K, "max_new_tokens": NEW} | kw
    with pytest.raises(ValueError):
        acceptance(target, target, _prompts(), eos_ids=None, **args)
    with pytest.raises(ValueError):
        speedup(target, target, _prompts(), **args)


@pytest.mark.parametrize("prompts", [[], [[]], [[1, "a"]], [[1, -3]], [[VOCAB]], ["abc"]])
def test_bad_prompts(target, prompts):
    with pytest.raises(ValueError):
        acceptance(target, target, prompts, k=K, max_new_tokens=NEW, eos_ids=None)


def test_vocab_mismatch(target):
    other = tiny_llama(0, layers=1, hidden=32, tied=False)
    other.resize_token_embeddings(VOCAB + 8)
    with pytest.raises(ValueError, match="vocabulary"):
        acceptance(other, target, _prompts(), k=K, max_new_tokens=NEW, eos_ids=None)
    with pytest.raises(ValueError):
        speedup(target, target, _prompts(), k=K, max_new_tokens=NEW, repeats=0)
