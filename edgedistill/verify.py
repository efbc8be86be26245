"""Stage `verify`: load every artifact in its real runtime and compare it with the PyTorch fake-quant student.

Two comparisons per artifact: the dequantized weights in the file against the fake-quant weights,
and next-token logits on held-out text (top-1 agreement, KL) against the fake-quant student.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgedistill.data.teacher_answers import read_jsonl
from edgedistill.formats import FORMATS
from edgedistill.progress import task_progress


def prompt_part(example: dict) -> list[int]:
    """The tokens before the first answer token: the templated prompt."""
    mask = example["loss_mask"]
    first = mask.index(1) if 1 in mask else len(mask)
    return example["input_ids"][:first]


def eval_sequences(examples: list[dict], budget: int) -> list[list[int]]:
    seqs, total = [], 0
    for ex in examples:
        if total >= budget:
            break
        ids = ex["input_ids"][: budget - total]
        if len(ids) > 1:
            seqs.append(ids)
            total += len(ids)
    return seqs


def logit_agreement(ref: np.ndarray, got: np.ndarray) -> dict:
    """Top-1 agreement and mean KL(ref || got) over positions, in float64."""
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    lp = ref64 - np.logaddexp.reduce(ref64, axis=-1, keepdims=True)
    lq = got64 - np.logaddexp.reduce(got64, axis=-1, keepdims=True)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {"top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()), "kl": float(kl.mean()),
            "positions": int(ref.shape[0])}


def weight_parity(artifact: Path, fmt: str, reference: torch.nn.Module) -> dict:
    from edgedistill.export.gguf import dequantize_gguf_tensors
    from edgedistill.export.onnx import dequantize_onnx_weights

    weights = (dequantize_gguf_tensors if FORMATS[fmt].runtime == "llamacpp" else dequantize_onnx_weights)(artifact)
    ref = {k: v.detach().float().numpy() for k, v in reference.state_dict().items()}
    diffs = {k: float(np.abs(w - ref[k]).max()) for k, w in weights.items() if k in ref and ref[k].shape == w.shape}
    worst = max(diffs, key=diffs.get) if diffs else None
    return {"tensors_compared": len(diffs), "max_abs_diff": diffs[worst] if worst else None, "worst_tensor": worst}


def run(ctx) -> dict:
    from edgedistill.distill.qat import fake_quant_model_copy
    from edgedistill.distill.stage import load_student
    from edgedistill.runtime import load_runner

    _, tok = ctx.session.teacher(ctx["teacher"])
    student = load_student(ctx["distill"].path("student"))
    heldout = read_jsonl(ctx["data"].path("heldout_tokens.jsonl"))
    seqs = eval_sequences(heldout, ctx.cfg.eval.verify_tokens)
    results = {}
    artifacts = ctx["export"].summary["artifacts"]
    group_bits = ctx["plan"].summary["student"].get("group_bits") or None
    with task_progress("verify", len(artifacts), ctx.session.progress) as advance:
        for fmt, art in artifacts.items():
            path = ctx["export"].path(art["file"])
            reference = fake_quant_model_copy(student, fmt, group_bits).eval()
            runner = load_runner(path, fmt)
            try:
                refs, gots = [], []
                for ids in seqs:
                    with torch.inference_mode():
                        refs.append(reference(torch.tensor([ids])).logits[0].float().numpy())
                    gots.append(runner.logits(ids))
                parity = logit_agreement(np.concatenate(refs), np.concatenate(gots))
                prompt = prompt_part(heldout[0])
                gen = runner.generate(prompt, 32, stop_ids=[tok.eos_token_id])
            finally:
                runner.close()
            parity["weights"] = weight_parity(path, fmt, reference)
            parity["sample"] = {"prompt": tok.decode(prompt), "reply": tok.decode(gen.tokens, skip_special_tokens=True),
                                "tokens": len(gen.tokens)}
            results[fmt] = parity
            advance()
    return {"artifacts": results}
