"""Distillation losses: what the student is trained to match, term by term.

Notation: P is the teacher's next-token distribution, Q the student's, both at temperature tau.

- soft-target term, one of (`objective`):
    forward_kl  KL(P || Q)                                   mass-covering (the classic KD loss)
    reverse_kl  KL(Q || P)                                   mode-seeking
    jsd         JSD(beta) = beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q
                (the GKD paper's generalized Jensen-Shannon, Agarwal et al. 2024). beta = 0 is taken
                as forward KL and beta = 1 as reverse KL exactly; inside (0, 1) the value is the
                mixture form above, which shrinks like beta (1 - beta) KL near either end, so a small
                beta is not a drop-in for forward KL at the same weight.
  scaled by tau^2 and mixed with hard-label cross-entropy by alpha (alpha_at gives a schedule);
  optionally over the teacher's top-k tokens plus one tail bucket, and optionally with positions
  weighted by the teacher's confidence;
- hidden_state_mse: decoder-layer outputs through learned projections W_l in [d_S, d_T];
- attention_transfer: attention probabilities at mapped layers, MSE or KL, each student head against
  the teacher head it was cut from (or teacher heads grouped when that is not known).

Vocabulary-sized terms run over chunks of rows under torch.utils.checkpoint, so the [rows, V]
float32 buffers of one chunk are alive at a time, never all of [B*L, V]. The top-k term can also
start from the student's final hidden states (kd_loss_top_k_from_hidden, kd_loss_from_hidden): the
lm_head is then applied inside the loss a chunk at a time, with loss and gradient taken in one pass,
so even the student's [B, L, V] logits are never built.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Rows (positions) per chunk. Each chunk's float32 log-softmax buffers are recomputed in backward
# instead of being kept, so peak memory is a few [CHUNK, V] tensors, not several [B*L, V] ones. The
# fused head loss cuts its rows the same way: smaller chunks would each pay a pass over the [V, d]
# weight gradient (measured on 2048 rows at V = 49152: 256-row chunks ~1.5x the time of 1024-row ones).
CHUNK_ROWS = 1024

# confidences [n] of this process's supervised positions -> the mean to divide them by (a scalar)
ConfidenceMean = Callable[[Tensor], Tensor]

OBJECTIVES = ("forward_kl", "reverse_kl", "jsd")
ALPHA_SCHEDULES = ("constant", "linear", "cosine")
ATTENTION_KINDS = ("mse", "kl")


@dataclass(frozen=True)
class LossSpec:
    """Which terms the training loss has and how they are weighted (the config's distill.loss).

    Temperature and the starting alpha stay where they always were, in TrainConfig / distill.
    """

    objective: str = "forward_kl"
    jsd_beta: float = 0.5
    alpha_schedule: str = "constant"
    alpha_end: float = 0.0  # alpha at the last step of a linear or cosine schedule
    hidden_weight: float = 0.0
    attention_weight: float = 0.0
    attention_kind: str = "kl"
    confidence_weighting: bool = False
    top_k: int = 0  # 0: the whole vocabulary

    def __post_init__(self):
        # the config validates these too; this guards direct use of the trainer
        for value, allowed in ((self.objective, OBJECTIVES), (self.alpha_schedule, ALPHA_SCHEDULES),
                               (self.attention_kind, ATTENTION_KINDS)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")
        for name in ("jsd_beta", "alpha_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("hidden_weight", "attention_weight", "top_k"):
            if not getattr(self, name) >= 0:  # also refuses NaN
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def _at_least_float32(x: Tensor) -> Tensor:
    """bf16/fp16 activations are compared in float32; float64 (gradient checks) stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ---------------------------------------------------------------- divergences, row by row
# Inputs are log-probabilities over the last dimension; results are one value per row.

def forward_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(P || Q) = sum_v p_v (log p_v - log q_v). Tokens with p_v = 0 add 0 (not 0 * inf)."""
    # the inner where also keeps the gradient finite where both sides are -inf (an empty tail bucket)
    return (log_p.exp() * torch.where(log_p > -math.inf, log_p - log_q, 0.0)).sum(-1)


def floor_log_probs(log_probs: Tensor) -> Tensor:
    """log-probabilities raised to at least log(smallest normal float): a zero probability becomes a
    tiny one. Where P has no mass (a -inf teacher logit, or an empty cached tail) KL(Q || P) is
    infinite and its gradient NaN; with the floor each such token costs q (log q - log tiny), large
    and finite, and pushes the student's mass off it. clamp passes no gradient below the floor,
    which is right for the -inf entries it changes."""
    return log_probs.clamp_min(math.log(torch.finfo(log_probs.dtype).tiny))


def reverse_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(Q || P): the student's mass where the teacher has little is what costs."""
    return forward_kl(log_q, floor_log_probs(log_p))


def generalized_jsd(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """beta KL(P || M) + (1 - beta) KL(Q || M) with M = beta P + (1 - beta) Q; forward KL at
    beta = 0 and reverse KL at beta = 1 (where the mixture form itself would be 0)."""
    if beta == 0.0:
        return forward_kl(log_p, log_q)
    if beta == 1.0:
        return reverse_kl(log_p, log_q)
    # floored inputs: where both sides are -inf (an empty tail bucket) logaddexp's gradient is NaN,
    # which a zero upstream gradient does not cancel; elsewhere the floor changes nothing
    log_m = torch.logaddexp(floor_log_probs(log_p) + math.log(beta), floor_log_probs(log_q) + math.log1p(-beta))
    return beta * forward_kl(log_p, log_m) + (1.0 - beta) * forward_kl(log_q, log_m)


def divergence(log_p: Tensor, log_q: Tensor, objective: str, beta: float = 0.5) -> Tensor:
    """The soft-target divergence between teacher P and student Q named by `objective`, per row."""
    if objective == "forward_kl":
        return forward_kl(log_p, log_q)
    if objective == "reverse_kl":
        return reverse_kl(log_p, log_q)
    if objective == "jsd":
        return generalized_jsd(log_p, log_q, beta)
    raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")


# ---------------------------------------------------------------- top-k buckets

def tail_log_mass(log_probs: Tensor, top_indices: Tensor) -> Tensor:
    """log of the probability outside `top_indices`, per row; -inf where nothing is left.

    A logsumexp over the remaining tokens, not log(1 - sum(top)), which loses everything to
    rounding when the top tokens hold nearly all the mass.
    """
    rest = log_probs.scatter(-1, top_indices, -math.inf)
    empty = (rest == -math.inf).all(-1, keepdim=True)
    # an all -inf row would give logsumexp a NaN gradient; give it zeros and mask the result instead
    lse = torch.logsumexp(torch.where(empty, 0.0, rest), dim=-1, keepdim=True)
    return torch.where(empty, -math.inf, lse).squeeze(-1)


def collapse_to_buckets(log_probs: Tensor, top_indices: Tensor) -> Tensor:
    """[rows, V] log-probabilities -> [rows, k + 1]: the k given tokens, then the rest as one bucket.

    Buckets partition the vocabulary, so the result is again a distribution and any divergence
    between two such collapsed distributions is >= 0, and 0 exactly when they agree bucket by bucket.
    """
    return torch.cat((log_probs.gather(-1, top_indices), tail_log_mass(log_probs, top_indices)[:, None]), dim=-1)


def teacher_top_k(log_p: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The teacher's k most likely tokens per row and its [rows, k + 1] bucketed log-probabilities."""
    top_indices = log_p.topk(min(k, log_p.shape[-1]), dim=-1).indices
    return top_indices, collapse_to_buckets(log_p, top_indices)


@torch.no_grad()
def teacher_buckets(teacher_logits: Tensor, k: int, temperature: float,
                    dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """[rows, V] teacher logits -> its top-k ids [rows, k] and bucketed log-probabilities [rows, k + 1]
    at `temperature`, computed in `dtype` a chunk of rows at a time: what kd_loss(top_k=k) compares
    the student with, and what the logit cache stores."""
    ids, buckets = [], []
    for i in range(0, teacher_logits.shape[0], CHUNK_ROWS):
        log_p = F.log_softmax(teacher_logits[i:i + CHUNK_ROWS].to(dtype) / temperature, dim=-1)
        index, bucketed = teacher_top_k(log_p, k)
        ids.append(index)
        buckets.append(bucketed)
    return torch.cat(ids), torch.cat(buckets)


# ---------------------------------------------------------------- confidence weights

def normalized_confidence(teacher_confidence: Tensor, mean: ConfidenceMean | None = None) -> Tensor:
    """Per-position weights proportional to the teacher's confidence, with mean 1.

    Mean 1 keeps a weighted mean on the scale of the unweighted one: positions where the teacher
    is sure count more, uncertain ones less, and the loss's size (so alpha and the lr) still fit.
    mean: what to divide by, from these confidences; by default their own mean. A process of a
    multi-process run passes the mean over every process's positions: divided by its own, each
    process's weighted mean would weigh its positions by 1/(its own total confidence), and the
    averaged gradients would not be those of one process over the global batch.
    """
    m = teacher_confidence.mean() if mean is None else mean(teacher_confidence)
    return teacher_confidence / m.clamp_min(torch.finfo(teacher_confidence.dtype).tiny)


@torch.no_grad()
def teacher_max_probability(teacher_logits: Tensor) -> Tensor:
    """[rows, V] logits -> [rows] the teacher's probability of its top token, at temperature 1
    (its actual confidence, whatever tau the loss uses); chunked like the losses."""
    out = []
    for i in range(0, teacher_logits.shape[0], CHUNK_ROWS):
        t = teacher_logits[i:i + CHUNK_ROWS]
        t = t.to(torch.promote_types(t.dtype, torch.float32))
        out.append((t.max(-1).values - torch.logsumexp(t, -1)).exp())
    return torch.cat(out) if out else teacher_logits.new_zeros(0, dtype=torch.float32)


# ---------------------------------------------------------------- the logit loss

def _chunk_sums(s: Tensor, t: Tensor, top_indices: Tensor | None, y: Tensor, weights: Tensor | None,
                temperature: float, objective: str, beta: float) -> Tensor:
    """Summed (weighted) soft-target divergence and summed CE over the rows of one chunk.

    t holds teacher logits [rows, V], or, with top_indices given, the teacher's bucketed
    log-probabilities [rows, k + 1] (teacher_buckets, or a logit cache).
    """
    dtype = torch.promote_types(s.dtype, torch.float32)
    s = s.to(dtype)
    log_q = F.log_softmax(s / temperature, dim=-1)
    if top_indices is None:
        log_p = F.log_softmax(t.to(dtype) / temperature, dim=-1)
    else:
        log_p, log_q = t.to(dtype), collapse_to_buckets(log_q, top_indices)
    d = divergence(log_p, log_q, objective, beta)
    soft = (d * weights).sum() if weights is not None else d.sum()
    ce = F.cross_entropy(s, y, reduction="sum")
    return torch.stack((soft, ce))


def _chunked_sums(s: Tensor, t: Tensor, top_indices: Tensor | None, y: Tensor, weights: Tensor | None,
                  **settings) -> Tensor:
    sums = s.new_zeros(2, dtype=torch.promote_types(s.dtype, torch.float32))
    for i in range(0, s.shape[0], CHUNK_ROWS):
        part = slice(i, i + CHUNK_ROWS)
        args = (s[part], t[part], None if top_indices is None else top_indices[part], y[part],
                None if weights is None else weights[part])
        if s.requires_grad:
            sums = sums + checkpoint(_chunk_sums, *args, **settings, use_reentrant=False)
        else:
            sums = sums + _chunk_sums(*args, **settings)
    return sums


def _mix(sums: Tensor, n: int, student_logits: Tensor, temperature: float, alpha: float) -> tuple[Tensor, dict]:
    # An all-masked batch gives a zero loss that still depends on the logits, so backward works.
    soft, ce = sums / max(n, 1)
    if n == 0:
        soft = ce = student_logits.sum() * 0.0
    loss = alpha * temperature**2 * soft + (1.0 - alpha) * ce
    # "soft": the objective's divergence, whichever it is (forward KL, reverse KL or JSD)
    return loss, {"soft": soft.detach(), "ce": ce.detach()}


def _rows(x: Tensor, keep: Tensor) -> Tensor:
    """[B, L, ...] -> the supervised positions' rows [n, ...]."""
    return x.reshape(-1, *x.shape[2:])[keep]


def _weighs(confidence_weighting: bool, rows: int, mean: ConfidenceMean | None) -> bool:
    # a shared mean is a collective: every process takes part, with no supervised rows too
    return confidence_weighting and (rows > 0 or mean is not None)


def _teacher_rows(teacher_logits: Tensor, keep: Tensor, confidence_weighting: bool,
                  mean: ConfidenceMean | None = None) -> tuple[Tensor, Tensor | None]:
    """The supervised positions' teacher logits [n, V] and, when asked, their confidence weights."""
    t = _rows(teacher_logits, keep).detach()
    weights = (normalized_confidence(teacher_max_probability(t), mean)
               if _weighs(confidence_weighting, len(t), mean) else None)
    return t, weights


def _cached_rows(top_indices: Tensor, top_log_probs: Tensor, tail_log_probs: Tensor, keep: Tensor,
                 confidence_weighting: bool, mean: ConfidenceMean | None = None
                 ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The supervised positions' cached top-k ids [n, k], bucketed log-probabilities [n, k + 1] and,
    when asked, confidence weights (the largest cached probability, at the cache's temperature)."""
    k = top_indices.shape[-1]
    idx = _rows(top_indices, keep)
    buckets = torch.cat((top_log_probs.reshape(-1, k), tail_log_probs.reshape(-1, 1)), dim=-1)[keep].detach()
    weights = None
    if _weighs(confidence_weighting, len(buckets), mean):
        weights = normalized_confidence(_at_least_float32(buckets[:, :k]).max(-1).values.exp(), mean)
    return idx, buckets, weights


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels_mask: Tensor, labels: Tensor, *,
            temperature: float, alpha: float, objective: str = "forward_kl", beta: float = 0.5, top_k: int = 0,
            confidence_weighting: bool = False, confidence_mean: ConfidenceMean | None = None) -> tuple[Tensor, dict]:
    """L = alpha * tau^2 * D(P, Q) + (1 - alpha) * CE(z_S, labels), P = softmax(z_T/tau), Q = softmax(z_S/tau).

    D is the `objective`'s divergence (see the module doc). Logits are [B, L, V]; labels and
    labels_mask are [B, L], already shifted so that position t predicts labels[t]. Both terms are
    means over the positions where labels_mask == 1. The tau^2 factor keeps the soft-target
    gradient on the same scale as CE whatever the temperature (Hinton et al., 2015).

    top_k > 0: D between the teacher's and the student's distributions collapsed to the teacher's
    top-k tokens plus one tail bucket (what a top-k logit cache can reproduce); top_k >= V is the
    full D. confidence_weighting: D's mean is weighted by the teacher's top-token probability
    (temperature 1) normalized to mean 1 over the supervised positions; CE stays unweighted, as the
    labels' trust does not depend on the teacher's. confidence_mean: see normalized_confidence.

    Computation is in float32 (float64 inputs stay float64) whatever the logits' dtype. Returns the
    loss and the detached components {"soft": D without tau^2, "ce"}.
    """
    keep = labels_mask.reshape(-1).bool()
    # Only supervised positions take part: gathering them first also skips work on prompt tokens.
    s, y = _rows(student_logits, keep), _rows(labels, keep)
    t, weights = _teacher_rows(teacher_logits, keep, confidence_weighting, confidence_mean)
    top_indices = None
    if top_k and len(t):  # the teacher's buckets once, not again in the backward pass of each checkpointed chunk
        top_indices, t = teacher_buckets(t, top_k, temperature, torch.promote_types(s.dtype, torch.float32))
    sums = _chunked_sums(s, t, top_indices, y, weights, temperature=temperature, objective=objective, beta=beta)
    return _mix(sums, s.shape[0], student_logits, temperature, alpha)


def kd_loss_top_k(student_logits: Tensor, top_indices: Tensor, top_log_probs: Tensor, tail_log_probs: Tensor,
                  labels_mask: Tensor, labels: Tensor, *, temperature: float, alpha: float,
                  objective: str = "forward_kl", beta: float = 0.5, confidence_weighting: bool = False,
                  confidence_mean: ConfidenceMean | None = None) -> tuple[Tensor, dict]:
    """kd_loss against cached teacher outputs: per position the teacher's top-k token ids [B, L, k],
    their log-probabilities [B, L, k] and the log of the remaining mass [B, L].

    The student's distribution at tau is collapsed to the same k + 1 buckets, so D stays a true
    divergence: >= 0, and 0 exactly when the student's bucket masses equal the teacher's. The
    cached log-probabilities are used as they are: they must be at the training temperature (a
    tail bucket cannot be re-tempered exactly). Confidence is the largest cached probability, so
    it is taken at that temperature too (kd_loss takes it at temperature 1).
    """
    keep = labels_mask.reshape(-1).bool()
    s, y = _rows(student_logits, keep), _rows(labels, keep)
    idx, buckets, weights = _cached_rows(top_indices, top_log_probs, tail_log_probs, keep, confidence_weighting,
                                         confidence_mean)
    sums = _chunked_sums(s, buckets, idx, y, weights, temperature=temperature, objective=objective, beta=beta)
    return _mix(sums, s.shape[0], student_logits, temperature, alpha)


# ---------------------------------------------------------------- the top-k loss from the final hidden states
# The student's [B, L, V] logits are never built: the supervised rows of its final hidden states go
# through the lm_head weight a chunk of rows at a time, and each chunk's loss and its gradient come
# out of one pass over its [rows, V] logits, so only CHUNK_ROWS x V values exist at a time and
# backward recomputes nothing (it only scales the gradients by the incoming one).
#
# Its scratch ([rows, V]: two float32 tensors and one in the matmul's dtype, plus the weight's copy
# in that dtype and a [V, d] product) is kept between calls: on this machine faulting in fresh
# memory for a buffer costs more than the arithmetic that fills it (~0.8 s per GB).
_scratch: dict[tuple, Tensor] = {}


def _buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reusable scratch tensor of `shape` (a view of a kept one with at least as many rows)."""
    key = (name, dtype, device, shape[1:])
    held = _scratch.get(key)
    if held is None or held.shape[0] < shape[0]:
        held = _scratch[key] = torch.empty(shape, dtype=dtype, device=device)
    return held[:shape[0]]


class _FusedHeadTopK(torch.autograd.Function):
    """sum_r w_r D(P_r, Q_r) and sum_r CE_r over rows r of final hidden states h [rows, d], with the
    student's logits z = h W^T, Q = softmax(z / tau) collapsed to the teacher's top-k ids plus one
    tail bucket (P: the teacher's [rows, k + 1] bucketed log-probabilities), CE = logsumexp(z) - z_y.
    Returns (coef_soft * soft + coef_ce * ce, soft, ce); the last two carry no gradient.

    Per row, with the tail's largest logit m_t, e_v = exp((z_v - m_t) / tau) over the tail (the top-k
    entries set to 0) and T = sum of those e_v (>= 1: the tail's largest term is 1, so nothing
    underflows and no 1 - sum(top) cancels), the buckets are
        log q_top = z_top / tau - log S,   log q_tail = m_t / tau + log T - log S,
    log S the logsumexp of the k + 1 bucket terms. With g = dD/dlog q (autograd on [rows, k + 1],
    whatever the objective) and G = sum g, the chain rule through the buckets gives
        dD/dz_v = (g_v - q_v G) / tau                     for v in the top k,
        dD/dz_v = (e_v / T) (g_tail - q_tail G) / tau     for v in the tail,
    and dCE/dz = softmax(z) - onehot(y). dz W and dz^T h are the gradients of h and W.
    """

    @staticmethod
    def forward(ctx, hidden, weight, top_indices, log_p, labels, row_weights, coef_soft, coef_ce, temperature,
                objective, beta, matmul_dtype):
        device = hidden.device
        with torch.autocast(device.type, enabled=False):  # dtypes are chosen here, not by an outer autocast
            return _FusedHeadTopK._run(ctx, hidden, weight, top_indices, log_p, labels, row_weights, coef_soft,
                                       coef_ce, temperature, objective, beta, matmul_dtype)

    @staticmethod
    def _run(ctx, hidden, weight, top_indices, log_p, labels, row_weights, coef_soft, coef_ce, temperature,
             objective, beta, matmul_dtype):
        rows, width = hidden.shape
        vocab, device = weight.shape[0], hidden.device
        work = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
        mm = matmul_dtype or work
        need_h, need_w = ctx.needs_input_grad[:2]
        want_grad = need_h or need_w
        h_mm = hidden.detach().to(mm)
        w_mm = weight.detach() if weight.dtype == mm else \
            _buffer("w_mm", tuple(weight.shape), mm, device).copy_(weight.detach())
        grad_h = torch.empty(rows, width, dtype=work, device=device) if need_h else None
        grad_w = None  # the first chunk's product, then a sum
        soft_sum = ce_sum = torch.zeros((), dtype=work, device=device)
        inv_tau, tiny = 1.0 / temperature, torch.finfo(work).tiny
        for a in range(0, rows, CHUNK_ROWS):
            b = min(a + CHUNK_ROWS, rows)
            n = b - a
            idx, y = top_indices[a:b], labels[a:b, None]
            z = _buffer("z", (n, vocab), work, device)
            z_mm = None if mm == work else _buffer("z_mm", (n, vocab), mm, device)
            if z_mm is None:
                torch.mm(h_mm[a:b], w_mm.t(), out=z)
            else:
                z.copy_(torch.mm(h_mm[a:b], w_mm.t(), out=z_mm))
            z_top, z_y = z.gather(1, idx), z.gather(1, y)
            # the tail's largest logit: the top k hidden for one reduction, then put back
            m_tail = z.scatter_(1, idx, -math.inf).amax(1, keepdim=True)
            z.scatter_(1, idx, z_top)
            empty = m_tail == -math.inf  # k >= V: no tail at all
            m_tail = torch.where(empty, z_top.amax(1, keepdim=True), m_tail)
            e = torch.mul(z, inv_tau, out=_buffer("e", (n, vocab), work, device)).sub_(m_tail * inv_tau).exp_()
            e.scatter_(1, idx, 0.0)  # top entries (may be inf above m_tail) are not tail mass
            tail = e.sum(1, keepdim=True)
            log_tail = torch.where(empty, -math.inf, m_tail * inv_tau + tail.log())
            log_s = torch.logsumexp(torch.cat((z_top * inv_tau, log_tail), 1), 1, keepdim=True)
            log_q = torch.cat((z_top * inv_tau - log_s, log_tail - log_s), 1)
            with torch.enable_grad():
                leaf = log_q.requires_grad_(True)
                d = divergence(log_p[a:b].to(work), leaf, objective, beta)
                raw = (d * row_weights[a:b]).sum() if row_weights is not None else d.sum()
                g = torch.autograd.grad(coef_soft * raw, leaf)[0] if want_grad else None
            m = torch.maximum(m_tail, z_top.amax(1, keepdim=True))
            e1 = z.sub_(m).exp_()  # exp(z - max z), in z's buffer
            s1 = e1.sum(1, keepdim=True)
            soft_sum = soft_sum + raw.detach()
            ce_sum = ce_sum + (s1.log() + m - z_y).sum()
            if not want_grad:
                continue
            q = log_q.detach().exp()
            big_g = g.sum(1, keepdim=True)
            per_tail = torch.where(tail > 0, (g[:, -1:] - q[:, -1:] * big_g) * inv_tau / tail.clamp_min(tiny), 0.0)
            dz = e.mul_(per_tail).addcmul_(e1, coef_ce / s1)
            dz.scatter_add_(1, idx, (g[:, :-1] - q[:, :-1] * big_g) * inv_tau)
            dz.scatter_add_(1, y, torch.full_like(z_y, -coef_ce))
            dz = dz if z_mm is None else z_mm.copy_(dz)
            if need_h:
                grad_h[a:b] = torch.mm(dz, w_mm)
            if need_w:
                part = torch.mm(dz.t(), h_mm[a:b], out=_buffer("gw_mm", tuple(weight.shape), dz.dtype, device))
                grad_w = part.to(work, copy=True) if grad_w is None else grad_w.add_(part)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        loss = coef_soft * soft_sum + coef_ce * ce_sum
        ctx.mark_non_differentiable(soft_sum, ce_sum)
        return loss, soft_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_loss, _soft, _ce):
        grads = ctx.saved_tensors
        # the usual incoming gradient is 1: hand the [V, d] gradient over as it is (on CPU the check is free)
        if not (grad_loss.device.type == "cpu" and grad_loss.item() == 1.0):
            grads = [None if g is None else g * grad_loss for g in grads]
        return *(None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)), *(None,) * 10


def _head_loss(hidden: Tensor, weight: Tensor, top_indices: Tensor, log_p: Tensor, y: Tensor,
               weights: Tensor | None, *, temperature: float, alpha: float, objective: str, beta: float,
               matmul_dtype: torch.dtype | None) -> tuple[Tensor, dict]:
    """kd_loss's mix over supervised rows, the student's logits computed from `hidden` [rows, d] and
    the lm_head `weight` [V, d] inside _FusedHeadTopK."""
    n = hidden.shape[0]
    if n == 0:  # a zero that still reaches both, so backward works
        zero = (hidden.sum() + weight.sum()) * 0.0
        return zero, {"soft": zero.detach(), "ce": zero.detach()}
    loss, soft, ce = _FusedHeadTopK.apply(
        hidden, weight, top_indices, log_p.detach(), y, weights, alpha * temperature**2 / n, (1.0 - alpha) / n,
        temperature, objective, beta, matmul_dtype)
    return loss, {"soft": soft / n, "ce": ce / n}


def kd_loss_top_k_from_hidden(hidden: Tensor, head_weight: Tensor, top_indices: Tensor, top_log_probs: Tensor,
                              tail_log_probs: Tensor, labels_mask: Tensor, labels: Tensor, *, temperature: float,
                              alpha: float, objective: str = "forward_kl", beta: float = 0.5,
                              confidence_weighting: bool = False, confidence_mean: ConfidenceMean | None = None,
                              matmul_dtype: torch.dtype | None = None) -> tuple[Tensor, dict]:
    """kd_loss_top_k(hidden @ head_weight^T, ...) without the [B, L, V] logits: `hidden` [B, L, d] are
    the student's final hidden states (what its lm_head multiplies) and `head_weight` [V, d] the
    lm_head's weight (no bias). matmul_dtype: the dtype of the logits' and gradients' matmuls
    (bfloat16 under bf16 mixed precision; None: float32, or float64 for float64 inputs); the
    softmax arithmetic is float32 (float64) either way. Same value and gradient as kd_loss_top_k
    on those logits, up to rounding."""
    keep = labels_mask.reshape(-1).bool()
    h, y = _rows(hidden, keep), _rows(labels, keep)
    idx, buckets, weights = _cached_rows(top_indices, top_log_probs, tail_log_probs, keep, confidence_weighting,
                                         confidence_mean)
    return _head_loss(h, head_weight, idx, buckets, y, weights, temperature=temperature, alpha=alpha,
                      objective=objective, beta=beta, matmul_dtype=matmul_dtype)


def kd_loss_from_hidden(hidden: Tensor, head_weight: Tensor, teacher_logits: Tensor, labels_mask: Tensor,
                        labels: Tensor, *, temperature: float, alpha: float, top_k: int, objective: str = "forward_kl",
                        beta: float = 0.5, confidence_weighting: bool = False,
                        confidence_mean: ConfidenceMean | None = None,
                        matmul_dtype: torch.dtype | None = None) -> tuple[Tensor, dict]:
    """kd_loss(hidden @ head_weight^T, teacher_logits, ..., top_k=top_k) for top_k > 0, without the
    student's [B, L, V] logits (see kd_loss_top_k_from_hidden). The teacher's buckets and confidence
    are taken from its logits as kd_loss takes them."""
    if top_k <= 0:
        raise ValueError("the fused head loss compares top-k buckets: it needs top_k > 0")
    keep = labels_mask.reshape(-1).bool()
    h, y = _rows(hidden, keep), _rows(labels, keep)
    t, weights = _teacher_rows(teacher_logits, keep, confidence_weighting, confidence_mean)
    work = torch.promote_types(torch.promote_types(h.dtype, head_weight.dtype), torch.float32)
    top_indices, buckets = teacher_buckets(t, top_k, temperature, work) if len(t) else (y[:, None], h.new_zeros(0, 2))
    return _head_loss(h, head_weight, top_indices, buckets, y, weights, temperature=temperature, alpha=alpha,
                      objective=objective, beta=beta, matmul_dtype=matmul_dtype)


def alpha_at(step: int, steps: int, start: float, end: float, schedule: str) -> float:
    """The soft-target weight alpha at `step` of `steps`: constant `start`, or annealed from `start`
    at the first step to `end` at the last one (linearly, or along a half cosine), which moves
    the weight toward the hard labels when end < start."""
    if schedule == "constant" or steps <= 1:
        return start
    progress = min(step / (steps - 1), 1.0)
    if schedule == "linear":
        return start + (end - start) * progress
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown alpha schedule {schedule!r}; choose one of {', '.join(ALPHA_SCHEDULES)}")


# ---------------------------------------------------------------- hidden states

def selection_matrix(channels: list[int] | None, student_hidden: int, teacher_hidden: int) -> Tensor | None:
    """The [d_T, d_S] weight (nn.Linear's orientation) that puts student channel j back at the teacher
    channel it was cut from: W[channels[j], j] = 1. Without a recorded selection, the identity when
    the widths agree; None when nothing is known.

    The init stage cuts the student's residual stream out of the teacher's, so at the start h_S is
    close to h_T at those channels: the loss then starts from what the student already shares with
    the teacher instead of from a random map it must first unlearn.
    """
    if channels is None:
        return torch.eye(teacher_hidden) if student_hidden == teacher_hidden else None
    if len(channels) != student_hidden or len(set(channels)) != len(channels) or \
            not all(0 <= c < teacher_hidden for c in channels):
        raise ValueError(f"hidden channel selection of {len(channels)} channels does not map a width of "
                         f"{student_hidden} into one of {teacher_hidden}")
    w = torch.zeros(teacher_hidden, student_hidden)
    w[torch.tensor(channels), torch.arange(student_hidden)] = 1.0
    return w


class HiddenProjection(torch.nn.Module):
    """The learned W_l: d_S -> d_T (no bias), one per mapped student layer.

    A module of its own, beside the student: it trains and is checkpointed with it, but is not part
    of the model that gets exported. Calling it (rather than indexing its layers) lets a DDP wrapper
    see the forward and synchronize its gradients. `channels` (student channel -> teacher channel,
    the init stage's selection) starts every W_l at that selection (see selection_matrix); random
    only when no selection is known and the widths differ.
    """

    def __init__(self, n_layers: int, student_hidden: int, teacher_hidden: int, seed: int = 0,
                 channels: list[int] | None = None):
        super().__init__()
        # seeded apart from the global RNG, so that adding it leaves the run's other randomness as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.layers = torch.nn.ModuleList(torch.nn.Linear(student_hidden, teacher_hidden, bias=False)
                                              for _ in range(n_layers))
        start = selection_matrix(channels, student_hidden, teacher_hidden)
        if start is not None:
            with torch.no_grad():
                for w in self.layers:
                    w.weight.copy_(start)

    def forward(self, student_hidden: list[Tensor]) -> list[Tensor]:
        return [w(h.to(w.weight.dtype)) for w, h in zip(self.layers, student_hidden, strict=True)]


def hidden_state_mse(projected_student: list[Tensor], teacher_hidden: list[Tensor]) -> Tensor:
    """Mean over mapped layer pairs l of mean((h_S W_l - h_T)^2) / mean(h_T^2).

    h_S W_l [B, L, d_T] (HiddenProjection's output) and h_T [B, L, d_T] are the outputs of student
    layer l and of the teacher layer it maps to, at every position (prompt tokens' states feed the
    answer's predictions too). Dividing by the teacher's mean square makes each layer's term
    scale-free (1 = no better than predicting zeros): residual streams grow with depth and differ
    between models, and unscaled the deepest layers would drown the rest and no single weight
    would suit every teacher.
    """
    terms = []
    for h_s, h_t in zip(projected_student, teacher_hidden, strict=True):
        h_s, h_t = _at_least_float32(h_s), _at_least_float32(h_t.detach())
        error = (h_s - h_t).pow(2).mean()
        terms.append(error / h_t.pow(2).mean().clamp_min(torch.finfo(h_t.dtype).tiny))
    return torch.stack(terms).mean()


# ---------------------------------------------------------------- attention maps

def match_heads(teacher_attention: Tensor, student_heads: int,
                heads: list[int] | None = None) -> tuple[Tensor, bool]:
    """Teacher attention probabilities [B, H_T, L, L] brought to the student's heads.

    `heads` (student head -> the teacher head it was cut from, the init stage's head map): the
    init stage keeps the strongest kv groups and the strongest query heads inside each, so student
    head i is that one teacher head, and the maps are compared head to head.

    Without it (a student not cut by the init stage), a fallback: when H_T is a multiple of H_S,
    teacher heads are averaged in H_S contiguous groups (GQA orders query heads by kv group);
    otherwise both sides are compared head-averaged. An average of attention rows is still a
    distribution over keys. Returns the maps and whether the student's maps must be head-averaged too.
    """
    b, h_t, lq, lk = teacher_attention.shape
    if heads is not None:
        if len(heads) != student_heads or not all(0 <= h < h_t for h in heads):
            raise ValueError(f"head map {heads} does not map {student_heads} student heads onto {h_t} teacher heads")
        return teacher_attention[:, list(heads)], False
    if h_t % student_heads == 0:
        return teacher_attention.reshape(b, student_heads, h_t // student_heads, lq, lk).mean(2), False
    return teacher_attention.mean(1, keepdim=True), True


def attention_transfer(student_attention: list[Tensor], teacher_attention: list[Tensor], kind: str,
                       head_maps: list[list[int]] | None = None) -> Tensor:
    """Mean over mapped layer pairs of the distance between attention probabilities [B, H, L, L].

    kind="kl": KL(A_T || A_S) of each query row (a distribution over keys), averaged over batch,
    heads and queries. kind="mse": the squared error summed over keys, averaged the same way, so
    its size does not shrink as rows get longer. Heads are matched by match_heads, through
    head_maps[l] (pair l's student head -> teacher head) when given.
    """
    terms = []
    maps = head_maps if head_maps is not None else [None] * len(student_attention)
    for a_s, a_t, heads in zip(student_attention, teacher_attention, maps, strict=True):
        a_t, average_student = match_heads(_at_least_float32(a_t.detach()), a_s.shape[1], heads)
        a_s = _at_least_float32(a_s)
        a_s = a_s.mean(1, keepdim=True) if average_student else a_s
        if kind == "kl":
            # the causal mask gives both sides exact zeros above the diagonal (p = 0 adds 0); a
            # student probability that underflowed below it must not give log 0
            tiny = torch.finfo(a_s.dtype).tiny
            terms.append(forward_kl(a_t.clamp_min(0.0).log(), a_s.clamp_min(tiny).log()).mean())
        elif kind == "mse":
            terms.append((a_s - a_t).pow(2).sum(-1).mean())
        else:
            raise ValueError(f"unknown attention loss {kind!r}; choose one of {', '.join(ATTENTION_KINDS)}")
    return torch.stack(terms).mean()
