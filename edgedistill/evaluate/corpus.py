"""Generalization corpus: human-written English prose that no training path sees and the teacher
did not write, and the student's perplexity on it.

Perplexity on the teacher's own answers only shows how well the student imitates the teacher; on
text from elsewhere it shows what the student lost of the language model it started from. The text
is the prose of docstrings of pure-Python standard-library modules (CPython, PSF License), read from
their source with `ast` and cleaned into plain paragraphs by build_corpus() below. It is an offline,
shippable, human-written source; the price is that it is technical English, and that a teacher
pretrained on public code has likely seen it: compare student against teacher, not against an
absolute figure.

The text is shipped as generalization.txt (made once by build_corpus(), see its first line), so
the corpus is the same whichever Python runs the build; build_corpus() records how it was made and
a test checks that it still reproduces the file on the Python named there.

The data stage never reads this file: corpus_fingerprints()/contains_corpus() let a test check that
no training row carries the corpus' token n-grams.
"""

from __future__ import annotations

import ast
import functools
import inspect
import platform
import re
import sysconfig
from pathlib import Path

import torch

from edgedistill.measure.quality import Model, _answer_log_probs, _positions

CORPUS_FILE = Path(__file__).with_name("generalization.txt")
CATEGORY = "generalization"
# how the report names the corpus
SOURCE = ("prose of Python 3.11 standard-library docstrings (PSF License; edgedistill/evaluate/generalization.txt), "
          "human-written, not by the teacher")

# Modules with long prose docstrings, in a fixed order (the file's passage order). Only pure-Python
# modules whose source is the same on every platform: C modules' docstrings live in the binary.
MODULES = (
    "textwrap", "argparse", "configparser", "re", "statistics", "socketserver", "fileinput", "shelve",
    "cmd", "heapq", "copy", "timeit", "random", "tempfile", "difflib", "queue", "shutil", "sched",
    "weakref", "doctest", "subprocess", "traceback", "smtplib", "calendar", "zipfile", "tarfile", "bdb",
    "abc", "base64", "getopt", "gzip", "glob",
)

_MIN_WORDS = 15
_MIN_PLAIN = 0.92  # share of words that are plain English words: keeps prose, drops code-like paragraphs
_PLAIN_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*[.,;:!?]?$")
# Indented lines are code examples or continued list items; bullets and numbered items are lists;
# the markers below are doctests, reST literals, tables, rules and inline code.
_LIST_ITEM = re.compile(r"([-*+]|\d+[.)]|[A-Za-z][.)])\s")
_NOT_PROSE = (">>>", "::", "|", "==", "--", "`", "{", "}", "\t")


def _module_source(stdlib: Path, name: str) -> Path:
    path = stdlib / (name.replace(".", "/") + ".py")
    return path if path.exists() else stdlib / name.replace(".", "/") / "__init__.py"


def _prose_paragraphs(doc: str) -> list[str]:
    out = []
    text = inspect.cleandoc(doc)
    for para in re.split(r"\n\s*\n", text):
        lines = para.split("\n")
        if any(line[:1].isspace() or _LIST_ITEM.match(line) for line in lines):
            continue
        if any(marker in para for marker in _NOT_PROSE):
            continue
        words = para.split()
        if len(words) < _MIN_WORDS or not words[0][0].isupper() or words[-1][-1] not in ".?!":
            continue
        if sum(bool(_PLAIN_WORD.match(w)) for w in words) / len(words) < _MIN_PLAIN:
            continue
        out.append(" ".join(words))
    return out


def build_corpus() -> str:
    """The text of generalization.txt, made from this Python's standard-library sources.

    For each module of MODULES: its module docstring, then the docstrings of its public classes,
    functions and methods (names without a leading underscore) in source order; each split into
    paragraphs at blank lines, and only plain prose kept (no indented code, doctests, lists,
    tables or reST markup; at least 15 words, 92% of them plain words; a capital first letter and a
    final full stop); whitespace collapsed; repeated paragraphs kept once.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    paragraphs: list[str] = []
    for name in MODULES:
        tree = ast.parse(_module_source(stdlib, name).read_text(encoding="utf-8"))
        docs = [ast.get_docstring(tree, clean=False)]
        docs += [ast.get_docstring(node, clean=False) for node in ast.walk(tree)
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 and not node.name.startswith("_")]
        for doc in docs:
            for para in _prose_paragraphs(doc or ""):
                if para not in seen:
                    seen.add(para)
                    paragraphs.append(para)
    header = (f"# source: prose paragraphs of docstrings of Python {platform.python_version()} standard-library "
              f"modules ({', '.join(MODULES)}), cleaned by edgedistill.evaluate.corpus.build_corpus(); "
              f"Copyright Python Software Foundation, PSF License Agreement.")
    return header + "\n\n" + "\n\n".join(paragraphs) + "\n"


def corpus_python_version(text: str | None = None) -> str:
    """The Python version the shipped file was made with (from its first line)."""
    text = CORPUS_FILE.read_text(encoding="utf-8") if text is None else text
    match = re.search(r"docstrings of Python (\S+) standard-library", text.split("\n", 1)[0])
    if match is None:
        raise ValueError(f"{CORPUS_FILE.name}: the first line does not name a Python version")
    return match.group(1)


@functools.lru_cache(maxsize=1)
def _passages() -> tuple[str, ...]:
    text = CORPUS_FILE.read_text(encoding="utf-8")
    blocks = (b.strip() for b in re.split(r"\n\s*\n", text))
    return tuple(b for b in blocks if b and not b.startswith("#"))


def load_passages() -> list[str]:
    """The corpus' paragraphs, in file order (comment lines left out)."""
    return list(_passages())


