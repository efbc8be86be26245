"""The checkable task set: generated answers, answer extraction, intervals, scoring and a model run."""

from __future__ import annotations

import re

import pytest

from edgedistill.evaluate import tasks as T
from edgedistill.evaluate.tasks import (FACTS, FAMILIES, Task, correct, extract, make_tasks, messages,
                                        paired_difference, run_tasks, score, wilson_interval)


@pytest.fixture(scope="module")
def many():
    return make_tasks(50, seed=7)  # within every family's pool


def fam(ts, family):
    return [t for t in ts if t.family == family]


# ---------------------------------------------------------------- the generator

def test_every_family_ids_unique_and_stable(many):
    assert [f for f in FAMILIES if fam(many, f)] == list(FAMILIES)
    assert all(len(fam(many, f)) == 50 for f in FAMILIES)
    ids = [t.id for t in many]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(rf"{t.family}-\d{{3}}", t.id) for t in many)
    assert fam(many, "arithmetic")[4].id == "arithmetic-004"
    for f in FAMILIES:  # no repeated question within a family
        qs = [t.question for t in fam(many, f)]
        assert len(set(qs)) == len(qs)


def test_deterministic_for_a_seed_and_different_for_another():
    assert make_tasks(20, seed=3) == make_tasks(20, seed=3)
    other = make_tasks(20, seed=4)
    for f in FAMILIES:
        assert [t.question for t in fam(make_tasks(20, seed=3), f)] != [t.question for t in fam(other, f)]
    # one family's tasks do not depend on how many are drawn
    assert make_tasks(5, seed=3)[:5] == make_tasks(20, seed=3)[:5]


def test_finite_pools_cap_the_count():
    ts = make_tasks(1000, seed=0)
    assert len(fam(ts, "multiple_choice")) == len(FACTS) >= 40
    assert len(fam(ts, "string")) == T.available()["string"]
    assert len(fam(ts, "unit_conversion")) == T.available()["unit_conversion"] == 4 * 2 * 98
    assert len(fam(ts, "arithmetic")) == 1000


