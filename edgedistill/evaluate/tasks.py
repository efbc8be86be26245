"""Checkable tasks: a bundled evaluation set whose answers are checked automatically (issue 9, item 2).

Six families -- arithmetic, word problems, unit conversions, string tasks, list tasks and hand-written
multiple-choice facts -- are generated from small tables with a seeded RNG, so the generator itself computes
every answer and a build can regenerate the same set from its seed instead of shipping a file. Answers are
scored by exact match after a light normalization of greedy generations, asked directly or "step by step",
and accuracies carry a 95% Wilson interval; ``paired_difference`` says whether two models (teacher and
student) differ on the same tasks beyond noise. Small models are the audience: prompts are short and each
says what form the answer must take.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from edgedistill.data.prompts import Prompt

FAMILIES = ("arithmetic", "word_problem", "unit_conversion", "string", "list", "multiple_choice")
KINDS = ("number", "text", "choice", "list")
LETTERS = "ABCD"


@dataclass(frozen=True)
class Task:
    id: str
    family: str
    question: str
    answer: str
    kind: str  # one of KINDS: how `extract` reads an output
    choices: tuple[str, ...] = ()  # the options A-D of a "choice" task, in the order shown
    case_sensitive: bool = False  # only "write X in uppercase": there the case is the whole task


# ---------------------------------------------------------------- data tables

# (question, correct option, three wrong options). Common knowledge with one defensible answer: facts whose
# conventional answer varies (number of continents, longest river, largest desert) are left out.
FACTS: tuple[tuple[str, str, str, str, str], ...] = (
    ("What is the capital of France?", "Paris", "Lyon", "Marseille", "Nice"),
    ("What is the capital of Japan?", "Tokyo", "Osaka", "Kyoto", "Nagoya"),
    ("What is the capital of Italy?", "Rome", "Milan", "Naples", "Venice"),
    ("What is the capital of Germany?", "Berlin", "Munich", "Hamburg", "Frankfurt"),
    ("What is the capital of Spain?", "Madrid", "Barcelona", "Seville", "Valencia"),
    ("What is the capital of the United Kingdom?", "London", "Manchester", "Liverpool", "Birmingham"),
    ("What is the capital of Egypt?", "Cairo", "Alexandria", "Luxor", "Giza"),
    ("What is the capital of Canada?", "Ottawa", "Toronto", "Vancouver", "Montreal"),
    ("What is the capital of Australia?", "Canberra", "Sydney", "Melbourne", "Perth"),
    ("What is the capital of Russia?", "Moscow", "Saint Petersburg", "Kazan", "Novosibirsk"),
    ("What is the capital of China?", "Beijing", "Shanghai", "Hong Kong", "Guangzhou"),
    ("What is the capital of Greece?", "Athens", "Sparta", "Thessaloniki", "Corinth"),
    ("What is the capital of the United States?", "Washington, D.C.", "New York City", "Los Angeles", "Chicago"),
    ("Which planet is closest to the Sun?", "Mercury", "Venus", "Earth", "Mars"),
    ("Which is the largest planet in the Solar System?", "Jupiter", "Saturn", "Neptune", "Earth"),
    ("Which planet is known as the Red Planet?", "Mars", "Venus", "Jupiter", "Mercury"),
    ("Which planet is best known for its bright rings?", "Saturn", "Mars", "Mercury", "Venus"),
    ("Which planet do people live on?", "Earth", "Mars", "Venus", "Jupiter"),
    ("What is the star at the center of our Solar System?", "The Sun", "Polaris", "Sirius", "The Moon"),
    ("What is the natural satellite of the Earth?", "The Moon", "The Sun", "Mars", "Venus"),
    ("What is the largest animal on Earth?", "Blue whale", "Elephant", "Giraffe", "Hippopotamus"),
    ("Which is the tallest animal?", "Giraffe", "Elephant", "Horse", "Camel"),
    ("Which of these animals is a mammal?", "Dolphin", "Shark", "Salmon", "Octopus"),
    ("How many legs does a spider have?", "8", "6", "10", "4"),
    ("How many legs does an insect have?", "6", "4", "8", "10"),
    ("Which of these animals lays eggs?", "Chicken", "Dog", "Cow", "Horse"),
    ("What do bees make?", "Honey", "Milk", "Silk", "Wool"),
    ("Which of these birds cannot fly?", "Penguin", "Eagle", "Sparrow", "Pigeon"),
    ("What does a caterpillar turn into?", "Butterfly", "Beetle", "Spider", "Bee"),
    ("At what temperature in degrees Celsius does water boil at sea level?", "100", "0", "50", "212"),
    ("At what temperature in degrees Celsius does water freeze?", "0", "100", "32", "-10"),
    ("Which gas do plants take from the air to make their food?", "Carbon dioxide", "Oxygen", "Nitrogen",
     "Helium"),
    ("Which gas do people need to breathe to stay alive?", "Oxygen", "Carbon dioxide", "Helium", "Hydrogen"),
    ("What is the chemical formula of water?", "H2O", "CO2", "O2", "NaCl"),
    ("What is the chemical symbol for gold?", "Au", "Ag", "Gd", "Go"),
    ("Which metal is liquid at room temperature?", "Mercury", "Iron", "Copper", "Aluminium"),
    ("What is the hardest natural material?", "Diamond", "Gold", "Iron", "Quartz"),
    ("What is frozen water called?", "Ice", "Steam", "Fog", "Dew"),
    ("What does a thermometer measure?", "Temperature", "Weight", "Speed", "Time"),
    ("Which organ pumps blood through the body?", "Heart", "Lungs", "Liver", "Kidneys"),
    ("How many days are in a week?", "7", "5", "6", "8"),
    ("How many months are in a year?", "12", "10", "11", "13"),
    ("How many days are in a leap year?", "366", "365", "364", "367"),
    ("How many hours are in a day?", "24", "12", "20", "48"),
    ("How many sides does a triangle have?", "3", "4", "5", "6"),
    ("How many sides does a hexagon have?", "6", "5", "7", "8"),
    ("What is the square root of 81?", "9", "8", "7", "11"),
    ("What is the smallest prime number?", "2", "1", "3", "0"),
    ("Which is the largest ocean?", "Pacific Ocean", "Atlantic Ocean", "Indian Ocean", "Arctic Ocean"),
    ("Which is the highest mountain above sea level?", "Mount Everest", "K2", "Kilimanjaro", "Mont Blanc"),
    ("Which is the largest country by area?", "Russia", "Canada", "China", "United States"),
    ("What is the main language spoken in Brazil?", "Portuguese", "Spanish", "English", "French"),
    ("What is the currency of Japan?", "Yen", "Won", "Yuan", "Dollar"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare", "Charles Dickens", "Jane Austen", "Mark Twain"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci", "Pablo Picasso", "Vincent van Gogh", "Claude Monet"),
    ("What color do you get by mixing blue and yellow paint?", "Green", "Purple", "Orange", "Red"),
    ("In which direction does the Sun rise?", "East", "West", "North", "South"),
    ("How many players does a soccer team have on the field?", "11", "9", "10", "12"),
)

# Common, non-palindromic words of 3-7 letters, so "reverse" always changes the word.
WORDS = ("apple", "table", "house", "river", "garden", "pencil", "window", "orange", "planet", "yellow",
         "bottle", "rabbit", "silver", "winter", "summer", "basket", "candle", "doctor", "forest", "letter",
         "monkey", "number", "pocket", "school", "ticket", "banana", "cat", "dog", "tree", "bird", "green",
         "water", "light", "music", "paper", "chair", "cloud", "stone")

NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kate", "Liam")
ITEMS = ("apples", "pencils", "notebooks", "stickers", "marbles", "cookies", "oranges", "cards")
VEHICLES = ("car", "train", "bus", "bicycle", "boat")

# (larger unit, smaller unit, how many smaller in one larger)
UNITS = (("kilometers", "meters", 1000), ("kilograms", "grams", 1000), ("hours", "minutes", 60),
         ("liters", "milliliters", 1000))


def _shopping(r: random.Random) -> tuple[str, int]:
    name, item, n, p = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 12), r.randint(2, 15)
    return f"{name} buys {n} {item} that cost {p} dollars each. How many dollars does {name} spend?", n * p


def _change(r: random.Random) -> tuple[str, int]:
    name, item, n, p = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 9), r.randint(2, 9)
    bill = next(b for b in (10, 20, 50, 100) if b > n * p)
    return (f"{name} buys {n} {item} at {p} dollars each and pays with a {bill}-dollar bill. "
            f"How many dollars of change does {name} get?"), bill - n * p


def _sharing(r: random.Random) -> tuple[str, int]:
    name, item, k, each = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 9), r.randint(2, 12)
    return (f"{name} has {k * each} {item} and shares them equally among {k} friends. "
            f"How many {item} does each friend get?"), each


def _speed(r: random.Random) -> tuple[str, int]:
    v, s, t = r.choice(VEHICLES), r.randint(2, 12) * 5, r.randint(2, 8)
    return f"A {v} travels at {s} kilometers per hour for {t} hours. How many kilometers does it travel?", s * t


def _age_older(r: random.Random) -> tuple[str, int]:
    a, b = r.sample(NAMES, 2)
    age, d = r.randint(3, 40), r.randint(2, 30)
    return f"{a} is {age} years old. {b} is {d} years older than {a}. How old is {b}?", age + d


def _age_future(r: random.Random) -> tuple[str, int]:
    a, age, d = r.choice(NAMES), r.randint(3, 60), r.randint(2, 20)
    return f"{a} is {age} years old. How old will {a} be in {d} years?", age + d


def _age_past(r: random.Random) -> tuple[str, int]:
    a, age = r.choice(NAMES), r.randint(12, 70)
    d = r.randint(2, age - 5)
    return f"{a} is {age} years old. How old was {a} {d} years ago?", age - d


WORD_PROBLEMS: tuple[Callable[[random.Random], tuple[str, int]], ...] = (
    _shopping, _change, _sharing, _speed, _age_older, _age_future, _age_past)


# ---------------------------------------------------------------- generators

def _arithmetic(r: random.Random, i: int) -> Task:
    def num() -> int:
        return r.randint(1, 10 ** r.randint(1, 3) - 1)

    op = "+-*/"[i % 4]
    if op == "/":  # exact: the dividend is built from divisor and quotient, and stays within 3 digits
        b = r.randint(2, 31)
        a = b * r.randint(2, 999 // b)
    else:
        a, b = num(), num()
        if op == "-" and a < b:  # no negative results: small models are asked what a shop till would show
            a, b = b, a
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    return Task("", "arithmetic", f"What is {a} {op} {b}?", str(value), "number")


def _word_problem(r: random.Random, i: int) -> Task:
    question, value = WORD_PROBLEMS[i % len(WORD_PROBLEMS)](r)
    return Task("", "word_problem", question, str(value), "number")


def _unit_pool() -> list[list[Task]]:
    """Every unit conversion, one list per unit pair and direction (a finite pool, like the string tasks)."""
    pools: list[list[Task]] = []
    for big, small, factor in UNITS:
        pools.append([Task("", "unit_conversion", f"How many {small} are in {x} {big}?", str(x * factor),
                           "number") for x in range(2, 100)])
        pools.append([Task("", "unit_conversion", f"How many {big} are in {x * factor} {small}?", str(x),
                           "number") for x in range(2, 100)])
    return pools


def _list(r: random.Random, i: int) -> Task:
    xs = [r.randint(1, 50) for _ in range(r.randint(3, 6))]
    shown = ", ".join(map(str, xs))
    op = i % 5
    if op == 0:
        return Task("", "list", f"Sort these numbers from smallest to largest: {shown}.",
                    ", ".join(map(str, sorted(xs))), "list")
    question, value = [
        None,
        (f"What is the largest number in this list: {shown}?", max(xs)),
        (f"What is the smallest number in this list: {shown}?", min(xs)),
        (f"How many numbers are in this list: {shown}?", len(xs)),
        (f"What is the sum of these numbers: {shown}?", sum(xs)),
    ][op]
    return Task("", "list", question, str(value), "number")


def _string_pool() -> list[list[Task]]:
    """Every string task, one list per operation: the pool is finite, so it is sampled without replacement."""
    pools: list[list[Task]] = [[], [], [], [], []]
    for w in WORDS:
        pools[0].append(Task("", "string", f'Reverse the letters of the word "{w}".', w[::-1], "text"))
        pools[1].append(Task("", "string", f'Write the word "{w}" in uppercase letters.', w.upper(), "text",
                             case_sensitive=True))
        pools[2].append(Task("", "string", f'What is the first letter of the word "{w}"?', w[0], "text"))
        pools[3].append(Task("", "string", f'What is the last letter of the word "{w}"?', w[-1], "text"))
        for c in sorted(set(w)):
            pools[4].append(Task("", "string", f'How many times does the letter "{c}" appear in the word "{w}"?',
                                 str(w.count(c)), "number"))
    return pools


def _take_round_robin(pools: list[list[Task]], n: int) -> list[Task]:
    out: list[Task] = []
    depth = 0
    while len(out) < n and any(depth < len(p) for p in pools):
        out.extend(p[depth] for p in pools if depth < len(p))
        depth += 1
    return out[:n]


def _multiple_choice(r: random.Random) -> list[Task]:
    out = []
    for question, right, *wrong in FACTS:
        options = [right, *wrong]
        r.shuffle(options)  # the right letter moves with the seed: a model that always says "A" scores ~25%
        shown = "\n".join(f"{LETTERS[k]}) {o}" for k, o in enumerate(options))
        out.append(Task("", "multiple_choice", f"{question}\n{shown}", LETTERS[options.index(right)], "choice",
                        choices=tuple(options)))
    r.shuffle(out)
    return out


GENERATED = {"arithmetic": _arithmetic, "word_problem": _word_problem, "list": _list}
POOLS = {"string": _string_pool, "unit_conversion": _unit_pool}


def available() -> dict[str, int | None]:
    """How many distinct tasks each family can give (None: effectively unlimited)."""
    out: dict[str, int | None] = {f: None for f in GENERATED}
    out.update({f: sum(len(p) for p in pools()) for f, pools in POOLS.items()}, multiple_choice=len(FACTS))
    return {f: out[f] for f in FAMILIES}


def make_tasks(per_family: int, seed: int) -> list[Task]:
    """``per_family`` tasks of each family, in FAMILIES order, ids ``family-NNN``; fewer for
    ``unit_conversion``, ``string`` and ``multiple_choice`` when their finite pools (``available()``) are
    smaller. Deterministic in ``seed``: each family draws from its own RNG, so one family's tasks do not
    depend on another's count; within a family the task kinds take turns, so any prefix is balanced."""
    if per_family < 0:
        raise ValueError("per_family must be >= 0")
    out: list[Task] = []
    for family in FAMILIES:
        r = random.Random(f"edgedistill-tasks:{seed}:{family}")  # str seeds hash the same in every process
        if family in POOLS:
            pools = POOLS[family]()
            for p in pools:
                r.shuffle(p)
            tasks = _take_round_robin(pools, per_family)
        elif family == "multiple_choice":
            tasks = _multiple_choice(r)[:per_family]
        else:
            tasks, seen, tries = [], set(), 0
            while len(tasks) < per_family:
                t = GENERATED[family](r, len(tasks))
                tries += 1
                if t.question not in seen:
                    seen.add(t.question)
                    tasks.append(t)
                elif tries > 100 * per_family:  # pragma: no cover - the spaces are far larger than any request
                    raise ValueError(f"cannot draw {per_family} distinct {family} tasks")
        out.extend(Task(f"{family}-{k:03d}", t.family, t.question, t.answer, t.kind, t.choices,
                        t.case_sensitive) for k, t in enumerate(tasks))
    return out


