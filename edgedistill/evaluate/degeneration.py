"""Degeneration of generations: repetition loops and lack of variety.

A small student decoding greedily often falls into a loop (the same few tokens over and over until
the token limit) or keeps reusing the same phrases; neither shows in perplexity or agreement.
- distinct-n: unique n-grams / all n-grams, pooled over all generations (Li et al., 2016);
- loop: a generation holds a repeated cycle (see has_loop);
- loop_fraction: the share of generations with a loop.

A generation is a sequence of token ids, as the runtimes return them (any hashable items work);
a str is split into words, so strings and id lists are each measured consistently with themselves
but not with each other.
"""

from __future__ import annotations

from collections.abc import Sequence


def _units(generation) -> list:
    return generation.split() if isinstance(generation, str) else list(generation)


def distinct_n(token_lists: Sequence, n: int) -> float | None:
    """Unique n-grams / total n-grams over all generations; None when there is no n-gram at all."""
    if n < 1:
        raise ValueError("n must be >= 1")
    seen, total = set(), 0
    for generation in token_lists:
        units = _units(generation)
        grams = [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else None


def has_loop(tokens, *, n: int = 4, repeats: int = 3) -> bool:
    """Whether, anywhere in the generation, `repeats * n` consecutive tokens repeat one cycle of
    length k for some k in 1..n: `repeats` copies of an n-gram, or more copies of a shorter one.

    Anywhere, not only at the end: a loop that the model left again, or ended with its end-of-turn
    token, is still a loop the user reads. The same span of repeats * n tokens for every cycle
    length, rather than `repeats` copies of each k-gram: three copies of one token are ordinary
    text ("1000" is three "0" tokens for digit-splitting tokenizers, "very very very"), twelve are
    not. A span of length L with cycle k is L - k positions where token[i] == token[i - k].
    """
    if n < 1 or repeats < 2:
        raise ValueError("n must be >= 1 and repeats >= 2")
    units = _units(tokens)
    span = repeats * n
    for k in range(1, n + 1):
        run = 0
        for i in range(k, len(units)):
            run = run + 1 if units[i] == units[i - k] else 0
            if run >= span - k:
                return True
    return False


def degeneration(token_lists: Sequence, *, n: int = 4, repeats: int = 3) -> dict:
    """{"distinct_1", "distinct_2", "loop_fraction", "generations"} of the generations (distinct-n and
    loop_fraction are None when there are none to measure)."""
    loops = [has_loop(g, n=n, repeats=repeats) for g in token_lists]
    return {
        "distinct_1": distinct_n(token_lists, 1),
        "distinct_2": distinct_n(token_lists, 2),
        "loop_fraction": sum(loops) / len(loops) if loops else None,
        "generations": len(loops),
    }