def _special_prefix(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before a text of its own accord (a BOS for Llama-style ones;
    none for SmolLM2's): each example starts with them as a document would."""
    with_special = list(tokenizer("x")["input_ids"])
    plain = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    cut = len(with_special) - len(plain)
    return [int(t) for t in with_special[:cut]] if cut > 0 and with_special[cut:] == plain else []


def _passage_ids(tokenizer) -> list[list[int]]:
    return [[int(t) for t in tokenizer(p, add_special_tokens=False)["input_ids"]] for p in _passages()]


def corpus_examples(tokenizer, *, max_len: int, max_examples: int) -> list[dict]:
    """Held-out examples {"id", "input_ids", "loss_mask", "category": "generalization"} of the corpus.

    Whole passages, in file order and separated by a blank line, are packed into examples of at
    most max_len tokens (a passage longer than that is cut into pieces); each example starts with
    the tokenizer's own leading special tokens, if any. The loss is on every token after the first,
    which has no context to be predicted from (with a BOS first, that is every text token).
    """
    prefix = _special_prefix(tokenizer)
    if max_len < len(prefix) + 2:
        raise ValueError(f"max_len must be at least {len(prefix) + 2}")
    if max_examples < 1:
        return []
    sep = [int(t) for t in tokenizer("\n\n", add_special_tokens=False)["input_ids"]]
    room = max_len - len(prefix)
    rows: list[list[int]] = []
    current: list[int] = []
    for ids in _passage_ids(tokenizer):
        piece = sep + ids if current else ids
        if len(current) + len(piece) <= room:
            current += piece
            continue
        if current:
            rows.append(current)
        while len(ids) > room:
            # never leave a lone last token: it would make an example with nothing to score
            take = room - 1 if len(ids) - room == 1 else room
            rows.append(ids[:take])
            ids = ids[take:]
        current = ids
        if len(rows) >= max_examples:
            break
    if current and len(rows) < max_examples:
        rows.append(current)
    examples = []
    for i, row in enumerate(rows[:max_examples]):
        ids = prefix + row
        examples.append({"id": f"{CATEGORY}-{i:03d}", "category": CATEGORY, "input_ids": ids,
                         "loss_mask": [0] + [1] * (len(ids) - 1)})
    return examples


def corpus_fingerprints(tokenizer, n: int = 8) -> set[tuple[int, ...]]:
    """Every token n-gram inside a corpus passage. Tokenizing a passage within other text can change
    the tokens at its edges only, so its inner n-grams are found wherever it was copied."""
    grams: set[tuple[int, ...]] = set()
    for ids in _passage_ids(tokenizer):
        grams.update(tuple(ids[i:i + n]) for i in range(len(ids) - n + 1))
    return grams


def contains_corpus(token_rows, fingerprints: set[tuple[int, ...]], n: int) -> bool:
    """Whether any row of token ids holds an n-gram of the corpus (fingerprints made with the same n
    and tokenizer)."""
    for row in token_rows:
        ids = [int(t) for t in row]
        if any(tuple(ids[i:i + n]) in fingerprints for i in range(len(ids) - n + 1)):
            return True
    return False


def perplexity(model: Model, examples: list[dict], batch_size: int = 8) -> float | None:
    """exp of the model's mean cross-entropy on the scored next tokens of the examples (positions t
    with loss_mask[t + 1] == 1, as everywhere in measure.quality); None when nothing is scored."""
    nll, count = 0.0, 0
    for ex, logq in zip(examples, _answer_log_probs(model, examples, batch_size)):
        _, labels = _positions(ex)
        if labels.numel() == 0:
            continue
        nll -= float(logq.gather(-1, labels[:, None]).double().sum())
        count += labels.numel()
    if count == 0:
        return None
    return float(torch.tensor(nll / count, dtype=torch.float64).exp())


if __name__ == "__main__":  # how generalization.txt was made: python -m edgedistill.evaluate.corpus
    CORPUS_FILE.write_text(build_corpus(), encoding="utf-8")
