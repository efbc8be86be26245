"""Knowledge-distillation loss: soft teacher targets at temperature tau mixed with hard-label CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Rows (positions) per chunk. Each chunk's float32 log-softmax buffers are recomputed in backward
# instead of being kept, so peak memory is a few [CHUNK, V] tensors, not several [B*L, V] ones.
CHUNK_ROWS = 1024


def _chunk_sums(s: Tensor, t: Tensor, y: Tensor, temperature: float) -> Tensor:
    """Summed KL(teacher || student) at temperature and summed CE, over the rows of one chunk."""
    dtype = torch.promote_types(s.dtype, torch.float32)
    s, t = s.to(dtype), t.to(dtype)
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    # Tokens the teacher rules out (logit -inf) contribute 0, not 0 * inf.
    p = log_p.exp()
    kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum()
    ce = F.cross_entropy(s, y, reduction="sum")
    return torch.stack((kl, ce))


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels_mask: Tensor, labels: Tensor, *,
            temperature: float, alpha: float) -> tuple[Tensor, dict]:
    """L = alpha * tau^2 * KL(softmax(z_T/tau) || softmax(z_S/tau)) + (1 - alpha) * CE(z_S, labels).

    Logits are [B, L, V]; labels and labels_mask are [B, L], already shifted so that position t
    predicts labels[t]. Both terms are means over the positions where labels_mask == 1. The tau^2
    factor keeps the soft-target gradient on the same scale as CE whatever the temperature
    (Hinton et al., 2015). Computation is in float32 (float64 inputs stay float64) whatever the
    logits' dtype. Returns the loss and the detached components {"kl", "ce"} (kl without tau^2).
    """
    keep = labels_mask.reshape(-1).bool()
    vocab = student_logits.shape[-1]
    # Only supervised positions take part: gathering them first also skips work on prompt tokens.
    s = student_logits.reshape(-1, vocab)[keep]
    t = teacher_logits.reshape(-1, vocab)[keep].detach()
    y = labels.reshape(-1)[keep]
    n = s.shape[0]

    sums = s.new_zeros(2, dtype=torch.promote_types(s.dtype, torch.float32))
    for i in range(0, n, CHUNK_ROWS):
        args = (s[i:i + CHUNK_ROWS], t[i:i + CHUNK_ROWS], y[i:i + CHUNK_ROWS], temperature)
        if s.requires_grad:
            sums = sums + checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            sums = sums + _chunk_sums(*args)
    # An all-masked batch gives a zero loss that still depends on the logits, so backward works.
    kl, ce = sums / max(n, 1)
    if n == 0:
        kl = ce = student_logits.sum() * 0.0
    loss = alpha * temperature**2 * kl + (1.0 - alpha) * ce
    return loss, {"kl": kl.detach(), "ce": ce.detach()}
