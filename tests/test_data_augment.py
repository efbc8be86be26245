"""Data augmentation and cleaning (data/augment.py and the data stage): self-instruct, MinHash near-duplicate
removal, chain-of-thought variants, follow-up turns, answer quality filters, topic balancing; each shown
working and shown failing (dropping what it should, keeping the rest)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console

from edgedistill.config import BuildConfig, dump_toml, resolve
from edgedistill.data import augment
from edgedistill.data import stage as data_stage
from edgedistill.data.prompts import USER_TEXT, Prompt, load_bundled, load_user_file, split
from edgedistill.data.teacher_answers import read_jsonl, tokenize_records
from edgedistill.errors import UserError
from edgedistill.pipeline import Session, StageContext


def chat(pid: str, category: str, text: str) -> Prompt:
    return Prompt(pid, category, [{"role": "user", "content": text}])


def answer(pid: str, text: str, *, finished=True, category="instruction") -> dict:
    return {"id": pid, "category": category, "messages": [{"role": "user", "content": f"question {pid}"}],
            "answer": text, "finished": finished}


@pytest.fixture(scope="module")
def tiny(tiny_teacher_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(tiny_teacher_dir), AutoTokenizer.from_pretrained(tiny_teacher_dir)


@pytest.fixture(scope="module")
def chatty(tmp_path_factory, tokenizer_dir):
    """A tiny random teacher with its own output layer: the tied one mostly echoes its input's last token
    (an empty answer); this one writes words, so self-instruct has replies to parse."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import make_tiny_llama
    folder = make_tiny_llama(tmp_path_factory.mktemp("chatty"), tokenizer_dir, layers=2, tied=False, seed=3)
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


# ---------------------------------------------------------------- config

AUGMENT = {"self_instruct": 6, "dedup_threshold": 0.6, "chain_of_thought": True, "multi_turn": 3,
           "answer_filters": ["empty", "too_long", "repetitive"], "max_repetition": 0.6, "balance": "oversample"}


def test_new_settings_at_defaults_leave_the_dumped_config_as_it_was():
    data = resolve({}).model_dump(mode="json")["data"]
    assert set(data) == {"prompts", "max_prompts", "heldout_fraction", "max_new_tokens", "gen_batch_size", "max_len"}
    on = resolve({"data": AUGMENT})
    dumped = on.model_dump(mode="json")["data"]
    assert {k: dumped[k] for k in AUGMENT} == AUGMENT
    assert "cot_categories" not in dumped  # still at its default
    assert on.section_hash("data") != resolve({}).section_hash("data")
    import tomllib
    replayed = BuildConfig.model_validate(tomllib.loads(dump_toml(on)))
    assert replayed.data == on.data


@pytest.mark.parametrize("setting", [{"dedup_threshold": 0.5}, {"self_instruct_examples": 2},
                                     {"cot_categories": ["code"]}, {"min_answer_words": 3},
                                     {"max_repetition": 0.3, "answer_filters": ["empty"]},
                                     {"answer_filters": ["empty", "empty"]}, {"answer_filters": ["nonsense"]},
                                     {"balance": "sideways"}, {"self_instruct": -1}])
def test_settings_that_would_do_nothing_or_are_wrong_are_refused(setting):
    with pytest.raises(UserError):
        resolve({"data": setting})


def test_cli_data_flags_reach_the_config(monkeypatch):
    from typer.testing import CliRunner

    from edgedistill import cli

    seen = []
    monkeypatch.setattr("edgedistill.build.build", lambda cfg, **kw: seen.append(cfg) or 0)
    res = CliRunner().invoke(cli.app, ["build", "--self-instruct", "5", "--chain-of-thought", "--multi-turn", "2",
                                       "--answer-filters", "empty, repetitive", "--balance", "cap"])
    assert res.exit_code == 0, res.output
    d = seen[0].data
    assert (d.self_instruct, d.chain_of_thought, d.multi_turn, d.answer_filters, d.balance) == (
        5, True, 2, ["empty", "repetitive"], "cap")
    assert CliRunner().invoke(cli.app, ["build", "--answer-filters", "all"]).exit_code == 0
    assert seen[1].data.answer_filters == list(augment.FILTERS)
    bad = CliRunner().invoke(cli.app, ["build", "--answer-filters", "long"])  # cli.main makes it exit 2
    assert isinstance(bad.exception, UserError) and "answer_filters" in str(bad.exception)


