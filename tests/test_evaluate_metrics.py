"""Evaluate-stage metrics: the generalization corpus and perplexity, calibration, degeneration."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import edgedistill
from edgedistill.evaluate import corpus
from edgedistill.evaluate.calibration import model_calibration, reliability
from edgedistill.evaluate.corpus import (contains_corpus, corpus_examples, corpus_fingerprints, load_passages,
                                         perplexity)
from edgedistill.evaluate.degeneration import degeneration, distinct_n, has_loop
from edgedistill.measure.quality import evaluate, teacher_targets

PACKAGE = Path(edgedistill.__file__).parent


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def tiny_llama(vocab: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def random_examples(n: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt, answer = (int(x) for x in torch.randint(3, 15, (2,), generator=g))
        ids = torch.randint(0, vocab, (prompt + answer,), generator=g).tolist()
        out.append({"input_ids": ids, "loss_mask": [0] * prompt + [1] * answer})
    return out


class Uniform(torch.nn.Module):
    """Constant logits over `vocab` tokens, called like a Hugging Face causal LM."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.unused = torch.nn.Parameter(torch.zeros(1))  # the scorer finds the device from a parameter

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


class BosTokenizer:
    """A word-level tokenizer that puts a BOS (id 1) first, as Llama tokenizers do."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=True):
        ids = [self.vocab.setdefault(w, len(self.vocab) + 2) for w in text.split(" ")]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


# ---- generalization corpus ----------------------------------------------------------------------

def test_corpus_file_loads_and_is_deterministic():
    passages = load_passages()
    assert len(passages) >= 50
    assert all(p and "\n" not in p and not p.startswith("#") for p in passages)
    header = corpus.CORPUS_FILE.read_text(encoding="utf-8").split("\n", 1)[0]
    assert header.startswith("# source:") and "PSF License" in header and "Python 3." in header
    corpus._passages.cache_clear()
    assert load_passages() == passages
    assert 30_000 <= corpus.CORPUS_FILE.stat().st_size <= 60_000


def test_build_corpus_reproduces_the_shipped_file():
    made_with = corpus.corpus_python_version()
    if platform.python_version() != made_with:
        pytest.skip(f"generalization.txt was made on Python {made_with}; this is {platform.python_version()} "
                    f"and its standard-library docstrings may differ")
    assert corpus.build_corpus() == corpus.CORPUS_FILE.read_text(encoding="utf-8")


def test_corpus_examples_pack_within_max_len(tok):
    examples = corpus_examples(tok, max_len=64, max_examples=6)
    assert len(examples) == 6
    for ex in examples:
        assert ex["category"] == "generalization"
        assert 2 <= len(ex["input_ids"]) <= 64
        assert ex["loss_mask"] == [0] + [1] * (len(ex["input_ids"]) - 1)
    # the first example starts with the first passage (SmolLM2's tokenizer adds no BOS)
    first = tok(load_passages()[0], add_special_tokens=False)["input_ids"]
    assert examples[0]["input_ids"][:min(len(first), 64)] == first[:64]
    # all of it, in short pieces: passages longer than max_len are cut, nothing is lost
    everything = corpus_examples(tok, max_len=16, max_examples=10**6)
    assert all(2 <= len(ex["input_ids"]) <= 16 for ex in everything)
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    assert len(sep) == 1
    stream = [t for ex in everything for t in ex["input_ids"] if t != sep[0]]
    assert stream == [t for p in load_passages() for t in tok(p, add_special_tokens=False)["input_ids"]]
    assert corpus_examples(tok, max_len=16, max_examples=10**6) == everything


def test_corpus_examples_follow_a_bos_tokenizer():
    examples = corpus_examples(BosTokenizer(), max_len=40, max_examples=3)
    assert len(examples) == 3
    for ex in examples:
        assert ex["input_ids"][0] == 1 and 1 not in ex["input_ids"][1:]
        assert len(ex["input_ids"]) <= 40
        assert ex["loss_mask"] == [0] + [1] * (len(ex["input_ids"]) - 1)  # every text token is scored


def test_fingerprints_find_the_corpus_and_nothing_else(tok):
    prints = corpus_fingerprints(tok, n=8)
    passage = tok(load_passages()[10], add_special_tokens=False)["input_ids"]
    other = tok("Tell me a story about a dragon who learns to bake bread in a small village.",
                add_special_tokens=False)["input_ids"]
    # a passage copied into a training row with other text around it
    row = tok("Here is some text: " + load_passages()[10] + " Thanks!", add_special_tokens=False)["input_ids"]
    assert contains_corpus([other, row], prints, 8)
    assert contains_corpus([passage[3:20]], prints, 8)
    assert not contains_corpus([other], prints, 8)
    assert not contains_corpus([passage[:7]], prints, 8)  # shorter than one n-gram


def test_corpus_shares_no_8gram_with_the_bundled_prompts(tok):
    prints = corpus_fingerprints(tok, n=8)
    rows = []
    for path in sorted((PACKAGE / "data" / "prompts").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows += [tok(m["content"], add_special_tokens=False)["input_ids"]
                         for m in json.loads(line)["messages"] if m["role"] == "user"]
    assert len(rows) > 50
    assert not contains_corpus(rows, prints, 8)


def test_no_training_path_reads_the_corpus():
    for folder in ("data", "distill"):
        for source in (PACKAGE / folder).rglob("*.py"):
            text = source.read_text(encoding="utf-8")
            assert "generalization.txt" not in text and "evaluate.corpus" not in text, source


# ---- perplexity -----------------------------------------------------------------------------------

@pytest.mark.parametrize("as_module", [True, False])
def test_uniform_model_has_perplexity_v(as_module):
    vocab = 97
    examples = random_examples(5, vocab, seed=3)
    model = Uniform(vocab) if as_module else (lambda ids: torch.zeros(len(ids), vocab))
    assert perplexity(model, examples, batch_size=2) == pytest.approx(vocab, rel=1e-5)


def test_tiny_llama_perplexity_on_the_corpus(tok):
    examples = corpus_examples(tok, max_len=48, max_examples=3)
    ppl = perplexity(tiny_llama(len(tok), seed=0), examples, batch_size=2)
    assert math.isfinite(ppl) and ppl > 1


def test_perplexity_of_nothing_is_none():
    assert perplexity(Uniform(5), [{"input_ids": [1, 2], "loss_mask": [0, 0]}]) is None


# ---- calibration ----------------------------------------------------------------------------------

def test_reliability_by_hand():
    out = reliability(torch.tensor([0.05, 0.15, 0.95, 0.95, 1.0]), torch.tensor([0, 1, 1, 0, 1]), bins=10)
    # bin 0: conf .05, acc 0; bin 1: conf .15, acc 1; bin 9: conf (.95+.95+1)/3, acc 2/3
    assert out["ece"] == pytest.approx(1 / 5 * 0.05 + 1 / 5 * 0.85 + 3 / 5 * abs(2 / 3 - 2.9 / 3))
    assert out["positions"] == 5
    assert [b["count"] for b in out["bins"]] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 3]
    assert out["bins"][2]["confidence"] is None and out["bins"][2]["accuracy"] is None
    assert out["bins"][9]["lo"] == pytest.approx(0.9) and out["bins"][9]["hi"] == pytest.approx(1.0)
    assert out["bins"][9]["accuracy"] == pytest.approx(2 / 3)
    assert reliability(torch.zeros(0), torch.zeros(0))["ece"] is None


def test_reliability_calibrated_and_overconfident():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    conf = torch.rand(n, generator=g)
    calibrated = torch.rand(n, generator=g) < conf
    # ~13k samples a bin: a bin's accuracy has a standard error <= 0.0044, so ECE ~ 0.003; 0.01 is wide
    assert reliability(conf, calibrated)["ece"] < 0.01
    over = 0.9 + 0.1 * torch.rand(n, generator=g)
    coin = torch.rand(n, generator=g) < 0.5
    assert reliability(over, coin)["ece"] == pytest.approx(0.45, abs=0.01)


def test_model_calibration_against_teacher_and_text():
    vocab = 256
    examples = random_examples(7, vocab, seed=1)
    scored = sum(sum(ex["loss_mask"][1:]) for ex in examples)
    teacher, student = tiny_llama(vocab, seed=0), tiny_llama(vocab, seed=1)
    targets = teacher_targets(teacher, examples, top_k=8)

    own = model_calibration(teacher, examples, teacher_targets=targets, batch_size=3)
    for key in ("vs_teacher", "vs_text"):
        assert own[key]["positions"] == scored
        assert sum(b["count"] for b in own[key]["bins"]) == scored
    assert all(b["accuracy"] == 1.0 for b in own["vs_teacher"]["bins"] if b["count"])

    cal = model_calibration(student, examples, teacher_targets=targets)
    hits = sum(b["accuracy"] * b["count"] for b in cal["vs_teacher"]["bins"] if b["count"])
    assert hits / scored == pytest.approx(evaluate(student, targets, examples)["top1_agreement"])
    assert model_calibration(student, examples)["vs_teacher"] is None
    with pytest.raises(ValueError):
        model_calibration(student, examples, teacher_targets=targets[:-1])


# ---- degeneration ---------------------------------------------------------------------------------

def test_loops_are_flagged():
    assert has_loop([5, 6, 7, 8, 9] + [1, 2, 3] * 4)  # ends in a 3-token cycle
    assert has_loop([1, 2, 3, 4] * 3 + [9, 8])  # a loop it left again
    assert has_loop([0] * 12)
    assert not has_loop([0] * 11)  # a one-token cycle needs the same span, 3 * 4 tokens
    assert not has_loop(list(range(40)))
    assert not has_loop([10, 1, 0, 0, 0, 11])  # "1000" with digit tokens is not a loop
    assert has_loop("and then and then and then and then and then and then")
    assert has_loop([1, 2] * 3, n=2, repeats=3) and not has_loop([1, 2] * 3, n=3, repeats=3)


def test_distinct_n_and_summary():
    gens = [[1, 2, 1, 2], [1, 2, 3]]
    assert distinct_n(gens, 1) == pytest.approx(3 / 7)
    assert distinct_n(gens, 2) == pytest.approx(3 / 5)  # (1,2) (2,1) (1,2) | (1,2) (2,3)
    assert distinct_n(["the cat the cat"], 1) == pytest.approx(2 / 4)
    assert distinct_n([[1]], 2) is None
    out = degeneration([[1, 2, 3] * 5, list(range(10))])
    assert out == {"distinct_1": pytest.approx(10 / 25), "distinct_2": pytest.approx(10 / 23),
                   "loop_fraction": 0.5, "generations": 2}
    assert degeneration([]) == {"distinct_1": None, "distinct_2": None, "loop_fraction": None, "generations": 0}
