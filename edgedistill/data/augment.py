"""More and cleaner training data from the teacher: self-instruct, near-duplicate removal, chain-of-thought
variants, follow-up turns, quality filters on answers and topic balancing.

Each step is a plain function over ``Prompt``s and answer records (``teacher_answers.generate_answers``'
format). The steps that need the teacher take ``generate(prompts, max_new_tokens) -> records`` so the data
stage can route them through its on-disk answer cache, and tests can script the teacher's replies.
Generated records carry ``source`` ("self_instruct", "chain_of_thought" or "multi_turn"); the prompts of the
build (bundled and the user's) carry none, so a build without these steps writes what it wrote before.
"""

from __future__ import annotations

import hashlib
import random
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from edgedistill.data.prompts import USER_TEXT, Prompt

Generate = Callable[[list[Prompt], int], list[dict]]

SHINGLE_CHARS = 5
NUM_PERM = 128  # MinHash permutations: Jaccard estimates within about +-0.04 (one standard deviation)


# ---------------------------------------------------------------- near duplicates (MinHash)

def normalize(text: str) -> str:
    """Lower case, punctuation to spaces, runs of white space to one space."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def shingles(text: str, n: int = SHINGLE_CHARS) -> set[str]:
    """Character n-grams of the normalized text (the whole text when shorter than n). Characters rather
    than words: prompts are short, and a changed word still leaves most character n-grams shared."""
    t = normalize(text)
    return {t[i:i + n] for i in range(max(1, len(t) - n + 1))}


def minhash(text: str):
    """The text's MinHash signature (datasketch.MinHash; imported here: it pulls in scipy, slow to load)."""
    from datasketch import MinHash

    m = MinHash(num_perm=NUM_PERM, seed=1)  # fixed seed: the same text always gets the same signature
    m.update_batch([s.encode("utf-8") for s in sorted(shingles(text))])
    return m


def prompt_text(p: Prompt) -> str:
    """What a prompt is compared on: all of its messages."""
    return "\n".join(m["content"] for m in p.messages)


class NearDuplicateIndex:
    """Texts indexed by MinHash; ``match`` names an indexed text whose estimated Jaccard similarity of
    shingles is at least ``threshold``. LSH finds the candidates, the signatures confirm them."""

    def __init__(self, threshold: float):
        from datasketch import MinHashLSH

        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        # LSH only proposes candidates; its own threshold sits a little lower (and below 1, where its
        # banding has no solution) so that pairs near the threshold are proposed and then judged on
        # their signatures
        self._lsh = MinHashLSH(threshold=max(0.05, min(0.9, threshold - 0.1)), num_perm=NUM_PERM)
        self._sigs: dict = {}

    def add(self, key: str, text: str) -> None:
        if key in self._sigs:
            return
        sig = minhash(text)
        self._sigs[key] = sig
        self._lsh.insert(key, sig)

    def match(self, text: str) -> tuple[str, float] | None:
        """The most similar indexed key at or above the threshold, with its similarity; None if none."""
        sig = minhash(text)
        best = None
        for key in sorted(self._lsh.query(sig)):
            sim = float(sig.jaccard(self._sigs[key]))
            if sim >= self.threshold and (best is None or sim > best[1]):
                best = (key, sim)
        return best


def drop_near_duplicates(candidates: list[Prompt], known: list[Prompt], heldout: list[Prompt],
                         threshold: float) -> tuple[list[Prompt], list[dict]]:
    """Candidates that are not near-duplicates of a held-out prompt, a known prompt, or an earlier kept
    candidate, in input order; and one ``{"index", "id", "reason", "match", "similarity"}`` per dropped one
    (its position in ``candidates``; reason "heldout_copy" or "near_duplicate")."""
    held = NearDuplicateIndex(threshold)
    for p in heldout:
        held.add(p.id, prompt_text(p))
    seen = NearDuplicateIndex(threshold)
    for p in known:
        seen.add(p.id, prompt_text(p))
    kept, dropped = [], []
    for index, c in enumerate(candidates):
        text = prompt_text(c)
        hit = held.match(text)
        reason = "heldout_copy"
        if hit is None:
            hit, reason = seen.match(text), "near_duplicate"
        if hit is not None:
            dropped.append({"index": index, "id": c.id, "reason": reason, "match": hit[0],
                            "similarity": round(hit[1], 3)})
            continue
        kept.append(c)
        seen.add(c.id, text)
    return kept, dropped