# ---------------------------------------------------------------- quality filters

def test_each_filter_drops_what_it_should_and_counts_add_up():
    recs = [
        answer("good", "Paris is the capital of France."),
        answer("empty", "   \n"),
        answer("cut", "This answer stops in the midd", finished=False),
        answer("short", "Yes."),
        answer("long", "A long answer " * 5),
        answer("loop", "I like it. " * 12),
        answer("good2", "Mix flour, water and salt, then knead for ten minutes."),
        {"id": "raw", "category": USER_TEXT, "text": "raw text, never checked"},
    ]
    lengths = {"long": 500}
    res = augment.filter_answers(recs, min_words=2, max_repetition=0.5, max_tokens=100,
                                 token_count=lambda r: lengths.get(r["id"], 20))
    assert [r["id"] for r in res.kept] == ["good", "good2", "raw"]
    assert {r["id"]: r["dropped"] for r in res.dropped} == {
        "empty": "empty", "cut": "truncated", "short": "too_short", "long": "too_long", "loop": "repetitive"}
    s = res.summary()
    assert (s["checked"], s["kept"], s["dropped"]) == (7, 2, 5)
    assert all(s[f]["dropped"] == 1 for f in augment.FILTERS)
    passed = s["checked"]  # each filter sees what the one before it kept
    for f in augment.FILTERS:
        assert s[f]["kept"] + s[f]["dropped"] == passed
        passed = s[f]["kept"]
    assert passed == s["kept"]


def test_filters_not_chosen_keep_everything_and_thresholds_move_the_line():
    recs = [answer("cut", "An unfinished but otherwise fine answer", finished=False), answer("short", "Yes.")]
    res = augment.filter_answers(recs, ["empty", "repetitive"])
    assert len(res.kept) == 2 and not res.dropped and set(res.summary()) == {"checked", "kept", "dropped",
                                                                              "empty", "repetitive"}
    assert [r["id"] for r in augment.filter_answers(recs, ["too_short"], min_words=1).kept] == ["cut", "short"]
    assert [r["id"] for r in augment.filter_answers(recs, ["too_short"], min_words=2).kept] == ["cut"]
    with pytest.raises(ValueError, match="too_long"):
        augment.filter_answers(recs, ["too_long"])


def test_repetition_share():
    assert augment.repetition_share("one two three four five six") == 0
    assert augment.repetition_share("the the the the the the the the") == pytest.approx(5 / 6)
    assert augment.repetition_share("ok ok") == 0  # too short to judge
    assert 0.4 < augment.repetition_share("I like it. " * 12) < 1


def test_too_long_counts_template_tokens(tiny):
    _, tok = tiny
    rec = answer("r", "word " * 40)
    n = len(tokenize_records(tok, [rec], max_len=1 << 20)[0]["input_ids"])
    count = lambda r: len(tokenize_records(tok, [r], max_len=1 << 20)[0]["input_ids"])  # noqa: E731
    assert augment.filter_answers([rec], ["too_long"], max_tokens=n, token_count=count).kept
    assert not augment.filter_answers([rec], ["too_long"], max_tokens=n - 1, token_count=count).kept


# ---------------------------------------------------------------- near duplicates

def test_minhash_drops_near_duplicates_and_keeps_distinct_ones():
    known = [chat("k1", "code", "Write a Python function that reverses a string."),
             chat("k2", "writing", "Write a short poem about the ocean.")]
    held = [chat("h1", "factual_qa", "What is the capital of France?")]
    cands = [chat("c1", "code", "Write a Python function that reverses a string in place."),  # ~ k1
             chat("c2", "writing", "write a short poem about the OCEAN!"),  # k2, case and punctuation
             chat("c3", "factual_qa", "What is the capital of France ?"),  # copies held-out
             chat("c4", "code", "Explain what a hash map is and when to use one."),  # new
             chat("c5", "code", "Explain what a hash map is, and when to use one?"),  # ~ c4
             chat("c6", "writing", "Describe a rainy afternoon in a quiet village.")]  # new
    kept, dropped = augment.drop_near_duplicates(cands, known, held, threshold=0.7)
    assert [p.id for p in kept] == ["c4", "c6"]
    assert {d["id"]: (d["reason"], d["match"]) for d in dropped} == {
        "c1": ("near_duplicate", "k1"), "c2": ("near_duplicate", "k2"), "c3": ("heldout_copy", "h1"),
        "c5": ("near_duplicate", "c4")}
    assert all(d["similarity"] >= 0.7 for d in dropped)
    # the threshold is the line: at 1.0 only exact (normalized) copies go
    kept, dropped = augment.drop_near_duplicates(cands, known, held, threshold=1.0)
    assert {d["id"] for d in dropped} == {"c2", "c3", "c5"} and "c1" in [p.id for p in kept]


