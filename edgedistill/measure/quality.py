"""Output quality of a model against the teacher on held-out examples.

Figures are taken at the answer positions only: position t counts when loss_mask[t + 1] == 1,
i.e. when it predicts an answer token (the convention of the trainer). For each such position:
- top1_agreement: the model's argmax is the teacher's argmax (ties count as agreement);
- kl: KL(teacher || model) at temperature 1, averaged over positions;
- perplexity: exp of the model's mean cross-entropy on the actual next tokens (the answers);
- tokens: how many positions were scored.

Teacher targets keep only the teacher's top-k log-probs per position (float32) plus their ids:
a full [positions, vocab] table would take gigabytes for a 49k vocabulary. KL is then computed
over the k teacher tokens and one bucket holding all others:
    sum_{i in top-k} p_i log(p_i / q_i) + r_p log(r_p / r_q),  r = mass outside the top-k.
That is a lower bound on the full KL (merging outcomes never increases KL), exactly the KL when
the tail is empty (top_k=None keeps the whole vocabulary), and exactly 0 when the model is the
teacher. Top-1 agreement and perplexity are exact.

A model is a Hugging Face causal LM (an nn.Module called with input_ids/attention_mask, whose
output has .logits), or any callable mapping one sequence's token ids (list[int]) to its logits
[len, vocab], which is how an exported artifact's runtime can be scored the same way.
"""

from __future__ import annotations

from typing import Callable, Iterator, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Model = Union[nn.Module, Callable[[list], Tensor]]

DEFAULT_TOP_K = 256


def heldout_examples(records: list[dict], n: int) -> list[dict]:
    """At most n held-out records, taken round-robin over their categories (in first-seen order):
    the held-out file lists the categories one after another, and its first n records would leave
    the last categories (the user's own prompts among them) out of every per-category figure."""
    queues: dict[str, list[dict]] = {}
    for r in records:
        queues.setdefault(r.get("category", ""), []).append(r)
    out, depth = [], 0
    while len(out) < n and any(depth < len(q) for q in queues.values()):
        out += [q[depth] for q in queues.values() if depth < len(q)][: n - len(out)]
        depth += 1
    return out


def _positions(example: dict) -> tuple[Tensor, Tensor]:
    """(positions t that predict an answer token, the tokens they should predict)."""
    ids = torch.as_tensor(example["input_ids"], dtype=torch.long)
    mask = torch.as_tensor(example["loss_mask"], dtype=torch.long)
    pos = torch.nonzero(mask[1:], as_tuple=True)[0]
    return pos, ids[pos + 1]


def _answer_log_probs(model: Model, examples: list[dict], batch_size: int) -> Iterator[Tensor]:
    """Per example, float32 log-softmax of the model's logits at its answer positions, [P, V] (CPU)."""
    if not isinstance(model, nn.Module):
        for ex in examples:
            pos, _ = _positions(ex)
            logits = torch.as_tensor(model(list(ex["input_ids"])))
            yield F.log_softmax(logits[pos].float(), dim=-1).cpu()
        return

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            batch = examples[start:start + batch_size]
            width = max(len(ex["input_ids"]) for ex in batch)
            # Right padding: with causal attention the real tokens never see the pad tokens.
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            attn = torch.zeros(len(batch), width, dtype=torch.long)
            for row, ex in enumerate(batch):
                ids[row, :len(ex["input_ids"])] = torch.as_tensor(ex["input_ids"])
                attn[row, :len(ex["input_ids"])] = 1
            with torch.inference_mode():
                logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False).logits
                for row, ex in enumerate(batch):
                    pos, _ = _positions(ex)
                    yield F.log_softmax(logits[row, pos.to(device)].float(), dim=-1).cpu()
    finally:
        model.train(was_training)


def teacher_targets(teacher: Model, examples: list[dict], *, batch_size: int = 8,
                    top_k: int | None = DEFAULT_TOP_K) -> list[dict]:
    """Per example {"top_ids": int64 [P, k], "top_logp": float32 [P, k], "vocab": V}: the teacher's
    k most likely tokens at each answer position, sorted, with their log-probs. Compute once and
    pass to evaluate() for every student and artifact."""
    targets = []
    for logp in _answer_log_probs(teacher, examples, batch_size):
        k = logp.shape[-1] if top_k is None else min(top_k, logp.shape[-1])
        top_logp, top_ids = logp.topk(k, dim=-1)
        targets.append({"top_ids": top_ids, "top_logp": top_logp, "vocab": logp.shape[-1]})
    return targets


def _mass_outside(top_logp: Tensor) -> Tensor:
    # 1 - sum(p) by expm1 of the log of the sum, in float64: no cancellation when the sum is ~1.
    return (-torch.expm1(torch.logsumexp(top_logp.double(), dim=-1))).clamp_min(0.0)


def evaluate(model: Model, teacher_or_targets: Model | list[dict], examples: list[dict], *,
             batch_size: int = 8, top_k: int | None = DEFAULT_TOP_K, by_category: bool = False) -> dict:
    """{"top1_agreement", "kl", "perplexity", "tokens"} of model against the teacher on examples.

    teacher_or_targets is the teacher itself or teacher_targets(teacher, examples) computed
    beforehand (then top_k is the one used there). by_category adds "by_category": the same
    figures per example "category", from the same pass (the scorecard of evaluate/scorecard.py).
    """
    if isinstance(teacher_or_targets, list):
        targets = teacher_or_targets
    else:
        targets = teacher_targets(teacher_or_targets, examples, batch_size=batch_size, top_k=top_k)
    if len(targets) != len(examples):
        raise ValueError(f"{len(targets)} teacher targets for {len(examples)} examples")

    sums: dict[str, list] = {}  # category -> [agree, kl, nll, count]
    for ex, target, logq in zip(examples, targets, _answer_log_probs(model, examples, batch_size)):
        _, labels = _positions(ex)
        if logq.shape[-1] != target["vocab"] or target["top_ids"].shape[0] != labels.shape[0]:
            raise ValueError("teacher targets do not match these examples or this model's vocabulary")
        if labels.numel() == 0:
            continue
        top_ids, logp_k = target["top_ids"], target["top_logp"]
        logq_k = logq.gather(-1, top_ids)

        kl_pos = (logp_k.exp() * (logp_k - logq_k)).double().sum(-1)
        if top_ids.shape[-1] < target["vocab"]:
            r_p, r_q = _mass_outside(logp_k), _mass_outside(logq_k)
            kl_pos += torch.xlogy(r_p, r_p) - torch.xlogy(r_p, r_q.clamp_min(torch.finfo(torch.float64).tiny))
        s = sums.setdefault(ex.get("category", ""), [0, 0.0, 0.0, 0])
        s[0] += int((logq_k[:, 0] >= logq.max(dim=-1).values).sum())
        s[1] += float(kl_pos.sum())
        s[2] -= float(logq.gather(-1, labels[:, None]).double().sum())
        s[3] += labels.numel()

    total = [sum(s[i] for s in sums.values()) for i in range(4)]
    out = _figures(*total)
    if by_category:
        out["by_category"] = {c: _figures(*s) for c, s in sorted(sums.items())}
    return out


def _figures(agree: int, kl: float, nll: float, count: int) -> dict:
    if count == 0:
        return {"top1_agreement": None, "kl": None, "perplexity": None, "tokens": 0}
    return {"top1_agreement": agree / count, "kl": kl / count,
            "perplexity": float(torch.tensor(nll / count).exp()), "tokens": count}
