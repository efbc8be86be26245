"""Distillation modes: what the student learns from, beyond one white-box teacher's logits.

- white_box (default): the teacher's next-token distributions on the training rows (losses.kd_loss).
- black_box: only the teacher's text. The loss is cross-entropy on the answer tokens
  (response_ce); the teacher model is never run in training, so an API-only teacher's answers,
  given as JSONL chats that end with the assistant's message, are enough for the loop.
- on-policy (GKD, Agarwal et al. 2024), with white_box or self: on a seeded, deterministic
  fraction lambda of the steps (on_policy_step) the batch is the student's own continuations of
  training prompts, sampled at temperature 1 (on_policy_batch), and the coach scores them; the
  loss on those batches is the soft term alone (no cross-entropy on the student's own samples).
- multi-teacher ensemble: the coach's distribution is the mean of the teachers' distributions at
  the training temperature (TeacherEnsemble, ensemble_log_probs). The teachers must share one
  tokenizer (check_shared_tokenizer).
- self: the coach is an exponential moving average of the student itself, a "mean teacher"
  (EmaTeacher): theta_T <- m theta_T + (1 - m) theta_S after every optimizer step, with m
  following a cosine schedule from ema_momentum to ema_momentum_end.

The trainer's loop calls these pieces; each keeps its own state small and its randomness seeded
apart from the global RNG, so a resumed run ends bit-identical to an uninterrupted one and every
process of a multi-process run makes the same choices for the same step.
"""

from __future__ import annotations

import copy
import hashlib
import math
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from edgedistill.errors import UserError

MODES = ("white_box", "black_box", "self")

# The mode settings of TrainConfig (and the config's distill section) with their defaults: left out
# of the run identity at these values, so checkpoints from before the modes existed still match.
DEFAULTS = {"mode": "white_box", "on_policy_fraction": 0.0, "on_policy_max_new_tokens": 64,
            "ema_momentum": 0.996, "ema_momentum_end": 1.0}

EMA_FILE = "ema_teacher.safetensors"  # the mean teacher's weights, inside each training checkpoint


def idle_settings(cfg) -> list[str]:
    """Names of the mode settings of TrainConfig `cfg` that change nothing: at their defaults, or
    read only by a mode or switch that is off."""
    used = {"on_policy_max_new_tokens": cfg.on_policy_fraction > 0,
            "ema_momentum": cfg.mode == "self", "ema_momentum_end": cfg.mode == "self"}
    return [name for name, default in DEFAULTS.items()
            if getattr(cfg, name) == default or not used.get(name, True)]


def check(cfg, teachers: int) -> None:
    """Refuse mode settings that mean nothing together (the config refuses them too, with the
    config's names; this guards direct use of the trainer). `teachers`: how many the run averages."""
    from edgedistill.distill.losses import LossSpec

    if cfg.mode not in MODES:
        raise ValueError(f"mode {cfg.mode!r} is not one of {', '.join(MODES)}")
    if not 0.0 <= cfg.on_policy_fraction <= 1.0:
        raise ValueError(f"on_policy_fraction must be in [0, 1], got {cfg.on_policy_fraction}")
    if cfg.on_policy_max_new_tokens < 1:
        raise ValueError("on_policy_max_new_tokens must be >= 1")
    if not 0.0 <= cfg.ema_momentum <= cfg.ema_momentum_end <= 1.0:
        raise ValueError(f"EMA momentum must rise within [0, 1]: got {cfg.ema_momentum} -> {cfg.ema_momentum_end}")
    if cfg.mode == "black_box":
        if cfg.on_policy_fraction > 0 or teachers > 1 or cfg.logit_cache or cfg.loss != LossSpec():
            raise ValueError("black_box mode trains on the teacher's text alone: no on-policy batches, "
                             "teacher ensemble, logit cache or soft-target/layer loss settings")
    if cfg.mode == "self" and (teachers > 1 or cfg.logit_cache or cfg.loss.hidden_weight > 0
                               or cfg.loss.attention_weight > 0):
        raise ValueError("self mode distills the logits of the student's own moving average: no teacher "
                         "ensemble, logit cache or hidden-state/attention terms")
    if teachers > 1 and cfg.loss.confidence_weighting:
        raise ValueError("confidence_weighting reads one teacher's own confidence; it is not defined for an ensemble")