# ---------------------------------------------------------------- self-instruct

def _single_turn(p: Prompt) -> bool:
    return p.category != USER_TEXT and len(p.messages) == 1 and p.messages[0]["role"] == "user"


def self_instruct_requests(seeds: list[Prompt], n: int, examples: int, seed: int) -> list[Prompt]:
    """``n`` requests to the teacher for a new instruction, spread evenly over the categories of the
    single-turn seed prompts (sorted; the first ones get one more when ``n`` does not divide). Each shows
    up to ``examples`` seeds of its category, drawn with a seed of its own."""
    pools: dict[str, list[Prompt]] = defaultdict(list)
    for p in seeds:
        if _single_turn(p):
            pools[p.category].append(p)
    cats = sorted(pools)
    if not cats or n <= 0:
        return []
    out = []
    for k in range(n):
        cat = cats[k % len(cats)]
        j = k // len(cats)
        shown = random.Random(f"{seed}:self-instruct:{cat}:{j}").sample(pools[cat], min(examples, len(pools[cat])))
        label = cat.replace("_", " ")
        listed = "\n".join(f"{i}. {p.messages[0]['content']}" for i, p in enumerate(shown, 1))
        text = (f"Here are examples of {label} requests that people send to an AI assistant:\n\n{listed}\n\n"
                f"Write one new {label} request that is different from all of these. "
                "Reply with the new request only; do not answer it.")
        out.append(Prompt(id=f"~self-instruct~{cat}~{j:04d}", category=cat,
                          messages=[{"role": "user", "content": text}]))
    return out


_LEAD_LABEL = re.compile(
    r"^\s*(?:\d+\s*[.):](?=\s)|[-*\u2022](?=\s)|#+|(?:here\s+is\s+)?(?:an?\s+|the\s+)?(?:new\s+)?"
    r"(?:request|task|instruction|question|prompt)\s*\d*\s*[:.\-])\s*", re.I)
_ITEM = re.compile(r"^\s*\d+\s*[.)]\s+")
MIN_INSTRUCTION_WORDS = 3


def _clean(text: str) -> str:
    for _ in range(3):
        text = _LEAD_LABEL.sub("", text, count=1).strip()
    return text.strip("\"'`*_ \u201c\u201d").strip()


def parse_instructions(reply: str, *, finished: bool = True, multiline: bool = False) -> list[str]:
    """The instructions in a self-instruct reply, in order; none when none can be read from it.

    A small teacher often lists several (the examples it was shown among them: dedup drops those), so
    each numbered item is one instruction. A lead-in line ending with ':' ("Here is a new request:"), a
    leading label or list marker ("New request:", "4.") and wrapping quotes or emphasis go. With
    ``multiline`` False (the category's examples are one line each) an instruction is the first line of
    its item, the rest being the teacher's comments or answer; with True the whole item (say, a text to
    summarize). An item the reply ends in, when the reply is not ``finished``, may be cut short and is
    left out. Fewer than three words is no instruction."""
    lines = [ln.rstrip() for ln in reply.strip().splitlines()]
    while len([ln for ln in lines if ln.strip()]) > 1 and lines[0].strip().endswith(":"):
        lines = lines[1:]
        while lines and not lines[0].strip():
            lines = lines[1:]
    items: list[list[str]] = []
    for ln in lines:
        if not items or _ITEM.match(ln):
            items.append([ln])
        else:
            items[-1].append(ln)
    out = []
    for k, item in enumerate(items):
        body = list(item)
        while body and not body[-1].strip():
            body.pop()
        followed = k < len(items) - 1  # something came after it: it ended
        if not multiline and body:
            followed = followed or len(body) > 1
            body = body[:1]
        if not finished and not followed:
            continue
        text = _clean("\n".join(body).strip())
        if len(text.split()) >= MIN_INSTRUCTION_WORDS:
            out.append(text)
    return out