def test_arithmetic_answers(many):
    ops = set()
    for t in fam(many, "arithmetic"):
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*/]) (\d+)\?", t.question).groups()
        a, b = int(a), int(b)
        assert 1 <= a <= 999 and 1 <= b <= 999
        ops.add(op)
        if op == "/":
            assert a % b == 0
        assert int(t.answer) == {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
        assert int(t.answer) >= 0
    assert ops == set("+-*/")


def test_word_problem_answers(many):
    seen = set()
    for t in fam(many, "word_problem"):
        q, n = t.question, [int(x) for x in re.findall(r"\d+", t.question)]
        if "change" in q:
            want, kind = n[2] - n[0] * n[1], "change"
        elif "spend" in q:
            want, kind = n[0] * n[1], "shopping"
        elif "equally" in q:
            want, kind = n[0] // n[1], "sharing"
            assert n[0] % n[1] == 0
        elif "per hour" in q:
            want, kind = n[0] * n[1], "speed"
        elif "older" in q or "will" in q:
            want, kind = n[0] + n[1], "age+"
        else:
            assert "ago" in q
            want, kind = n[0] - n[1], "age-"
        assert t.answer == str(want) and want > 0, q
        seen.add(kind)
    assert seen == {"change", "shopping", "sharing", "speed", "age+", "age-"}


def test_unit_conversion_answers(many):
    factor = {"meters": 1000, "grams": 1000, "minutes": 60, "milliliters": 1000}
    bigger = {"kilometers": "meters", "kilograms": "grams", "hours": "minutes", "liters": "milliliters"}
    units = set()
    for t in fam(many, "unit_conversion"):
        to, x, frm = re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\?", t.question).groups()
        units.add(frozenset((to, frm)))
        if to in factor:
            assert bigger[frm] == to and t.answer == str(int(x) * factor[to])
        else:
            assert bigger[to] == frm and int(t.answer) * factor[frm] == int(x)
    assert len(units) == 4


def test_string_and_list_answers(many):
    for t in fam(many, "string"):
        w = re.search(r'word "(\w+)"', t.question).group(1)
        if t.question.startswith("Reverse"):
            assert t.answer == "".join(reversed(w)) != w
        elif "uppercase" in t.question:
            assert t.answer == w.upper() and t.case_sensitive
        elif "first letter" in t.question:
            assert t.answer == w[0]
        elif "last letter" in t.question:
            assert t.answer == w[-1]
        else:
            c = re.search(r'letter "(\w)"', t.question).group(1)
            assert t.kind == "number" and int(t.answer) == sum(ch == c for ch in w)
    for t in fam(many, "list"):
        xs = [int(x) for x in t.question.split(":")[1].strip(" .?").split(", ")]
        want = {"Sort": ", ".join(str(x) for x in sorted(xs)), "What is the largest": str(max(xs)),
                "What is the smallest": str(min(xs)), "How many": str(len(xs)), "What is the sum": str(sum(xs))}
        key = next(k for k in want if t.question.startswith(k))
        assert t.answer == want[key]
        assert t.kind == ("list" if key == "Sort" else "number")


def test_multiple_choice_facts():
    assert len(FACTS) >= 40
    assert len({f[0] for f in FACTS}) == len(FACTS)
    for q, right, *wrong in FACTS:
        assert len(wrong) == 3 and len({right, *wrong}) == 4, q
    for t in fam(make_tasks(100, seed=1), "multiple_choice"):
        assert len(t.choices) == 4 and t.answer in "ABCD"
        fact = next(f for f in FACTS if t.question.startswith(f[0] + "\n"))
        assert t.choices[ord(t.answer) - ord("A")] == fact[1]
        assert sorted(t.choices) == sorted(fact[1:])
        assert t.question.endswith(f"D) {t.choices[3]}")
    # the right letter is not always the same one
    assert len({t.answer for t in fam(make_tasks(100, seed=1), "multiple_choice")}) == 4


def test_messages_direct_and_step_by_step():
    t = make_tasks(1, seed=0)[0]
    direct, = messages(t, step_by_step=False)
    step, = messages(t, step_by_step=True)
    assert direct["role"] == step["role"] == "user"
    assert direct["content"].startswith(t.question) and "only the number" in direct["content"]
    assert "step by step" in step["content"] and '"Answer: <number>"' in step["content"]
    assert "step by step" not in direct["content"]


# ---------------------------------------------------------------- extraction and checking

NUM = Task("x-000", "arithmetic", "What is 600 + 400?", "1000", "number")


@pytest.mark.parametrize("text, ok", [
    ("1000", True), ("1,000", True), ("1000.", True), ("1000.0", True), ("The answer is 1000.", True),
    ("600 + 400 = 1000", True),  # the last number, not the first
    ("First 600 + 400.\nThat makes 1000 in all.\nAnswer: 1,000", True),
    ("Answer: 1000\n\nI added 600 and 400 to get it, 2 steps.", True),  # the Answer: line beats later numbers
    ("Answer:\n1000", True), ("**Answer:** 1000", True), ("answer: 1000", True),
    ("999", False), ("1000.5", False), ("10000", False), ("1000 is close, but 1001", False),
    ("Answer: 999\n(1000 would be wrong)", False), ("one thousand", False), ("", False),
    ("Answer: 1000\nWait. Answer: 1001", False),  # the last Answer: counts
])
def test_number(text, ok):
    assert correct(NUM, text) is ok


def test_number_negative_and_extract():
    neg = Task("x-001", "arithmetic", "?", "-5", "number")
    assert correct(neg, "-5") and not correct(neg, "5")
    assert extract(NUM, "That is 1,000.") == "1000"
    assert extract(NUM, "no digits here") is None


REV = Task("string-000", "string", 'Reverse the letters of the word "apple".', "elppa", "text")
UP = Task("string-001", "string", 'Write the word "apple" in uppercase letters.', "APPLE", "text",
          case_sensitive=True)


@pytest.mark.parametrize("task, text, ok", [
    (REV, "elppa", True), (REV, '"elppa"', True), (REV, "Elppa.", True), (REV, "  'elppa'  \n", True),
    (REV, "The word backwards:\nelppa", True), (REV, "Reversed it.\nAnswer: elppa.", True),
    (REV, "Answer: **elppa**", True),
    (REV, "apple", False), (REV, "elpa", False), (REV, "Answer: elppa e", False), (REV, "", False),
    (UP, "APPLE", True), (UP, "Answer: APPLE.", True), (UP, "apple", False), (UP, "Apple", False),
])
def test_text(task, text, ok):
    assert correct(task, text) is ok


LST = Task("list-000", "list", "Sort these numbers from smallest to largest: 9, 2, 5.", "2, 5, 9", "list")


@pytest.mark.parametrize("text, ok", [
    ("2, 5, 9", True), ("2,5,9", True), ("[2, 5, 9]", True), ("2 5 9.", True),
    ("Smallest first.\nAnswer: 2, 5, 9", True), ("The list 9, 2, 5 sorted:\n2, 5, 9", True),
    ("9, 5, 2", False), ("2, 5", False), ("2, 5, 9, 9", False), ("Answer: 9, 2, 5", False),
])
def test_list(text, ok):
    assert correct(LST, text) is ok


MC = Task("multiple_choice-000", "multiple_choice", "What is the capital of France?\nA) Lyon\nB) Paris\n"
          "C) Nice\nD) Marseille", "B", "choice", choices=("Lyon", "Paris", "Nice", "Marseille"))


@pytest.mark.parametrize("text, ok", [
    ("B", True), ("(B)", True), ("B)", True), ("B.", True), ("B) Paris", True), ("B. Paris", True),
    ("Paris", True), ("paris.", True), ("**B**", True), ("The answer is B.", True),
    ("Paris is the capital of France.\nAnswer: B", True), ("Let me think.\nAnswer: (B) Paris", True),
    ("A", False), ("D) Marseille", False), ("Lyon", False), ("Answer: C", False),
    ("A city in France is Paris.", False),  # "A" as an article is not an answer; the sentence is no option
    ("", False),
])
def test_choice(text, ok):
    assert correct(MC, text) is ok


def test_correct_answers_pass_and_wrong_ones_fail(many):
    for t in many:
        assert correct(t, t.answer), t
        assert correct(t, f"Let me think about it.\nAnswer: {t.answer}"), t
        wrong = {"number": lambda a: str(int(a) + 1), "text": lambda a: a + "x", "list": lambda a: a + ", 99",
                 "choice": lambda a: "ABCD"[("ABCD".index(a) + 1) % 4]}[t.kind](t.answer)
        assert not correct(t, wrong), t
        assert not correct(t, f"Answer: {wrong}"), t


# ---------------------------------------------------------------- statistics

def test_wilson_hand_computed():
    # z = 1.96: center = (k + z^2/2) / (n + z^2), half = z*sqrt(k(n-k)/n + z^2/4) / (n + z^2)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27754), abs=1e-5)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.72246, 1.0), abs=1e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for k, n in [(0, 1), (1, 3), (7, 20), (99, 100), (100, 100)]:
        lo, hi = wilson_interval(k, n)
        assert 0.0 <= lo <= k / n <= hi <= 1.0 and hi > lo
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_score_half_right(many):
    answers = [t.answer if i % 2 == 0 else "Answer: nothing at all" for i, t in enumerate(many)]
    s = score(answers, many)
    assert s["accuracy"] == 0.5 and s["correct"] == len(many) // 2 and s["n"] == len(many)
    assert s["ci95"] == list(wilson_interval(len(many) // 2, len(many)))
    assert set(s["by_family"]) == set(FAMILIES)
    for f, v in s["by_family"].items():
        assert v == {"accuracy": 0.5, "ci95": list(wilson_interval(25, 50)), "correct": 25, "n": 50}
    assert score([], [])["n"] == 0
    with pytest.raises(ValueError):
        score(["1"], [])


def _records(a, b, c, d):
    """Paired records from a 2x2 table: a both right, b only A right, c only B right, d both wrong."""
    ra, rb = [], []
    for cell, (x, y, m) in enumerate([(True, True, a), (True, False, b), (False, True, c), (False, False, d)]):
        for j in range(m):
            ra.append({"id": f"{cell}-{j}", "correct": x})
            rb.append({"id": f"{cell}-{j}", "correct": y})
    return ra, rb


def test_paired_difference():
    # Newcombe (1998), Statistics in Medicine 17:2635, Table II, example 36/12/2/0: method 10 gives
    # 0.0569 to 0.3404
    d = paired_difference(*_records(36, 12, 2, 0))
    assert d["difference"] == pytest.approx(0.2) and d["ci95"] == pytest.approx([0.0569, 0.3404], abs=1e-4)
    assert d["differs"] and d["a_only"] == 12 and d["b_only"] == 2 and d["n"] == 50
    # swapping the models negates the difference and mirrors the interval
    r = paired_difference(*reversed(_records(36, 12, 2, 0)))
    assert r["difference"] == pytest.approx(-0.2) and r["ci95"] == pytest.approx([-0.3404, -0.0569], abs=1e-4)
    # identical results: no difference, but an interval of honest width, not zero
    same = paired_difference(*_records(10, 0, 0, 0))
    assert same["difference"] == 0 and same["ci95"][0] < -0.2 and same["ci95"][1] > 0.2 and not same["differs"]
    # a small, balanced disagreement is noise
    assert not paired_difference(*_records(8, 5, 4, 9))["differs"]
    # records may come in any order; ids must match
    a, b = _records(3, 1, 1, 3)
    assert paired_difference(a, b[::-1]) == paired_difference(a, b)
    with pytest.raises(ValueError):
        paired_difference(a, b[:-1])


# ---------------------------------------------------------------- a model run

def test_run_tasks_tiny_model(tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import make_tiny_llama

    folder = make_tiny_llama(tmp_path / "m", tokenizer_dir, layers=2, hidden=32, intermediate=64, heads=2,
                             kv_heads=1)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ts = [t for t in make_tasks(2, seed=0) if t.id.endswith("-000")][:4]
    for step in (False, True):
        s, records = run_tasks(model, tok, ts, step_by_step=step, max_new_tokens=4, batch_size=3)
        assert [r["id"] for r in records] == [t.id for t in ts]
        assert all(isinstance(r["output"], str) for r in records)
        assert [r["answer"] for r in records] == [t.answer for t in ts]
        assert [r["correct"] for r in records] == [correct(t, r["output"]) for t, r in zip(ts, records)]
        assert s == score([r["output"] for r in records], ts)
        assert s["n"] == len(ts) and set(s["by_family"]) == {t.family for t in ts}