# ---------------------------------------------------------------- black box

def response_ce(student_out, labels: Tensor, mask: Tensor) -> tuple[Tensor, dict]:
    """Black-box loss: cross-entropy of the student on the answer tokens (mask == 1), nothing else.
    float32 whatever the logits' dtype; an all-masked batch gives a zero that still has a gradient."""
    logits = student_out.logits
    keep = mask.reshape(-1).bool()
    chosen = logits.reshape(-1, logits.shape[-1])[keep]
    if chosen.shape[0] == 0:
        ce = logits.sum() * 0.0
    else:
        ce = F.cross_entropy(chosen.to(torch.promote_types(chosen.dtype, torch.float32)), labels.reshape(-1)[keep])
    return ce, {"ce": ce.detach()}


# ---------------------------------------------------------------- on-policy (GKD)

def _derived(*parts) -> int:
    """A 63-bit integer from `parts` (a seed, a step, a purpose): the same on every process and run."""
    digest = hashlib.sha256(" ".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def on_policy_step(step: int, fraction: float, seed: int) -> bool:
    """Whether step `step` trains on the student's own samples: a Bernoulli(fraction) draw seeded by
    (seed, step) alone, so resume and every process of a run agree; 0 never, 1 always."""
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    return _derived("on-policy", seed, step) / 2**63 < fraction


def prompt_pool(examples: list[dict], seq_len: int, max_new_tokens: int) -> list[Tensor]:
    """The prompts on-policy batches continue: each chat example's tokens before its first answer
    token (loss_mask == 1), where prompt and max_new_tokens fit in one training row. Text examples
    (all tokens supervised) have no prompt and are left out."""
    pool = []
    for e in examples:
        first = next((i for i, m in enumerate(e["loss_mask"]) if m), None)
        if first and first + max_new_tokens <= seq_len + 1:
            pool.append(torch.tensor(e["input_ids"][:first], dtype=torch.long))
    if not pool:
        raise UserError(f"on-policy distillation needs chat examples whose prompt leaves room for "
                        f"{max_new_tokens} new tokens in a row of {seq_len}: none does (lower "
                        f"distill.on_policy_max_new_tokens or raise distill.seq_len)")
    return pool


def _eos_and_pad(model) -> tuple[list[int], int]:
    ids: list[int] = []
    for src in (getattr(model.generation_config, "eos_token_id", None), model.config.eos_token_id):
        for t in (src if isinstance(src, (list, tuple)) else [src]):
            if t is not None and int(t) not in ids:
                ids.append(int(t))
    pad = getattr(model.generation_config, "pad_token_id", None)
    pad = model.config.pad_token_id if pad is None else pad
    if pad is None:
        pad = ids[0] if ids else 0
    return ids, int(pad[0] if isinstance(pad, (list, tuple)) else pad)


@torch.no_grad()
def on_policy_batch(model, prompts: list[Tensor], *, rows: int, max_new_tokens: int, seed: int, step: int,
                    rank: int = 0, autocast=nullcontext) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`rows` continuations by `model` (the unwrapped student) of prompts drawn from `prompts`, as a
    training batch (input_ids, labels, mask, position_ids) on the model's device.

    Prompts are drawn and tokens sampled (temperature 1, no top-k/top-p) with seeds from (seed,
    step, rank), apart from the global RNG: the same batch on resume, another on each process. A
    continuation ends after its first end-of-sequence token or at max_new_tokens. Row r holds
    prompt + continuation, right-padded; mask is 1 where the label is a sampled token, so only the
    student's own tokens are scored. position_ids count from 0 in every row (one sequence each).
    """
    from transformers import GenerationConfig

    g = torch.Generator().manual_seed(_derived("prompts", seed, step, rank))
    chosen = [prompts[i] for i in torch.randint(len(prompts), (rows,), generator=g).tolist()]
    eos, pad = _eos_and_pad(model)
    device = next(model.parameters()).device
    width = max(len(p) for p in chosen)
    input_ids = torch.full((rows, width), pad, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    for r, p in enumerate(chosen):  # left padding, as generate expects
        input_ids[r, width - len(p):] = p
        attention[r, width - len(p):] = 1
    sampling = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                                eos_token_id=eos or None, pad_token_id=pad)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast():
            torch.manual_seed(_derived("sample", seed, step, rank))
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                 generation_config=sampling)
    finally:
        model.train(was_training)

    sequences = []
    for r, p in enumerate(chosen):
        new = out[r, width:].tolist()
        stop = next((k for k, t in enumerate(new) if t in eos), None)
        sequences.append((p.tolist(), new if stop is None else new[:stop + 1]))
    length = max(len(p) + len(c) for p, c in sequences) - 1
    inputs = torch.full((rows, length), pad, dtype=torch.long)
    labels = torch.full((rows, length), pad, dtype=torch.long)
    mask = torch.zeros((rows, length), dtype=torch.long)
    for r, (p, c) in enumerate(sequences):
        s = torch.tensor(p + c, dtype=torch.long)
        inputs[r, :len(s) - 1], labels[r, :len(s) - 1] = s[:-1], s[1:]
        mask[r, len(p) - 1:len(s) - 1] = 1  # input position t predicts token t + 1: the sampled ones
    positions = torch.arange(length).expand(rows, -1)
    return tuple(t.to(device) for t in (inputs, labels, mask, positions))


# ---------------------------------------------------------------- multi-teacher ensemble

def ensemble_log_probs(logits: list[Tensor], temperature: float) -> Tensor:
    """log of the mean of the teachers' probabilities at `temperature`: log (1/n) sum_i softmax(z_i / tau),
    in float32 (float64 stays float64), one teacher's logits at a time."""
    total = None
    for z in logits:
        log_p = F.log_softmax(z.to(torch.promote_types(z.dtype, torch.float32)) / temperature, dim=-1)
        total = log_p if total is None else torch.logaddexp(total, log_p)
    return total - math.log(len(logits))


class TeacherEnsemble(torch.nn.Module):
    """Several teachers as one: called like a teacher, it returns logits tau * log p_bar, where p_bar
    is the mean of the teachers' distributions at tau.

    The loss reads the teacher's distribution as softmax(logits / tau) = softmax(log p_bar) = p_bar
    (p_bar sums to 1), so kd_loss, its top-k buckets and the logit cache all see the ensemble's
    distribution exactly. Hidden states and attention maps, which the layer terms read, are the
    first teacher's: the one the student was cut from, which the init stage's maps speak of. `config`
    is the first teacher's too.
    """

    def __init__(self, teachers: list[torch.nn.Module], temperature: float):
        super().__init__()
        widths = {t.config.vocab_size for t in teachers}
        if len(widths) > 1:
            raise ValueError(f"an ensemble's teachers must have one vocabulary; their widths are {sorted(widths)}")
        self.teachers = torch.nn.ModuleList(teachers)
        self.temperature = temperature

    @property
    def config(self):
        return self.teachers[0].config

    def set_attn_implementation(self, implementation: str) -> None:
        self.teachers[0].set_attn_implementation(implementation)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None, **kwargs):
        first = self.teachers[0](input_ids=input_ids, position_ids=position_ids, **kwargs)
        plain = {k: v for k, v in kwargs.items() if k not in ("output_hidden_states", "output_attentions")}
        logits = [first.logits] + [t(input_ids=input_ids, position_ids=position_ids, **plain).logits
                                   for t in self.teachers[1:]]
        mean = self.temperature * ensemble_log_probs(logits, self.temperature)
        return SimpleNamespace(logits=mean, hidden_states=getattr(first, "hidden_states", None),
                               attentions=getattr(first, "attentions", None))