def instruction_prompt(category: str, text: str) -> Prompt:
    """A new prompt; its id is derived from its category and text, so the same instruction gets the
    same id in every run."""
    digest = hashlib.sha256(f"{category}\n{text}".encode("utf-8")).hexdigest()[:12]
    return Prompt(id=f"{category}-si-{digest}", category=category, messages=[{"role": "user", "content": text}])


@dataclass
class SelfInstructResult:
    prompts: list[Prompt]  # the kept new prompts
    log: list[dict]  # one entry per request: its category, the reply, each instruction read from it, kept or why not
    summary: dict


def self_instruct(seeds: list[Prompt], known: list[Prompt], heldout: list[Prompt], n: int, *, examples: int,
                  threshold: float, seed: int, max_new_tokens: int, generate: Generate) -> SelfInstructResult:
    """Make ``n`` self-instruct requests to the teacher, each showing ``seeds`` of one category (train
    prompts only: the held-out prompts are never shown); read the instructions from each reply, and drop
    those that copy a held-out prompt or nearly duplicate a ``known`` prompt or an earlier new one.

    The summary: ``requests``; ``unusable_replies`` (``truncated``: cut short before any complete
    instruction, ``unparsable``: none in it); ``candidates`` (instructions read); ``kept``; ``dedup``
    (``checked`` = ``kept`` + ``dropped_heldout_copy`` + ``dropped_near_duplicate``); ``by_category``."""
    requests = self_instruct_requests(seeds, n, examples, seed)
    replies = generate(requests, max_new_tokens) if requests else []
    # categories whose prompts span lines (a text to summarize): their instructions may too
    multiline = {p.category for p in seeds if _single_turn(p) and "\n" in p.messages[0]["content"].strip()}
    log, candidates = [], []
    for req, rec in zip(requests, replies):
        finished = rec.get("finished", True)
        entry = {"request": req.id, "category": req.category, "reply": rec.get("answer", ""), "instructions": []}
        for text in parse_instructions(entry["reply"], finished=finished, multiline=req.category in multiline):
            p = instruction_prompt(req.category, text)
            item = {"text": text, "id": p.id, "kept": True}
            entry["instructions"].append(item)
            candidates.append((p, item))
        if not entry["instructions"]:
            entry["unusable"] = "unparsable" if finished else "truncated"
        log.append(entry)
    kept, dropped = drop_near_duplicates([p for p, _ in candidates], known, heldout, threshold)
    for d in dropped:
        candidates[d["index"]][1].update(kept=False, reason=d["reason"], match=d["match"], similarity=d["similarity"])
    unusable = Counter(e.get("unusable") for e in log if e.get("unusable"))
    reasons = Counter(item.get("reason") for _, item in candidates if not item["kept"])
    by_cat: dict[str, dict] = {}
    for e in log:
        c = by_cat.setdefault(e["category"], {"requests": 0, "candidates": 0, "kept": 0})
        c["requests"] += 1
        c["candidates"] += len(e["instructions"])
        c["kept"] += sum(i["kept"] for i in e["instructions"])
    summary = {
        "requests": len(requests),
        "unusable_replies": {r: unusable.get(r, 0) for r in ("truncated", "unparsable")},
        "candidates": len(candidates), "kept": len(kept),
        "dedup": {"threshold": threshold, "checked": len(candidates), "kept": len(kept),
                  "dropped_heldout_copy": reasons.get("heldout_copy", 0),
                  "dropped_near_duplicate": reasons.get("near_duplicate", 0)},
        "by_category": dict(sorted(by_cat.items())),
    }
    return SelfInstructResult(kept, log, summary)


# ---------------------------------------------------------------- chain of thought

COT_SUFFIX = "Explain step by step, then give the final answer."
_ASKS_FOR_STEPS = re.compile(r"step[\s-]+by[\s-]+step|explain your reasoning|show your work", re.I)