def test_minhash_estimate_tracks_jaccard():
    a, b = "Write a Python function that reverses a string.", "Write a Python function that sorts a list."
    sa, sb = augment.shingles(a), augment.shingles(b)
    exact = len(sa & sb) / len(sa | sb)
    assert abs(augment.minhash(a).jaccard(augment.minhash(b)) - exact) < 0.15
    assert augment.minhash(a).jaccard(augment.minhash(a.upper())) == 1.0


# ---------------------------------------------------------------- self-instruct

HAIKU = "Write a haiku about winter mornings."


@pytest.mark.parametrize("reply,kw,expected", [
    (HAIKU, {}, [HAIKU]),
    ("New request: " + HAIKU, {}, [HAIKU]),
    ("Here is a new request:\n\n4. \"" + HAIKU + "\"", {}, [HAIKU]),
    ("1. Name three rivers in Africa.\n2. Name three lakes in Asia.", {}, [
        "Name three rivers in Africa.", "Name three lakes in Asia."]),
    # one-line examples: the first line is the instruction, what follows is the teacher talking
    ("1. What is a for loop?\nA for loop repeats code.\n2. What is a list?", {}, [
        "What is a for loop?", "What is a list?"]),
    ("How many minutes are in an hour?\n\nThis is a factual question that", {"finished": False},
     ["How many minutes are in an hour?"]),
    # cut short: the item the reply ends in may be incomplete
    ("1. Name three rivers in Africa.\n2. Name three lakes in", {"finished": False}, ["Name three rivers in Africa."]),
    (HAIKU, {"finished": False}, []),
    ("Summarize this text.\nThe town built a bridge over the river.", {"multiline": True},
     ["Summarize this text.\nThe town built a bridge over the river."]),
    ("1. What is 0.2 times 50?\n2. -3 + 5 = ?", {}, ["What is 0.2 times 50?", "-3 + 5 = ?"]),  # numbers stay
    ("", {}, []), ("Sure!", {}, []), ("Task: ok", {}, []),
])
def test_parse_instructions(reply, kw, expected):
    assert augment.parse_instructions(reply, **kw) == expected