def combine_teachers(teacher, temperature: float):
    """The trainer's teacher argument as one model: a list of several becomes their ensemble."""
    if isinstance(teacher, (list, tuple)):
        return teacher[0] if len(teacher) == 1 else TeacherEnsemble(list(teacher), temperature)
    return teacher


def check_shared_tokenizer(named: list[tuple[str, object]]) -> None:
    """Refuse an ensemble whose teachers do not share a tokenizer: averaging distributions needs
    token id i to be the same token for every teacher. named: (teacher name, tokenizer), the
    build's teacher first."""
    from edgedistill.distill.stage import tokenizer_fingerprint  # that module imports this one

    (first, tok), *rest = named
    want = tokenizer_fingerprint(tok)
    for name, other in rest:
        if tokenizer_fingerprint(other) != want:
            raise UserError(f"teachers {first!r} and {name!r} do not share a tokenizer (vocabularies of "
                            f"{len(tok.get_vocab())} and {len(other.get_vocab())} tokens, or different special "
                            f"tokens); an ensemble averages distributions over the same token ids: use teachers "
                            f"of one model family")


# ---------------------------------------------------------------- self-distillation: the mean teacher

def momentum_at(step: int, steps: int, start: float, end: float) -> float:
    """EMA momentum after optimizer step `step` (0-based) of `steps`: start at the first, end at the
    last, cosine in between (BYOL's schedule), so the mean teacher settles as training ends."""
    if steps <= 1:
        return end
    progress = min(step / (steps - 1), 1.0)
    return end - (end - start) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _plain_name(name: str) -> str:
    """A parameter's name without fake-quant's parametrization: the float master weight's usual name."""
    return name.replace(".parametrizations.weight.original", ".weight")