# ---------------------------------------------------------------- prompts

_FORM = {"number": ("Reply with only the number.", "number"),
         "text": ("Reply with only the answer.", "answer"),
         "choice": ("Reply with only the letter (A, B, C or D).", "letter"),
         "list": ("Reply with only the numbers, separated by commas.", "numbers")}


def messages(task: Task, step_by_step: bool) -> list[dict]:
    """The chat for ``task``: one user message, asking for the bare answer or for reasoning that ends with an
    ``Answer: ...`` line (which ``extract`` prefers)."""
    direct, what = _FORM[task.kind]
    if step_by_step:
        ask = f'Think step by step. Then write the final answer on its own last line as "Answer: <{what}>".'
    else:
        ask = direct
    return [{"role": "user", "content": f"{task.question}\n{ask}"}]


# ---------------------------------------------------------------- checking

_ANSWER = re.compile(r"answer\s*:", re.IGNORECASE)
# A thousands separator only in exact groups of three ("1,000"), so "3, 5" and "3,5" stay two numbers.
_NUMBER = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_INTEGER = re.compile(r"\d+")
_LETTER = re.compile(r"^[\s*\"'`]*\(?([A-D])(?:[).:]|[\s*\"'`]*$)")
_ANSWER_IS = re.compile(r"\banswer is:?\s*\(?([A-D])\b")
_STRIP = string.whitespace + string.punctuation + "\u201c\u201d\u2018\u2019"