def test_self_instruct_scripted_teacher():
    train = [chat(f"math-{i}", "math", f"What is {i} plus {i + 7}?") for i in range(4)] + \
            [chat(f"code-{i}", "code", t) for i, t in enumerate(
                ["Write a Python function that reverses a string.", "What does len('abc') return?"])]
    held = [chat("math-h", "math", "How many hours are in three days?"),
            chat("code-h", "code", "Write a Python function that checks whether a number is even.")]
    replies = {  # per category, in request order: (reply, finished)
        "code": [("Write a Python function that returns the largest item of a list.", True),
                 ("Write a Python function that checks whether a number is even.", True),  # held-out copy
                 ("1. Write a Python function that reverses a string!\n"  # near-duplicate of a seed
                  "2. Write a Python function that counts the vowels in a word.", True),  # new
                 ("Write a Python function that sorts a list of names by their", False)],  # truncated
        "math": [("A train travels 120 km in 2 hours. What is its average speed?", True),
                 ("A train travels 120 km in 2 hours; what is its average speed?", True),  # ~ the first new one
                 ("ok", True)],  # unparsable
    }
    seen_requests = []

    def generate(prompts, max_new_tokens):
        seen_requests.extend(prompts)
        out, used = [], Counter()
        for p in prompts:
            text, finished = replies[p.category][used[p.category]]
            used[p.category] += 1
            out.append({"id": p.id, "category": p.category, "messages": p.messages, "answer": text,
                        "finished": finished})
        return out

    res = augment.self_instruct(train, train + held, held, 7, examples=2, threshold=0.7, seed=0,
                                max_new_tokens=16, generate=generate)
    assert len(seen_requests) == 7
    assert Counter(p.category for p in seen_requests) == {"code": 4, "math": 3}
    shown = "\n".join(p.messages[0]["content"] for p in seen_requests)
    assert not any(h.messages[0]["content"] in shown for h in held), "held-out prompts must never be shown"
    assert all(any(s.messages[0]["content"] in r.messages[0]["content"] for s in train if s.category == r.category)
               for r in seen_requests)
    kept = {p.messages[0]["content"]: p for p in res.prompts}
    assert set(kept) == {"Write a Python function that returns the largest item of a list.",
                         "Write a Python function that counts the vowels in a word.",
                         "A train travels 120 km in 2 hours. What is its average speed?"}
    assert kept["A train travels 120 km in 2 hours. What is its average speed?"].category == "math"
    assert kept["Write a Python function that counts the vowels in a word."].category == "code"
    assert all(p.id == augment.instruction_prompt(p.category, p.messages[0]["content"]).id for p in res.prompts)
    s = res.summary
    assert (s["requests"], s["candidates"], s["kept"]) == (7, 6, 3)
    assert s["unusable_replies"] == {"truncated": 1, "unparsable": 1}
    assert s["dedup"] == {"threshold": 0.7, "checked": 6, "kept": 3, "dropped_heldout_copy": 1,
                          "dropped_near_duplicate": 2}
    assert s["by_category"] == {"code": {"requests": 4, "candidates": 4, "kept": 2},
                                "math": {"requests": 3, "candidates": 2, "kept": 1}}
    items = [i for e in res.log for i in e["instructions"]]
    assert [i.get("reason") for i in items if not i["kept"]] == ["heldout_copy", "near_duplicate", "near_duplicate"]
    assert [e["unusable"] for e in res.log if "unusable" in e] == ["unparsable", "truncated"]


def test_self_instruct_with_a_real_tiny_teacher(chatty):
    model, tok = chatty
    from edgedistill.data.teacher_answers import generate_answers
    train = [p for p in load_bundled() if p.category in ("code", "writing")][:10]
    res = augment.self_instruct(
        train, train, [], 4, examples=2, threshold=0.7, seed=0, max_new_tokens=12,
        generate=lambda ps, n: generate_answers(model, tok, ps, max_new_tokens=n, batch_size=4))
    s = res.summary
    assert s["requests"] == 4 and len(res.log) == 4
    assert all(e["category"] in ("code", "writing") for e in res.log)
    assert sum(s["unusable_replies"].values()) + sum(bool(e["instructions"]) for e in res.log) == 4


# ---------------------------------------------------------------- chain of thought

def test_cot_variants_only_for_the_chosen_categories():
    prompts = [chat("m1", "math", "What is 47 + 38?"), chat("r1", "reasoning", "Who is shortest? Think step by step."),
               chat("r2", "reasoning", "If today is Monday, what day is it in 10 days?"),
               chat("c1", "code", "Reverse a string in Python."),
               Prompt("m2", "math", [{"role": "user", "content": "What is 2 + 2?"},
                                     {"role": "assistant", "content": "4"}]),
               Prompt("t", USER_TEXT, [{"role": "user", "content": "math text"}])]
    cot, skipped = augment.cot_prompts(prompts, ["math", "reasoning"])
    assert [p.id for p in cot] == ["m1~cot", "r2~cot", "m2~cot"] and skipped == 1
    assert all(p.messages[-1]["role"] == "user" and p.messages[-1]["content"].endswith(augment.COT_SUFFIX)
               for p in cot)
    assert cot[0].messages[0]["content"].startswith("What is 47 + 38?") and cot[0].category == "math"
    assert cot[2].messages == [{"role": "user", "content": f"What is 2 + 2?\n\n{augment.COT_SUFFIX}"}]
    assert augment.cot_prompts(prompts, ["code"])[0][0].id == "c1~cot"


# ---------------------------------------------------------------- multi-turn

