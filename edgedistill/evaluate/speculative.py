"""The student as a speculative-decoding draft for its teacher.

A distilled student shares the teacher's tokenizer, so it can be used as the draft model of greedy
speculative decoding: the student proposes ``k`` tokens, the teacher checks them in one forward pass,
and the longest agreeing prefix plus the teacher's own next token are kept. The output is exactly the
teacher's greedy output, only (possibly) faster. Two figures tell whether that is worth doing:

* :func:`acceptance` -- how many of the student's proposed tokens the teacher accepts, and how many
  new tokens each teacher forward pass yields. It also checks the result is lossless, i.e. equal to
  the teacher's plain greedy decoding.
* :func:`speedup` -- the end-to-end wall-clock speed-up of transformers' assisted generation with the
  student as assistant over plain greedy generation, measured on this host (never estimated: the
  ratio depends on the host's relative cost of a ``k+1``-token teacher pass against ``k`` student
  passes, which no formula from the acceptance rate alone gets right).

Both take token-id prompts (batch 1 per prompt, as speculative decoding is defined for one sequence).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

import torch
from transformers import DynamicCache


def _check_prompts(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    if not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not p:
            raise ValueError(f"prompt {i} must be a non-empty list of token ids")
        ids = []
        for t in p:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"prompt {i} holds {t!r}, not a non-negative int token id")
            ids.append(t)
        out.append(ids)
    return out


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")


def _vocab(model) -> int:
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.vocab_size


def _check_vocab(draft, target, prompts: list[list[int]]) -> None:
    # Speculative decoding compares token ids, so it is only meaningful with one shared vocabulary.
    dv, tv = _vocab(draft), _vocab(target)
    if dv != tv:
        raise ValueError(f"draft vocabulary ({dv}) differs from the target's ({tv}); they must share a tokenizer")
    top = max(max(p) for p in prompts)
    if top >= tv:
        raise ValueError(f"prompt token id {top} is outside the vocabulary of {tv}")


@contextlib.contextmanager
def _eval(*models):
    was = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.inference_mode():
            yield
    finally:
        for m, w in zip(models, was):
            m.train(w)


def _forward(model, ids: list[int], cache: DynamicCache, keep: int) -> torch.Tensor:
    """Feed ``ids`` after what ``cache`` already holds; return the last ``keep`` logit rows."""
    out = model(input_ids=torch.tensor([ids], dtype=torch.long, device=model.device), past_key_values=cache,
                use_cache=True,
                logits_to_keep=keep)
    return out.logits[0, -keep:]


def _crop_to(cache: DynamicCache, length: int) -> None:
    # A negative count (tokens to drop from the end) is what both transformers 4.x and 5.x accept;
    # 5.x rejects the older absolute-length form.
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _plain_greedy(target, prompt: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    # One token per pass with a cache that is only ever appended to: the reference shares none of the
    # speculative loop's multi-token verification or cropping, so a bookkeeping bug there cannot hide
    # by being repeated here (an uncached loop would be even more independent, but is quadratic and
    # too slow for a real teacher on a CPU).
    cache = DynamicCache()
    feed = list(prompt)
    new: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(_forward(target, feed, cache, 1)[-1].argmax())
        new.append(nxt)
        if nxt in eos:
            break
        feed = [nxt]
    return new


def _speculate_one(draft, target, prompt: list[int], k: int, max_new_tokens: int, eos: set[int]) -> dict:
    seq = list(prompt)
    d_cache, t_cache = DynamicCache(), DynamicCache()
    d_len = t_len = 0  # how many leading tokens of ``seq`` each cache holds
    proposed = accepted = calls = 0
    new: list[int] = []
    while len(new) < max_new_tokens:
        # One slot is reserved for the target's own token, as transformers does, so that a fully
        # accepted draft never overshoots max_new_tokens.
        k_eff = min(k, max_new_tokens - len(new) - 1)
        drafts: list[int] = []
        if k_eff > 0:
            feed = seq[d_len:]
            for _ in range(k_eff):
                nxt = int(_forward(draft, feed, d_cache, 1)[-1].argmax())
                drafts.append(nxt)
                feed = [nxt]
            # The last draft token was never fed, so the draft cache stops one short of the proposal.
            d_len = len(seq) + k_eff - 1
        verify = _forward(target, seq[t_len:] + drafts, t_cache, k_eff + 1).argmax(-1).tolist()
        calls += 1
        m = 0
        while m < k_eff and drafts[m] == verify[m]:
            m += 1
        # Counted before any EOS cut: the rate measures how often the draft agrees with the target.
        proposed += k_eff
        accepted += m
        step = drafts[:m] + [verify[m]]
        for j, tok in enumerate(step):
            if tok in eos:
                step = step[: j + 1]
                break
        # Rejected draft positions leave stale keys/values behind; drop them so the next pass sees
        # exactly the accepted sequence. The target's own token is not in its cache yet.
        t_len = len(seq) + m
        _crop_to(t_cache, t_len)
        if d_len > t_len:
            d_len = t_len
            _crop_to(d_cache, d_len)
        seq += step
        new += step
        if step[-1] in eos:
            break
    return {"new": new, "proposed": proposed, "accepted": accepted, "calls": calls}


def acceptance(draft, target, prompts: list[list[int]], *, k: int, max_new_tokens: int,
               eos_ids: list[int] | None = None) -> dict:
    """Greedy speculative decoding with ``draft`` proposing ``k`` tokens per round for ``target``.

    Returns ``{"k", "proposed", "accepted", "acceptance_rate", "tokens_per_target_call",
    "generated_tokens", "target_calls", "prompts", "lossless", "mismatched_prompts"}``.
    ``acceptance_rate`` is accepted/proposed draft tokens; ``tokens_per_target_call`` the mean number of
    new tokens per target forward pass (``k + 1`` when every draft is accepted; the last round of a prompt
    may propose fewer than ``k`` so as not to overshoot ``max_new_tokens``). ``lossless`` says whether
    every prompt's output equals the target's plain greedy decoding -- it must, up to floating-point
    ties between a batched and a one-token-at-a-time forward pass, so a False here is reported, not
    hidden. Generation stops at ``max_new_tokens`` or after a token in ``eos_ids`` (None: never).
    """
    # Written by hand rather than with ``target.generate(assistant_model=draft)``: transformers'
    # assisted decoding (generation/utils.py ``_assisted_decoding``) computes the per-round
    # ``n_matches`` only as a local variable, hands it to ``update_candidate_strategy`` (which keeps
    # it only to tune the "heuristic" schedule or the confidence threshold), and returns neither it
    # nor a count of target calls, so the acceptance rate cannot be read back from it.
    _check_positive(k=k, max_new_tokens=max_new_tokens)
    prompts = _check_prompts(prompts)
    _check_vocab(draft, target, prompts)
    eos = set(eos_ids or [])
    proposed = accepted = calls = generated = 0
    mismatched = 0
    with _eval(draft, target):
        for prompt in prompts:
            r = _speculate_one(draft, target, prompt, k, max_new_tokens, eos)
            proposed += r["proposed"]
            accepted += r["accepted"]
            calls += r["calls"]
            generated += len(r["new"])
            if r["new"] != _plain_greedy(target, prompt, max_new_tokens, eos):
                mismatched += 1
    return {
        "k": k,
        "proposed": proposed,
        "accepted": accepted,
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        "tokens_per_target_call": generated / calls if calls else 0.0,
        "generated_tokens": generated,
        "target_calls": calls,
        "prompts": len(prompts),
        "lossless": mismatched == 0,
        "mismatched_prompts": mismatched,
    }


def _generate(target, ids: torch.Tensor, max_new_tokens: int, pad_id, eos, draft=None) -> torch.Tensor:
    kw = {"assistant_model": draft} if draft is not None else {}
    return target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=eos,
                           max_new_tokens=max_new_tokens, pad_token_id=pad_id, **kw)[0, ids.shape[1]:]


def speedup(draft, target, prompts: list[list[int]], *, k: int, max_new_tokens: int, repeats: int = 1,
            eos_ids: list[int] | None = None) -> dict:
    """Measured end-to-end speed-up of assisted generation (``draft`` as assistant) over plain greedy.

    Both runs use transformers' ``generate`` with ``do_sample=False`` on the same prompts, after one
    warm-up of each; the draft proposes exactly ``k`` tokens per round. Returns ``{"k", "plain_tok_s",
    "assisted_tok_s", "speedup", "new_tokens", "same_output", "threads", "basis"}`` where ``new_tokens``
    is what one pass over the prompts generates (both runs stop at the target's own EOS) and
    ``same_output`` whether assisted and plain produced identical tokens for every prompt.
    """
    _check_positive(k=k, max_new_tokens=max_new_tokens, repeats=repeats)
    prompts = _check_prompts(prompts)
    _check_vocab(draft, target, prompts)
    gc = draft.generation_config
    saved = {n: getattr(gc, n, None) for n in
             ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")}
    # the same end-of-text tokens as acceptance(), so both figures measure the same generations
    eos = list(eos_ids) if eos_ids else target.generation_config.eos_token_id
    pad_id = target.generation_config.pad_token_id
    if pad_id is None:
        pad_id = eos[0] if isinstance(eos, list) else eos
    inputs = [torch.tensor([p], dtype=torch.long, device=target.device) for p in prompts]
    try:
        gc.num_assistant_tokens = k
        # "constant" stops the heuristic schedule from growing/shrinking k between rounds, and a zero
        # confidence threshold stops the draft from cutting its proposal short when it is unsure
        # (transformers defaults to 0.4), so every round really drafts k tokens.
        gc.num_assistant_tokens_schedule = "constant"
        gc.assistant_confidence_threshold = 0.0
        with _eval(draft, target):
            _generate(target, inputs[0], max_new_tokens, pad_id, eos)
            _generate(target, inputs[0], max_new_tokens, pad_id, eos, draft)

            t0 = time.perf_counter()
            for _ in range(repeats):
                plain = [_generate(target, x, max_new_tokens, pad_id, eos) for x in inputs]
            plain_s = time.perf_counter() - t0

            t0 = time.perf_counter()
            for _ in range(repeats):
                assisted = [_generate(target, x, max_new_tokens, pad_id, eos, draft) for x in inputs]
            assisted_s = time.perf_counter() - t0
    finally:
        for n, v in saved.items():
            setattr(gc, n, v)
    plain_tokens = sum(len(o) for o in plain)
    assisted_tokens = sum(len(o) for o in assisted)
    plain_tok_s = plain_tokens * repeats / plain_s
    assisted_tok_s = assisted_tokens * repeats / assisted_s
    return {
        "k": k,
        "plain_tok_s": plain_tok_s,
        "assisted_tok_s": assisted_tok_s,
        "speedup": assisted_tok_s / plain_tok_s,
        "new_tokens": plain_tokens,
        "same_output": all(torch.equal(a, b) for a, b in zip(plain, assisted)),
        "threads": torch.get_num_threads(),
        "basis": "measured on this host",
    }