def cot_prompts(prompts: list[Prompt], categories: list[str]) -> tuple[list[Prompt], int]:
    """A step-by-step variant (id ``<id>~cot``) of each chat prompt in ``categories``, its last user
    message followed by :data:`COT_SUFFIX` (a chat that carries its own answer loses it: the teacher
    answers the variant); and how many were skipped because they already ask for it (their ordinary
    answer is already a step-by-step trace)."""
    wanted, out, skipped = set(categories), [], 0
    for p in prompts:
        msgs = p.messages[:-1] if p.messages[-1]["role"] == "assistant" else p.messages  # a given answer goes
        if p.category not in wanted or p.category == USER_TEXT or not msgs or msgs[-1]["role"] != "user":
            continue
        last = msgs[-1]["content"]
        if _ASKS_FOR_STEPS.search(last):
            skipped += 1
            continue
        msgs = [dict(m) for m in msgs[:-1]] + [{"role": "user", "content": f"{last.rstrip()}\n\n{COT_SUFFIX}"}]
        out.append(Prompt(id=f"{p.id}~cot", category=p.category, messages=msgs))
    return out, skipped


# ---------------------------------------------------------------- follow-up turns

FOLLOW_UPS = (
    "Can you explain that more simply?",
    "Can you give me an example?",
    "Can you make your answer shorter?",
    "Why is that?",
    "Can you sum that up in one sentence?",
    "What is the most important point in your answer?",
    "Can you say that in a different way?",
    "Is there anything I should be careful about?",
)


def follow_up_prompts(records: list[dict], n: int, seed: int) -> list[Prompt]:
    """Second turns for up to ``n`` answered chats (finished, non-empty answers; chain-of-thought
    variants and earlier follow-ups left out), taken round-robin over categories: the chat, the
    teacher's answer as an assistant turn, and a follow-up question (id ``<id>~turn2``)."""
    pool: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if "answer" in r and r.get("finished") and r["answer"].strip() and r.get("source") not in (
                "chain_of_thought", "multi_turn"):
            pool[r["category"]].append(r)
    queues = []
    for cat in sorted(pool):
        items = sorted(pool[cat], key=lambda r: r["id"])
        random.Random(f"{seed}:follow-up:{cat}").shuffle(items)
        queues.append(items)
    picked: list[dict] = []
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop())
    out = []
    for r in picked:
        ask = FOLLOW_UPS[int(hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest(), 16) % len(FOLLOW_UPS)]
        msgs = [dict(m) for m in r["messages"]] + [{"role": "assistant", "content": r["answer"]},
                                                   {"role": "user", "content": ask}]
        out.append(Prompt(id=f"{r['id']}~turn2", category=r["category"], messages=msgs))
    return out


def loss_turns(base: dict) -> list[int]:
    """Indices, in the messages of a follow-up on ``base``, of the earlier assistant turns trained on:
    the base's own (if it was a follow-up itself) and its answer, right after its messages (the
    teacher's answer, or the answer a user's chat carried: trained on there too)."""
    return list(base.get("loss_turns", [])) + [len(base["messages"])]


# ---------------------------------------------------------------- quality filters

FILTERS = ("empty", "truncated", "too_short", "too_long", "repetitive")


def repetition_share(text: str, n: int = 3) -> float:
    """Share of the text's word n-grams that repeat an earlier one: 0 for varied text, near 1 for a
    loop. Texts of fewer than n + 1 words score 0."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


@dataclass
class FilterResult:
    kept: list[dict]
    dropped: list[dict]  # the dropped records, each with "dropped": the first filter it failed
    counts: dict = field(default_factory=dict)  # filter -> {"kept", "dropped"}, in FILTERS order
    unchecked: int = 0  # records without an answer (raw text), passed on unchecked

    def summary(self) -> dict:
        """``{"checked", "kept", "dropped", <filter>: {"kept", "dropped"}...}``: checked = kept + dropped,
        each filter's kept + dropped is the previous one's kept, the last one's kept is the total kept."""
        return {"checked": len(self.kept) - self.unchecked + len(self.dropped),
                "kept": len(self.kept) - self.unchecked, "dropped": len(self.dropped),
                **{f: dict(c) for f, c in self.counts.items()}}

    def merge(self, other: "FilterResult") -> "FilterResult":
        counts = {f: {k: self.counts[f][k] + other.counts[f][k] for k in ("kept", "dropped")} for f in self.counts}
        return FilterResult(self.kept + other.kept, self.dropped + other.dropped, counts,
                            self.unchecked + other.unchecked)