def test_follow_up_mask_covers_the_answer_turns_only(tiny):
    _, tok = tiny
    base = answer("b1", "Cats and fish need little space.")
    bundled_mt = next(p for p in load_bundled() if p.category == "multi_turn")
    given = {"id": bundled_mt.id, "category": "multi_turn", "messages": bundled_mt.messages,
             "answer": "A fish tank.", "finished": True}
    cot = {**answer("c", "Step 1."), "source": "chain_of_thought"}
    unfinished = answer("u", "and so on", finished=False)
    follow = augment.follow_up_prompts([base, given, cot, unfinished], 5, seed=0)
    assert sorted(p.id for p in follow) == ["b1~turn2", f"{bundled_mt.id}~turn2"]
    f = next(p for p in follow if p.id == "b1~turn2")
    assert [m["role"] for m in f.messages] == ["user", "assistant", "user"]
    assert f.messages[1]["content"] == base["answer"] and f.messages[2]["content"] in augment.FOLLOW_UPS
    end = "<|im_end|>"
    rec = {"id": f.id, "category": f.category, "messages": f.messages, "answer": "Because they are small.",
           "finished": True, "loss_turns": augment.loss_turns(base)}
    row = tokenize_records(tok, [rec], max_len=4096)[0]
    masked = tok.decode([t for t, m in zip(row["input_ids"], row["loss_mask"]) if m])
    assert masked == base["answer"] + end + "Because they are small." + end
    runs = sum(1 for a, b in zip([0] + row["loss_mask"], row["loss_mask"]) if b and not a)
    assert runs == 2 and row["loss_mask"][-1] == 1
    # without loss_turns only the last answer is trained on (the old behaviour)
    row0 = tokenize_records(tok, [{k: v for k, v in rec.items() if k != "loss_turns"}], max_len=4096)[0]
    assert tok.decode([t for t, m in zip(row0["input_ids"], row0["loss_mask"]) if m]) == "Because they are small." + end
    # a follow-up on a bundled chat: its hand-written assistant turn stays out of the loss
    g = next(p for p in follow if p.id != "b1~turn2")
    grec = {"id": g.id, "category": g.category, "messages": g.messages, "answer": "Sure.", "finished": True,
            "loss_turns": augment.loss_turns(given)}
    row = tokenize_records(tok, [grec], max_len=4096)[0]
    masked = tok.decode([t for t, m in zip(row["input_ids"], row["loss_mask"]) if m])
    assert masked == "A fish tank." + end + "Sure." + end
    assert bundled_mt.messages[1]["content"] not in masked
    with pytest.raises(ValueError, match="not an assistant turn"):
        tokenize_records(tok, [{**rec, "loss_turns": [0]}], max_len=4096)


# ---------------------------------------------------------------- balancing

def _cat_records(counts: dict[str, int]) -> list[dict]:
    return [answer(f"{c}-{i}", "x y z", category=c) for c, n in counts.items() for i in range(n)] + \
        [{"id": "raw", "category": USER_TEXT, "text": "t"}]


def test_balance_cap_and_oversample():
    recs = _cat_records({"a": 9, "b": 4, "c": 2})
    capped, info = augment.balance(recs, "cap", seed=0)
    assert info["target"] == 4 and info["before"] == {"a": 9, "b": 4, "c": 2}
    assert info["after"] == {"a": 4, "b": 4, "c": 2} == dict(Counter(r["category"] for r in capped if r["id"] != "raw"))
    assert any(r["id"] == "raw" for r in capped)
    assert augment.balance(recs, "cap", seed=0)[0] == capped and augment.balance(recs, "cap", seed=1)[0] != capped
    over, info = augment.balance(recs, "oversample", seed=0)
    assert info["after"] == {"a": 9, "b": 9, "c": 9} and over[:len(recs)] == recs
    assert len({r["id"] for r in over}) == len(over)
    assert Counter(r["id"].split("~")[0] for r in over if r["category"] == "c") == {"c-0": 5, "c-1": 4} or \
        Counter(r["id"].split("~")[0] for r in over if r["category"] == "c") == {"c-0": 4, "c-1": 5}
    same, info = augment.balance(recs, "none", seed=0)
    assert same == recs and info["after"] == info["before"]


# ---------------------------------------------------------------- the data stage

@pytest.fixture(scope="module")
def user_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("aug") / "given.jsonl"
    lines = [{"category": "user", "messages": [{"role": "user", "content": f"Tell me about the number {i}."},
                                               {"role": "assistant", "content": f"{i} is a number after {i - 1}."}]}
             for i in range(1, 7)]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return p


