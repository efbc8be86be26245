"""Teacher answers to prompts (greedy, batched) and their tokenization into training records."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from edgedistill.data.prompts import USER_TEXT, Prompt
from edgedistill.errors import UserError


def chat_ids(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> list[int]:
    """Token ids of ``messages`` rendered through the tokenizer's chat template."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        return_dict=False)
    if isinstance(out, dict) or hasattr(out, "keys"):  # older/newer transformers may still return a mapping
        out = out["input_ids"]
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(t) for t in out]


def eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    for src in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for t in (src if isinstance(src, (list, tuple)) else [src]):
            if t is not None and int(t) not in ids:
                ids.append(int(t))
    if not ids:
        raise ValueError("the tokenizer has no eos token; cannot tell where an answer ends")
    return ids


def generate_answers(model, tokenizer, prompts: list[Prompt], *, max_new_tokens: int, batch_size: int,
                     progress: Callable[[int, int], None] | None = None,
                     sample: tuple[float, int] | None = None) -> list[dict]:
    """The teacher's greedy answer to each prompt, in input order; sample=(temperature, seed) samples
    instead (refinement's extra answers), from a random state of its own so the caller's is untouched.

    Each record is ``{"id", "category", "messages", "answer", "finished"}``; ``finished`` is False when the
    answer hit ``max_new_tokens`` before the end-of-turn token. ``user_text`` prompts are not answered: their
    record is ``{"id", "category", "text"}``. A chat that already ends with an assistant message keeps that
    message as its answer. Prompts are batched by token length (left padding) to waste little on padding.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    total = len(prompts)
    records: list[dict | None] = [None] * total
    todo: list[tuple[int, list[int]]] = []
    for i, p in enumerate(prompts):
        if p.category == USER_TEXT:
            records[i] = {"id": p.id, "category": p.category, "text": p.text}
        elif p.messages[-1]["role"] == "assistant":
            records[i] = {"id": p.id, "category": p.category, "messages": [dict(m) for m in p.messages[:-1]],
                          "answer": p.messages[-1]["content"], "finished": True}
        else:
            todo.append((i, chat_ids(tokenizer, p.messages, add_generation_prompt=True)))
    done = total - len(todo)
    if progress is not None:
        progress(done, total)

    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    todo.sort(key=lambda t: len(t[1]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    decoding = ({"do_sample": False, "temperature": None} if sample is None else
                {"do_sample": True, "temperature": sample[0]})
    try:
        with torch.inference_mode(), torch.random.fork_rng(devices=[]):
            if sample is not None:
                torch.manual_seed(sample[1])
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                width = max(len(ids) for _, ids in batch)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, (_, ids) in enumerate(batch):  # left padding
                    input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                    attention[row, width - len(ids):] = 1
                out = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention.to(device),
                    max_new_tokens=max_new_tokens, num_beams=1, top_p=None, top_k=None, **decoding,
                    eos_token_id=eos, pad_token_id=pad,
                )
                new = out[:, width:].tolist()
                for row, (i, _) in enumerate(batch):
                    toks = new[row]
                    stop = next((k for k, t in enumerate(toks) if t in eos), None)
                    answer_ids = toks if stop is None else toks[:stop]
                    p = prompts[i]
                    records[i] = {
                        "id": p.id, "category": p.category, "messages": [dict(m) for m in p.messages],
                        "answer": tokenizer.decode(answer_ids, skip_special_tokens=True).strip(),
                        "finished": stop is not None,
                    }
                done += len(batch)
                if progress is not None:
                    progress(done, total)
    finally:
        if was_training:
            model.train()
    return records  # type: ignore[return-value]


def _special_ids(tokenizer) -> set[int]:
    ids = {int(t) for t in tokenizer.all_special_ids}
    for tid, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            ids.add(int(tid))
    return ids


def _mask_turn(tokenizer, r: dict, turn: int, ids: list[int], mask: list[int], special: set[int]) -> None:
    """Set ``mask`` to 1 on the tokens of the assistant message ``r["messages"][turn]`` and its end-of-turn
    token, found as for the answer: after the conversation before it, rendered with the generation prompt."""
    msgs = r["messages"]
    if not 0 <= turn < len(msgs) or msgs[turn]["role"] != "assistant":
        raise ValueError(f"record {r['id']!r}: loss_turns names message {turn}, which is not an assistant turn")
    before = chat_ids(tokenizer, msgs[:turn], add_generation_prompt=True)
    if ids[:len(before)] != before:
        # the teacher's own template: bad input, not our bug
        raise UserError(f"record {r['id']!r}: the chat template does not tokenize the conversation with turn "
                         f"{turn}'s prompt as a prefix; cannot locate that turn's tokens")
    stop = next((k for k in range(len(before), len(ids)) if ids[k] in special), len(ids) - 1)
    for k in range(len(before), stop + 1):
        mask[k] = 1


def tokenize_records(tokenizer, records: Iterable[dict], *, max_len: int) -> list[dict]:
    """Training sequences ``{"id", "category", "input_ids", "loss_mask"}``.

    A chat record becomes the full templated conversation (messages + the assistant answer) cut right after
    the answer's end-of-turn token; ``loss_mask`` is 1 on the answer tokens and that end-of-turn token, 0 on
    the prompt. A chat record may list in ``loss_turns`` the indices of earlier assistant messages that are
    answers too (a follow-up's first answer, data/augment.py): those turns, each with its end-of-turn token,
    are masked 1 too; other earlier assistant messages (a bundled chat's hand-written context) stay 0.
    A text record is its text's tokens, all with mask 1. Sequences longer than ``max_len`` are cut on the
    right (a long prompt can leave no answer tokens: such a record has an all-zero mask).
    """
    if max_len < 1:
        raise ValueError("max_len must be >= 1")
    special = _special_ids(tokenizer)
    out = []
    for r in records:
        if "answer" not in r:
            if "text" not in r:
                raise ValueError(f"record {r.get('id')!r} has neither 'answer' nor 'text'")
            ids = [int(t) for t in tokenizer(r["text"], add_special_tokens=False)["input_ids"]]
            mask = [1] * len(ids)
        else:
            prompt_ids = chat_ids(tokenizer, r["messages"], add_generation_prompt=True)
            full = chat_ids(tokenizer, list(r["messages"]) + [{"role": "assistant", "content": r["answer"]}],
                            add_generation_prompt=False)
            n = len(prompt_ids)
            if full[:n] != prompt_ids:
                raise ValueError(f"record {r['id']!r}: the chat template does not tokenize the conversation with "
                                 "the prompt as a prefix; cannot locate the answer tokens")
            end = next((k for k in range(n, len(full)) if full[k] in special), len(full) - 1)
            ids = full[:end + 1]
            mask = [0] * n + [1] * (end + 1 - n)
            for turn in r.get("loss_turns", ()):
                _mask_turn(tokenizer, r, turn, ids, mask, special)
        out.append({"id": r["id"], "category": r["category"], "input_ids": ids[:max_len],
                    "loss_mask": mask[:max_len]})
    return out


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    """Write one JSON object per line; the file appears under its name only once complete."""
    from edgedistill import atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