def _answer_line(text: str) -> str | None:
    """The first non-empty line after the last "Answer:", or None when there is no "Answer:"."""
    found = list(_ANSWER.finditer(text))
    if not found:
        return None
    for line in text[found[-1].end():].splitlines():
        if line.strip():
            return line
    return ""


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _number(s: str) -> str | None:
    try:
        d = Decimal(s.replace(",", ""))
    except InvalidOperation:
        return None
    return str(int(d)) if d == d.to_integral_value() else format(d.normalize(), "f")


def _text(s: str, case_sensitive: bool) -> str:
    s = s.strip(_STRIP)
    return s if case_sensitive else s.casefold()


def extract(task: Task, text: str) -> str | None:
    """The answer ``text`` gives to ``task``, normalized like ``task.answer`` (None when there is none).

    The line after the last "Answer:" wins when present. Otherwise: a number is the *last* number in the
    text -- one rule for both prompt styles, since reasoning ends with its result and a restated sum
    ("12 + 30 = 42") puts the result last, while a bare direct answer is its own last number; text and
    lists are the last non-empty line; a letter is read from the first or last line ("B", "(B)", "B)",
    "B. Paris", "the answer is B") or matched as an option's full text.
    """
    line = _answer_line(text)
    if task.kind == "number":
        found = _NUMBER.findall(text if line is None else line)
        return _number(found[-1]) if found else None
    if task.kind == "list":
        found = _INTEGER.findall(_last_line(text) if line is None else line)
        return ", ".join(str(int(x)) for x in found) if found else None
    if task.kind == "text":
        got = _text(_last_line(text) if line is None else line, task.case_sensitive)
        return got or None
    if task.kind == "choice":
        candidates = [line] if line is not None else [ln for ln in (text.strip().splitlines()[:1]
                                                                   + [_last_line(text)]) if ln]
        options = {_text(o, False): LETTERS[k] for k, o in enumerate(task.choices)}
        for c in candidates:
            m = _LETTER.match(c)
            if m:
                return m.group(1)
            if _text(c, False) in options:
                return options[_text(c, False)]
        m = _ANSWER_IS.search(text if line is None else line)
        return m.group(1) if m else None
    raise ValueError(f"task {task.id}: unknown kind {task.kind!r}")


