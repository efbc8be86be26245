"""Data stage: bundled prompts, user files, split, teacher answers and their tokenization."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from edgedistill.data.prompts import USER_TEXT, Prompt, load_bundled, load_user_file, split
from edgedistill.data.teacher_answers import generate_answers, read_jsonl, tokenize_records, write_jsonl
from edgedistill.errors import UserError

CATEGORIES = {"instruction", "factual_qa", "reasoning", "math", "code", "summarization", "writing", "multi_turn"}


# ---------------------------------------------------------------- bundled set

def test_bundled_set_size_categories_and_ids():
    prompts = load_bundled()
    assert len(prompts) >= 320
    counts = Counter(p.category for p in prompts)
    assert CATEGORIES <= set(counts)
    assert all(counts[c] >= 35 for c in CATEGORIES), counts
    ids = [p.id for p in prompts]
    assert len(ids) == len(set(ids))
    assert all(p.id.startswith(p.category + "-") for p in prompts)


def test_bundled_messages_are_valid_chats():
    for p in load_bundled():
        assert p.messages and p.messages[-1]["role"] == "user", p.id
        assert all(set(m) == {"role", "content"} and m["content"].strip() for m in p.messages), p.id
        roles = [m["role"] for m in p.messages]
        assert all(r in ("user", "assistant") for r in roles), p.id
        assert all(a != b for a, b in zip(roles, roles[1:])), p.id  # turns alternate
        if p.category == "multi_turn":
            assert len(p.messages) >= 3, p.id
        else:
            assert len(p.messages) == 1, p.id


# ---------------------------------------------------------------- split

def test_split_deterministic_stratified_disjoint():
    prompts = load_bundled()
    train, held = split(prompts, 0.1, seed=7)
    train2, held2 = split(list(reversed(prompts)), 0.1, seed=7)
    assert [p.id for p in held] == [p.id for p in split(prompts, 0.1, seed=7)[1]]
    assert {p.id for p in held} == {p.id for p in held2} and {p.id for p in train} == {p.id for p in train2}
    assert {p.id for p in train}.isdisjoint({p.id for p in held})
    assert len(train) + len(held) == len(prompts)
    assert {p.category for p in held} == {p.category for p in prompts}
    assert {p.category for p in train} == {p.category for p in prompts}
    assert {p.id for p in split(prompts, 0.1, seed=8)[1]} != {p.id for p in held}


def test_split_small_categories_and_bad_fraction():
    prompts = [Prompt("a-1", "a", [{"role": "user", "content": "x"}]),
               Prompt("b-1", "b", [{"role": "user", "content": "y"}]),
               Prompt("b-2", "b", [{"role": "user", "content": "z"}])]
    train, held = split(prompts, 0.01, seed=0)
    assert {p.category for p in held} == {"a", "b"}
    assert [p.category for p in train] == ["b"]
    assert split(prompts, 0.0, seed=0) == (prompts, [])
    with pytest.raises(ValueError):
        split(prompts, 1.0, seed=0)


# ---------------------------------------------------------------- user files

def _write(tmp_path, name, content):
    p = tmp_path / name
    (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
    return p


def test_user_jsonl_all_forms(tmp_path):
    lines = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "How are you?"}]},
        {"prompt": "Name a color.", "id": "mine", "category": "colors"},
        {"text": "Some raw text the student should model."},
    ]
    path = _write(tmp_path, "u.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    ps = load_user_file(path)
    assert len(ps) == 3
    assert len(ps[0].messages) == 3 and ps[0].category == "user"
    assert ps[1].id == "mine" and ps[1].category == "colors"
    assert ps[1].messages == [{"role": "user", "content": "Name a color."}]
    assert ps[2].category == USER_TEXT and ps[2].text.startswith("Some raw text")
    assert len({p.id for p in ps}) == 3


def test_user_txt_paragraphs(tmp_path):
    path = _write(tmp_path, "notes.txt", "First paragraph\nstill first.\n\n\n  \nSecond one.\r\n\r\nThird.\n")
    ps = load_user_file(path)
    assert [p.text for p in ps] == ["First paragraph\nstill first.", "Second one.", "Third."]
    assert all(p.category == USER_TEXT for p in ps)


@pytest.mark.parametrize("name,content,needle", [
    ("empty.jsonl", "", "empty"),
    ("blank.txt", "\n  \n\n", "empty"),
    ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": "oops"\n', "bad.jsonl:2: malformed JSON"),
    ("latin.txt", "fine line\ncaf\xe9\n".encode("latin-1"), "latin.txt:2: not valid UTF-8"),
    ("missing.jsonl", '{"prompt": "ok"}\n{"question": "what?"}\n', "missing.jsonl:2: missing field"),
    ("norole.jsonl", '{"messages": [{"content": "hi"}]}\n', "norole.jsonl:1: message 0"),
    ("badrole.jsonl", '{"messages": [{"role": "bot", "content": "hi"}]}\n', "role 'bot'"),
    ("emptyprompt.jsonl", '{"prompt": "  "}\n', "emptyprompt.jsonl:1: 'prompt'"),
    ("notobj.jsonl", '[1, 2]\n', "notobj.jsonl:1: expected a JSON object"),
    ("dup.jsonl", '{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', "duplicate id"),
    ("prompts.csv", "a,b\n", "unsupported"),
])
def test_user_file_errors(tmp_path, name, content, needle):
    path = _write(tmp_path, name, content)
    with pytest.raises(UserError) as e:
        load_user_file(path)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and str(path) in msg


def test_user_file_not_found(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_user_file(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------- teacher answers

@pytest.fixture(scope="module")
def tiny(tiny_teacher_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(tiny_teacher_dir), AutoTokenizer.from_pretrained(tiny_teacher_dir)


def _sample_prompts():
    bundled = load_bundled()
    by_cat = {}
    for p in bundled:
        by_cat.setdefault(p.category, p)
    return list(by_cat.values()) + [
        Prompt("t-1", USER_TEXT, [{"role": "user", "content": "Plain text for language modelling."}]),
        Prompt("given-1", "user", [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]),
    ]


def test_generate_answers_tiny_teacher(tiny):
    model, tok = tiny
    prompts = _sample_prompts()
    calls = []
    recs = generate_answers(model, tok, prompts, max_new_tokens=8, batch_size=3,
                            progress=lambda d, t: calls.append((d, t)))
    assert [r["id"] for r in recs] == [p.id for p in prompts]
    for p, r in zip(prompts, recs):
        assert r["category"] == p.category
        if p.category == USER_TEXT:
            assert r["text"] == p.text and "answer" not in r
        else:
            assert isinstance(r["answer"], str)
    assert recs[-1]["answer"] == "Hi!" and recs[-1]["messages"] == prompts[-1].messages[:1]
    assert calls[-1] == (len(prompts), len(prompts))
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))
    # greedy and independent of batching/padding
    again = generate_answers(model, tok, prompts, max_new_tokens=8, batch_size=1)
    assert [r.get("answer") for r in again] == [r.get("answer") for r in recs]


def test_tokenize_records_mask_covers_exactly_the_answer(tiny):
    _, tok = tiny
    prompts = [p for p in _sample_prompts() if p.category != USER_TEXT]
    recs = [{"id": p.id, "category": p.category, "messages": p.messages,
             "answer": f"Answer number {k}: 2 + 2 = 4.\nDone."} for k, p in enumerate(prompts)]
    recs.append({"id": "t-1", "category": USER_TEXT, "text": "Raw text here."})
    rows = tokenize_records(tok, recs, max_len=4096)
    assert len(rows) == len(recs)
    for rec, row in zip(recs, rows):
        ids, mask = row["input_ids"], row["loss_mask"]
        assert len(ids) == len(mask) and set(mask) <= {0, 1}
        if "text" in rec:
            assert all(mask) and tok.decode(ids) == rec["text"]
            continue
        first = mask.index(1)
        assert all(mask[first:]) and not any(mask[:first])
        assert tok.decode([t for t, m in zip(ids, mask) if m]) == rec["answer"] + "<|im_end|>"
        prompt_text = tok.apply_chat_template(rec["messages"], add_generation_prompt=True, tokenize=False)
        assert tok.decode(ids[:first]) == prompt_text
        assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    short = tokenize_records(tok, recs[:1], max_len=10)[0]
    assert len(short["input_ids"]) == 10 and short["input_ids"] == rows[0]["input_ids"][:10]


def test_generate_then_tokenize_roundtrip(tiny, tmp_path):
    model, tok = tiny
    recs = generate_answers(model, tok, _sample_prompts(), max_new_tokens=6, batch_size=4)
    rows = tokenize_records(tok, recs, max_len=512)
    for rec, row in zip(recs, rows):
        if "answer" in rec:
            masked = [t for t, m in zip(row["input_ids"], row["loss_mask"]) if m]
            assert tok.decode(masked) == rec["answer"] + "<|im_end|>"
    path = tmp_path / "sub" / "answers.jsonl"
    write_jsonl(path, recs)
    assert read_jsonl(path) == recs
    assert [p.name for p in path.parent.iterdir()] == ["answers.jsonl"]