SCRIPTED = {  # self-instruct replies in the stage tests; "code" copies a held-out prompt (see scripted_teacher)
    "factual_qa": "Which planet in our solar system has the most moons?",
    "instruction": "List four ways to save water at home.",
    "math": "A baker makes 36 rolls and sells 29. How many are left?",
    "reasoning": "If all bloops are razzies and some razzies are lazzies, must some bloops be lazzies?",
    "summarization": "ok",
}


def scripted_teacher(cfg, inner):
    """``generate_answers`` with scripted self-instruct replies (a random teacher never ends a reply, so
    it never writes a usable instruction); everything else is the real tiny teacher's."""
    prompts = load_bundled() + load_user_file(Path(cfg.data.prompts[0]))
    _, held = split(data_stage.balanced_cap(prompts, cfg.data.max_prompts, cfg.seed), cfg.data.heldout_fraction,
                    cfg.seed)
    script = {**SCRIPTED, "code": next(p.text for p in held if p.category == "code")}

    def generate(model, tok, ps, **k):
        real = inner(model, tok, [p for p in ps if not p.id.startswith("~self-instruct~")], **k)
        fake = {p.id: {"id": p.id, "category": p.category, "messages": p.messages,
                       "answer": script[p.category], "finished": True}
                for p in ps if p.id.startswith("~self-instruct~")}
        by_id = {r["id"]: r for r in real}
        return [fake.get(p.id) or by_id[p.id] for p in ps]

    return generate


def run_data_stage(tmp_path, tiny, user_file, **data):
    cfg = resolve({"out": str(tmp_path / "out"), "data": {"prompts": [str(user_file)], "max_prompts": 30,
                                                          "max_new_tokens": 6, "gen_batch_size": 8,
                                                          "max_len": 96, **data}})
    session = Session(cfg, Console(quiet=True), progress=False)
    session._teacher = tiny
    folder = tmp_path / "stage"
    folder.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data_stage, "generate_answers", scripted_teacher(cfg, data_stage.generate_answers))
        summary = data_stage.run(StageContext(cfg, None, folder, {"teacher": None}, session))
    return summary, folder


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, chatty, user_file):
    return run_data_stage(tmp_path_factory.mktemp("plain"), chatty, user_file)


@pytest.fixture(scope="module")
def augmented_run(tmp_path_factory, chatty, user_file):
    return run_data_stage(tmp_path_factory.mktemp("aug"), chatty, user_file, **AUGMENT)


def test_stage_defaults_write_what_they_wrote_before(default_run):
    summary, folder = default_run
    assert set(summary) == {"prompts", "categories", "train", "heldout"}
    assert sorted(p.name for p in folder.iterdir()) == ["heldout.jsonl", "heldout_tokens.jsonl", "train.jsonl",
                                                        "train_tokens.jsonl"]
    assert not any("source" in r or "loss_turns" in r for r in read_jsonl(folder / "train.jsonl"))


