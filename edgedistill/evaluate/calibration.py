"""Calibration of the model's next-token probabilities: when it gives its top token probability p,
is that token right a fraction p of the time?

Distillation can keep the teacher's top-1 choices while making the student over- or under-confident
(a sharpened or flattened distribution), which matters to anything that thresholds or samples from
its probabilities. Two references are used at the same scored positions (loss_mask[t + 1] == 1, as
in measure.quality):
- vs_teacher: the top token is "right" when it is the teacher's top token;
- vs_text: it is "right" when it is the actual next token of the example.
A tie for the top counts as right, as top1_agreement counts it in measure.quality.

Expected calibration error (ECE) uses equal-width confidence bins over [0, 1]:
    ECE = sum_b (n_b / N) |accuracy_b - confidence_b|
Per-bin figures are returned for the reliability diagram of the HTML report.
"""

from __future__ import annotations

import torch
from torch import Tensor

from edgedistill.measure.quality import Model, _answer_log_probs, _positions


def reliability(confidence: Tensor, correct: Tensor, bins: int = 15) -> dict:
    """{"ece", "bins", "positions"} of predictions with the given confidences and correctness.

    bins holds one {"lo", "hi", "count", "confidence", "accuracy"} per equal-width bin (confidence
    and accuracy are bin means, None for an empty bin); a confidence of exactly 1 falls in the last
    bin. ece is None when there are no positions.
    """
    if bins < 1:
        raise ValueError("bins must be >= 1")
    conf = torch.as_tensor(confidence, dtype=torch.float64).flatten()
    hit = torch.as_tensor(correct).flatten().to(torch.float64)
    if conf.shape != hit.shape:
        raise ValueError(f"{conf.numel()} confidences for {hit.numel()} outcomes")
    if conf.numel() and (conf.min() < 0 or conf.max() > 1):
        raise ValueError("confidences must lie in [0, 1]")
    index = (conf * bins).floor().long().clamp(max=bins - 1)
    counts = torch.bincount(index, minlength=bins)
    conf_sum = torch.bincount(index, weights=conf, minlength=bins)
    hit_sum = torch.bincount(index, weights=hit, minlength=bins)
    total = conf.numel()
    out_bins, ece = [], 0.0
    for b in range(bins):
        n = int(counts[b])
        mean_conf = float(conf_sum[b]) / n if n else None
        mean_acc = float(hit_sum[b]) / n if n else None
        if n:
            ece += n / total * abs(mean_acc - mean_conf)
        out_bins.append({"lo": b / bins, "hi": (b + 1) / bins, "count": n, "confidence": mean_conf,
                         "accuracy": mean_acc})
    return {"ece": ece if total else None, "bins": out_bins, "positions": total}


def model_calibration(model: Model, examples: list[dict], *, teacher_targets: list[dict] | None = None,
                      batch_size: int = 8, bins: int = 15) -> dict:
    """{"vs_teacher": reliability(...) or None without teacher_targets, "vs_text": reliability(...)}
    of the model's top next-token probability at the scored positions, in one pass over the examples.

    teacher_targets is measure.quality.teacher_targets(teacher, examples): its top_ids[:, 0] is the
    teacher's top token at each scored position.
    """
    if teacher_targets is not None and len(teacher_targets) != len(examples):
        raise ValueError(f"{len(teacher_targets)} teacher targets for {len(examples)} examples")
    confidence, vs_text, vs_teacher = [], [], []
    for i, (ex, logq) in enumerate(zip(examples, _answer_log_probs(model, examples, batch_size))):
        _, labels = _positions(ex)
        top = logq.max(dim=-1).values
        confidence.append(top.exp().clamp(max=1.0))
        vs_text.append(logq.gather(-1, labels[:, None])[:, 0] >= top)
        if teacher_targets is not None:
            target = teacher_targets[i]
            if target["vocab"] != logq.shape[-1] or target["top_ids"].shape[0] != labels.shape[0]:
                raise ValueError("teacher targets do not match these examples or this model's vocabulary")
            vs_teacher.append(logq.gather(-1, target["top_ids"][:, :1])[:, 0] >= top)
    conf = torch.cat(confidence) if confidence else torch.zeros(0)
    text_hits = torch.cat(vs_text) if vs_text else torch.zeros(0, dtype=torch.bool)
    return {
        "vs_teacher": (reliability(conf, torch.cat(vs_teacher) if vs_teacher else torch.zeros(0, dtype=torch.bool),
                                   bins) if teacher_targets is not None else None),
        "vs_text": reliability(conf, text_hits, bins),
    }