def correct(task: Task, text: str) -> bool:
    """Exact match of the extracted answer with the task's answer."""
    got = extract(task, text)
    if got is None:
        return False
    if task.kind == "number":
        return got == _number(task.answer)
    if task.kind == "text":
        return got == _text(task.answer, task.case_sensitive)
    return got == task.answer


# ---------------------------------------------------------------- statistics

def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Score interval for a proportion of k successes in n trials (``(0.0, 1.0)`` for n = 0)."""
    # Wilson, not the normal approximation p +- z*sqrt(p(1-p)/n): task sets are small, and at accuracies
    # near 0 or 1 the normal interval collapses to zero width (k = 0 or n) or leaves [0, 1].
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    zz = z * z
    center = (p + zz / (2 * n)) / (1 + zz / n)
    half = z * math.sqrt(p * (1 - p) / n + zz / (4 * n * n)) / (1 + zz / n)
    # at k = 0 or n the bound is 0 or 1 exactly; set it so rounding cannot leave k/n outside
    return (0.0 if k == 0 else max(0.0, center - half)), (1.0 if k == n else min(1.0, center + half))


def _summary(k: int, n: int) -> dict:
    lo, hi = wilson_interval(k, n)
    return {"accuracy": k / n if n else 0.0, "ci95": [lo, hi], "correct": k, "n": n}


def score(answers: list[str], tasks: list[Task]) -> dict:
    """``{"accuracy", "ci95": [lo, hi], "correct", "n", "by_family": {family: {same keys}}}`` for the model
    outputs ``answers[i]`` to ``tasks[i]``."""
    if len(answers) != len(tasks):
        raise ValueError(f"{len(answers)} answers for {len(tasks)} tasks")
    hits = [correct(t, a) for t, a in zip(tasks, answers)]
    fam: dict[str, list[int]] = {}
    for t, h in zip(tasks, hits):
        c = fam.setdefault(t.family, [0, 0])
        c[0] += h
        c[1] += 1
    return {**_summary(sum(hits), len(hits)), "by_family": {f: _summary(k, n) for f, (k, n) in fam.items()}}


def paired_difference(a_records: list[dict], b_records: list[dict], z: float = 1.96) -> dict:
    """Accuracy of A minus accuracy of B on the same tasks (records with "id" and "correct", e.g. from
    ``run_tasks``), with a 95% interval. Returns ``{"difference", "ci95": [lo, hi], "n", "a_accuracy",
    "b_accuracy", "a_only", "b_only", "differs"}``: ``a_only``/``b_only`` count tasks only that model got
    right, and ``differs`` is True when the interval excludes 0."""
    # Newcombe's hybrid score interval for paired proportions (1998, method 10): it combines the Wilson
    # intervals of the two accuracies with the correlation of the pairs. The normal interval on per-task
    # differences shrinks to zero width when every difference is equal (both models right on every task,
    # or no discordant pairs) and undercovers at the small n of a task set; Newcombe's does neither.
    a = {r["id"]: bool(r["correct"]) for r in a_records}
    b = {r["id"]: bool(r["correct"]) for r in b_records}
    if a.keys() != b.keys() or len(a) != len(a_records) or len(b) != len(b_records):
        raise ValueError("paired_difference needs both models' records on the same tasks, each id once")
    n = len(a)
    both = sum(a[i] and b[i] for i in a)
    a_only = sum(a[i] and not b[i] for i in a)
    b_only = sum(b[i] and not a[i] for i in a)
    neither = n - both - a_only - b_only
    if n == 0:
        return {"difference": 0.0, "ci95": [-1.0, 1.0], "n": 0, "a_accuracy": 0.0, "b_accuracy": 0.0,
                "a_only": 0, "b_only": 0, "differs": False}
    p1, p2 = (both + a_only) / n, (both + b_only) / n
    l1, u1 = wilson_interval(both + a_only, n, z)
    l2, u2 = wilson_interval(both + b_only, n, z)
    denom = (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    phi = (both * neither - a_only * b_only) / math.sqrt(denom) if denom else 0.0
    d = p1 - p2
    delta = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    eps = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    lo, hi = max(-1.0, d - delta), min(1.0, d + eps)
    return {"difference": d, "ci95": [lo, hi], "n": n, "a_accuracy": p1, "b_accuracy": p2, "a_only": a_only,
            "b_only": b_only, "differs": lo > 0 or hi < 0}


# ---------------------------------------------------------------- running a model

def run_tasks(model, tokenizer, tasks: list[Task], *, step_by_step: bool, max_new_tokens: int,
              batch_size: int) -> tuple[dict, list[dict]]:
    """Greedy answers of ``model`` to ``tasks`` through the tokenizer's chat template, scored.

    Returns ``(score(...), records)`` with one record per task, in order: ``{"id", "family", "answer",
    "output", "extracted", "correct", "finished"}`` (``finished`` False: the output hit max_new_tokens).
    """
    from edgedistill.data.teacher_answers import generate_answers

    prompts = [Prompt(id=t.id, category=t.family, messages=messages(t, step_by_step)) for t in tasks]
    gen = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    records = [{"id": t.id, "family": t.family, "answer": t.answer, "output": g["answer"],
                "extracted": extract(t, g["answer"]), "correct": correct(t, g["answer"]),
                "finished": g["finished"]} for t, g in zip(tasks, gen)]
    return score([r["output"] for r in records], tasks), records