def filter_answers(records: list[dict], filters=FILTERS, *, min_words: int = 2, max_repetition: float = 0.5,
                   max_tokens: int | None = None, token_count: Callable[[dict], int] | None = None) -> FilterResult:
    """Drop answer records that fail one of ``filters``, applied in this order (a record counts under the
    first it fails; each filter's "kept" is what it passes on to the next):

    - empty: no visible characters;
    - truncated: ``finished`` is False (the answer hit max_new_tokens before its end);
    - too_short: fewer than ``min_words`` words;
    - too_long: ``token_count(record)`` (prompt and answer through the chat template) over ``max_tokens``,
      so the answer's end would be cut from the training sequence;
    - repetitive: more than ``max_repetition`` of its word 3-grams repeat an earlier one.

    Records without an answer (raw text) are kept unchecked.
    """
    unknown = set(filters) - set(FILTERS)
    if unknown:
        raise ValueError(f"unknown answer filters: {', '.join(sorted(unknown))}")
    if "too_long" in filters and (max_tokens is None or token_count is None):
        raise ValueError("the too_long filter needs max_tokens and token_count")
    tests: dict[str, Callable[[dict], bool]] = {
        "empty": lambda r: not r["answer"].strip(),
        "truncated": lambda r: r.get("finished") is False,
        "too_short": lambda r: len(r["answer"].split()) < min_words,
        "too_long": lambda r: token_count(r) > max_tokens,
        "repetitive": lambda r: repetition_share(r["answer"]) > max_repetition,
    }
    active = [f for f in FILTERS if f in filters]
    counts = {f: {"kept": 0, "dropped": 0} for f in active}
    kept, dropped, unchecked = [], [], 0
    for r in records:
        if "answer" not in r:
            kept.append(r)
            unchecked += 1
            continue
        reason = None
        for name in active:
            if tests[name](r):
                counts[name]["dropped"] += 1
                reason = name
                break
            counts[name]["kept"] += 1
        if reason is None:
            kept.append(r)
        else:
            dropped.append({**r, "dropped": reason})
    return FilterResult(kept, dropped, counts, unchecked)


# ---------------------------------------------------------------- topic balancing

def balance(records: list[dict], mode: str, seed: int) -> tuple[list[dict], dict]:
    """Topic balancing over the categories of chat records (raw text records are left as they are).

    - ``cap``: a category above the median category size keeps a random median-sized subset;
    - ``oversample``: a category below the largest is topped up to its size by repeating its records
      (each repeat's id gets ``~rep<k>``), nothing is dropped;
    - ``none``: unchanged.

    Returns the records (kept records in input order, repeats after them) and
    ``{"mode", "target", "before", "after"}`` with per-category counts.
    """
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        if r["category"] != USER_TEXT:
            by_cat[r["category"]].append(i)
    before = {c: len(v) for c, v in sorted(by_cat.items())}
    if mode == "none" or not by_cat:
        return list(records), {"mode": mode, "target": None, "before": before, "after": before}
    if mode == "cap":
        target = int(statistics.median_low(before.values()))
        drop: set[int] = set()
        for cat, idx in sorted(by_cat.items()):
            if len(idx) > target:
                keep = set(random.Random(f"{seed}:balance:{cat}").sample(idx, target))
                drop.update(i for i in idx if i not in keep)
        out = [r for i, r in enumerate(records) if i not in drop]
    elif mode == "oversample":
        target = max(before.values())
        out = list(records)
        for cat, idx in sorted(by_cat.items()):
            order = list(idx)
            random.Random(f"{seed}:balance:{cat}").shuffle(order)
            for k in range(target - len(idx)):
                r = records[order[k % len(order)]]
                out.append({**r, "id": f"{r['id']}~rep{k // len(order) + 1}"})
    else:
        raise ValueError(f"unknown balance mode {mode!r}")
    after = dict(sorted(Counter(r["category"] for r in out if r["category"] != USER_TEXT).items()))
    return out, {"mode": mode, "target": target, "before": before, "after": after}