class EmaTeacher:
    """A frozen float copy of the student, moved toward it after every optimizer step:
    theta_T <- m theta_T + (1 - m) theta_S, m = momentum_at(step, ...).

    It tracks the student's float master weights (under fake-quant too) and is itself never
    fake-quantized; learned quantization scales are not part of it. With an accelerator, its weights
    are saved in (and restored from) every training checkpoint, as EMA_FILE, through accelerate's
    save/load hooks, so a resumed run ends bit-identical to an uninterrupted one.
    """

    def __init__(self, student: torch.nn.Module, *, steps: int, start: float, end: float, accelerator=None):
        from edgedistill.distill.qat import disable_fake_quant, fake_quant_spec, learned_scales

        if fake_quant_spec(student) is not None:
            raise ValueError("start the mean teacher from the student before fake-quant is switched on")
        self.model = copy.deepcopy(student)
        disable_fake_quant(self.model)
        learned_scales(self.model, remove=True)
        self.model.eval().requires_grad_(False)
        self.steps, self.start, self.end = steps, start, end
        if accelerator is not None:
            self.model.to(accelerator.device)
            accelerator.register_save_state_pre_hook(
                lambda models, weights, folder: self.save(folder) if accelerator.is_main_process else None)
            accelerator.register_load_state_pre_hook(lambda models, folder: self.load(folder))

    def momentum(self, step: int) -> float:
        return momentum_at(step, self.steps, self.start, self.end)

    @torch.no_grad()
    def update(self, student: torch.nn.Module, step: int) -> float:
        """One EMA step after optimizer step `step`; returns the momentum used."""
        m = self.momentum(step)
        source = {_plain_name(n): p for n, p in student.named_parameters(remove_duplicate=False)}
        for name, p in self.model.named_parameters():
            p.lerp_(source[name].detach().to(p.dtype), 1.0 - m)
        return m

    def save(self, folder) -> None:
        from safetensors.torch import save_file

        # named_parameters lists a tied weight once, so the file holds no shared tensors
        save_file({n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters()},
                  str(Path(folder) / EMA_FILE))

    @torch.no_grad()
    def load(self, folder) -> None:
        from safetensors.torch import load_file

        state = load_file(str(Path(folder) / EMA_FILE))
        for name, p in self.model.named_parameters():
            p.copy_(state[name])