def test_stage_with_augmentation(default_run, augmented_run):
    plain, plain_dir = default_run
    summary, folder = augmented_run
    train, held = read_jsonl(folder / "train.jsonl"), read_jsonl(folder / "heldout.jsonl")
    # held-out untouched, and nothing generated copies it
    assert held == read_jsonl(plain_dir / "heldout.jsonl")
    assert read_jsonl(folder / "heldout_tokens.jsonl") == read_jsonl(plain_dir / "heldout_tokens.jsonl")
    held_texts = {augment.normalize(m["content"]) for r in held for m in r["messages"]}
    assert not any(augment.normalize(r["messages"][-1]["content"]) in held_texts
                   for r in train if r.get("source") == "self_instruct")
    sources = Counter(r.get("source", "original") for r in train if "~rep" not in r["id"])

    si = summary["self_instruct"]
    assert (si["requests"], si["candidates"], si["kept"]) == (6, 5, 4)
    assert si["unusable_replies"] == {"truncated": 0, "unparsable": 1}
    assert si["dedup"]["dropped_heldout_copy"] == 1 and si["dedup"]["dropped_near_duplicate"] == 0
    assert sources["self_instruct"] == si["kept"]
    new = {r["messages"][0]["content"]: r for r in train if r.get("source") == "self_instruct"}
    assert set(new) == {v for v in SCRIPTED.values() if v != "ok"}
    assert all(new[v]["category"] == c for c, v in SCRIPTED.items() if v != "ok")
    assert all("answer" in r for r in new.values())  # answered by the teacher
    log = read_jsonl(folder / "self_instruct.jsonl")
    assert len(log) == 6 and sum(i["kept"] for e in log for i in e["instructions"]) == si["kept"]
    assert next(e for e in log if e["category"] == "code")["instructions"][0]["reason"] == "heldout_copy"
    # the new math prompt got its step-by-step variant too
    assert any(r["id"] == new[SCRIPTED["math"]]["id"] + "~cot" for r in train)

    cot = summary["chain_of_thought"]
    assert cot["records"] > 0 and set(cot["by_category"]) <= {"math", "reasoning"}
    cot_recs = [r for r in train if r.get("source") == "chain_of_thought" and "~rep" not in r["id"]]
    assert cot_recs and {r["category"] for r in cot_recs} <= {"math", "reasoning"}
    assert all(r["messages"][-1]["content"].endswith(augment.COT_SUFFIX) for r in cot_recs)

    filters = summary["filters"]
    assert set(filters) == {"checked", "kept", "dropped", "empty", "too_long", "repetitive", "dropped_by_source"}
    assert filters["checked"] == filters["kept"] + filters["dropped"]
    assert filters["repetitive"]["kept"] == filters["kept"]
    assert sum(filters["dropped_by_source"].values()) == filters["dropped"]
    assert len(read_jsonl(folder / "dropped.jsonl")) == filters["dropped"]

    mt = summary["multi_turn"]
    bases = [r for r in train if "answer" in r and r["finished"] and r["answer"].strip() and "~rep" not in r["id"]
             and r.get("source") in (None, "self_instruct")]
    assert bases and mt["records"] == min(3, len(bases))  # the user's chats carry finished answers
    turn2 = [r for r in train if r.get("source") == "multi_turn" and "~rep" not in r["id"]]
    assert len(turn2) == mt["kept"]
    assert all(r["messages"][r["loss_turns"][-1]]["role"] == "assistant" for r in turn2)

    bal = summary["balance"]
    assert bal["mode"] == "oversample" and len(set(bal["after"].values())) == 1
    assert summary["train"]["examples"] == len(train) == len(read_jsonl(folder / "train_tokens.jsonl"))
    assert len({r["id"] for r in train}) == len(train)
    gen = summary["generated"]
    assert sum(v.get("self_instruct", 0) for v in gen.values()) == si["kept"]
    assert sum(v.get("chain_of_thought", 0) for v in gen.values()) == cot["records"]
    assert sum(v.get("multi_turn", 0) for v in gen.values()) == mt["records"]
    # every checked record is in train or in dropped.jsonl
    checked_ids = {r["id"] for r in train if "answer" in r and "~rep" not in r["id"]} | \
        {r["id"] for r in read_jsonl(folder / "dropped.jsonl")}
    assert len(checked_ids) == filters["checked"]


def test_stage_resumes_generations_from_its_cache(tmp_path, chatty, user_file, augmented_run, monkeypatch):
    """A stage killed mid-way and run again generates only what is missing and ends the same."""
    summary, folder = augmented_run
    calls = {"n": 0, "prompts": 0}
    real = data_stage.generate_answers

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(data_stage, "generate_answers", dying)
    with pytest.raises(KeyboardInterrupt):
        run_data_stage(tmp_path, chatty, user_file, **AUGMENT)
    cached = len((tmp_path / "stage" / "answers.jsonl").read_text().splitlines())
    assert cached > 0

    def counting(model, tok, prompts, **k):
        calls["prompts"] += len(prompts)
        return real(model, tok, prompts, **k)

    monkeypatch.setattr(data_stage, "generate_answers", counting)
    again, again_dir = run_data_stage(tmp_path, chatty, user_file, **AUGMENT)
    assert again == summary
    for name in ("train.jsonl", "train_tokens.jsonl", "heldout_tokens.jsonl", "self_instruct.jsonl"):
        assert (again_dir / name).read_text() == (folder / name).read_text(), name
    total = summary["prompts"] + summary["self_instruct"]["requests"] + summary["self_instruct"]["kept"] + \
        summary["chain_of_thought"]["records"] + summary["multi_turn"]["records"]
    assert calls["prompts"] == total - cached  # each prompt is passed to the teacher once, over both runs
