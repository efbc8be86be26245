"""The distillation loop: a student learns the frozen teacher's next-token distribution.

One process on a laptop CPU or many GPUs under `accelerate launch`: the same code, because model,
optimizer and data go through accelerate.Accelerator. Checkpoints are written atomically and hold
everything a resumed run needs to end with bit-identical weights to an uninterrupted one.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from itertools import chain
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import convert_to_fp32, set_seed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text
from torch.utils.data import DataLoader, TensorDataset

from edgedistill.distill.losses import (
    HiddenProjection,
    LossSpec,
    alpha_at,
    attention_transfer,
    hidden_state_mse,
    kd_loss,
    kd_loss_from_hidden,
    kd_loss_top_k,
    kd_loss_top_k_from_hidden,
)
from edgedistill import processes
from edgedistill.distill import logit_cache, modes
from edgedistill.distill.qat import (
    SCALE,
    QuantSpec,
    disable_fake_quant,
    enable_fake_quant,
    fake_quant_spec,
    init_learned_scales,
)
from edgedistill.errors import UserError
from edgedistill.prune import layer_map as evenly_spaced_layers


@dataclass
class TrainConfig:
    steps: int
    batch_size: int  # rows per process per step
    seq_len: int
    lr: float = 5e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    temperature: float = 2.0
    alpha: float = 0.7  # soft-target weight; where loss.alpha_schedule starts
    loss: LossSpec = field(default_factory=LossSpec)
    # student layer i -> the teacher layer it was cut from (the init stage's); None: evenly spaced
    layer_map: list[int] | None = None
    # student layer i -> per student head, the teacher head (of layer layer_map[i]) it was cut from;
    # None: the attention loss groups teacher heads instead
    head_map: list[list[int]] | None = None
    # student hidden channel j -> the teacher channel it was cut from; starts the hidden projections
    hidden_channels: list[int] | None = None
    qat: QuantSpec | None = None  # fake-quant of this artifact setting, from qat_start_step on
    qat_start_step: int = 0
    checkpoint_every: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    mixed_precision: str = "auto"  # "auto" | "no" | "bf16" | "fp16"
    # read the teacher's top-k (loss.top_k) from a logit cache on disk instead of running it each step
    logit_cache: bool = False
    # what the student learns from (modes.py): "white_box" the teacher's logits, "black_box" its text
    # alone (CE on the answers), "self" an EMA of the student ("mean teacher")
    mode: str = "white_box"
    on_policy_fraction: float = 0.0  # GKD's lambda: the share of steps on the student's own samples
    on_policy_max_new_tokens: int = 64
    ema_momentum: float = 0.996  # self mode: the EMA's momentum at the first step ...
    ema_momentum_end: float = 1.0  # ... and at the last (cosine schedule)


def resolve_precision(requested: str) -> str:
    """bf16 autocast where the hardware does bf16 math (measured 1.45x on this AVX512-BF16 CPU), else fp32."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() else "no"


def pack_rows(examples: list[dict], seq_len: int, rows: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Pack examples into `rows` training rows: (input_ids, labels, labels_mask, position_ids), each
    [rows, seq_len].

    The examples are concatenated into one token stream, in a fresh seeded order each epoch,
    repeating the set until the stream is long enough. Row r covers stream tokens
    [r*seq_len, r*seq_len + seq_len + 1): inputs are its first seq_len tokens, labels its last
    seq_len, so rows overlap by one token and no prediction is lost at a cut.

    loss_mask[i] == 1 marks token i as one the model should learn to produce (an answer token), so
    the mask of input position t is the loss_mask of its label, token t + 1.

    Packing wastes no compute on padding. position_ids restart at 0 where an example starts (a
    row that opens mid-example continues its count), so attention stays inside each example: given
    position_ids and no attention mask, transformers' mask builder reads the restarts as sequence
    boundaries and makes the mask block-diagonal (masking_utils.find_packed_sequence_indices), and
    RoPE sees each example from position 0, as at inference. Teacher and student get the same ids.
    """
    if not examples or not any(len(e["input_ids"]) for e in examples):
        raise UserError("no training examples to distill on")
    ids = [torch.tensor(e["input_ids"], dtype=torch.long) for e in examples]
    masks = [torch.tensor(e["loss_mask"], dtype=torch.long) for e in examples]
    if any(len(i) != len(m) for i, m in zip(ids, masks)):
        raise ValueError("every example needs a loss_mask as long as its input_ids")

    need = rows * seq_len + 1
    g = torch.Generator().manual_seed(seed)
    stream_ids, stream_mask, stream_pos, have = [], [], [], 0
    while have < need:
        for i in torch.randperm(len(examples), generator=g).tolist():
            stream_ids.append(ids[i])
            stream_mask.append(masks[i])
            stream_pos.append(torch.arange(len(ids[i])))
            have += len(ids[i])
    stream_ids = torch.cat(stream_ids)[:need]
    stream_mask = torch.cat(stream_mask)[:need]
    stream_pos = torch.cat(stream_pos)[:need]

    index = torch.arange(rows)[:, None] * seq_len + torch.arange(seq_len + 1)
    row_ids, row_mask, row_pos = stream_ids[index], stream_mask[index], stream_pos[index]
    return (row_ids[:, :-1].contiguous(), row_ids[:, 1:].contiguous(), row_mask[:, 1:].contiguous(),
            row_pos[:, :-1].contiguous())


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    min_lr = cfg.min_lr_ratio * cfg.lr
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - min_lr)


class _TokensPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.fields.get('tok_s', 0.0):,.0f} tok/s", style="cyan")


class _Loss(ProgressColumn):
    def render(self, task) -> Text:
        loss = task.fields.get("loss")
        return Text("loss  -   " if loss is None else f"loss {loss:.4f}", style="magenta")


def _progress_bar(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]distill"), BarColumn(), MofNCompleteColumn(), _Loss(), _TokensPerSecond(),
                    TextColumn("eta"), TimeRemainingColumn(), disable=not enabled)


# Fields of TrainConfig that do not change what is computed; a checkpoint stays valid across them.
_NOT_IN_RUN_IDENTITY = ("checkpoint_every",)


def _uses_layers(spec: LossSpec) -> bool:
    return spec.hidden_weight > 0 or spec.attention_weight > 0


def _run_identity(cfg: TrainConfig, data: tuple[torch.Tensor, ...], world: int) -> dict:
    fields = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_RUN_IDENTITY}
    # Loss settings that change nothing are left out, so checkpoints from before they existed still match.
    if cfg.loss == LossSpec():
        del fields["loss"]
    if not cfg.logit_cache:  # as before the cache existed
        del fields["logit_cache"]
    for name in modes.idle_settings(cfg):  # mode settings at their defaults, as before the modes existed
        del fields[name]
    # the cut's maps count only where a term reads them (and not at all when absent), so runs that
    # use neither keep the identity, and the checkpoints, they had before the maps were passed in
    used = {"layer_map": _uses_layers(cfg.loss), "head_map": cfg.loss.attention_weight > 0,
            "hidden_channels": cfg.loss.hidden_weight > 0}
    for name, read in used.items():
        if not read or fields[name] is None:
            del fields[name]
    digest = hashlib.sha256()
    for t in data:
        digest.update(t.numpy().tobytes())
    return {"config": fields, "data_sha256": digest.hexdigest(), "processes": world}


def _layer_pairs(layer_map: list[int] | None, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs that hidden-state and attention losses compare."""
    mapping = layer_map if layer_map is not None else evenly_spaced_layers(teacher_layers, student_layers)
    if len(mapping) != student_layers or not all(0 <= j < teacher_layers for j in mapping):
        raise ValueError(f"layer map {mapping} does not map {student_layers} student layers onto "
                         f"{teacher_layers} teacher layers")
    return list(enumerate(mapping))


def _head_maps(cfg: TrainConfig, pairs: list[tuple[int, int]]) -> list[list[int]] | None:
    """Per layer pair, student head -> teacher head, from the cut's head map; None without one."""
    if cfg.head_map is None:
        return None
    if cfg.layer_map is None:  # heads of evenly spaced layers are not the heads the map speaks of
        raise ValueError("a head map needs the layer map of the same cut")
    if len(cfg.head_map) != len(cfg.layer_map):
        raise ValueError(f"head map has {len(cfg.head_map)} layers, the layer map {len(cfg.layer_map)}")
    return [cfg.head_map[i] for i, _ in pairs]


@contextmanager
def _attention_probabilities(models: list[torch.nn.Module], wanted: bool):
    """HF models return attention probabilities only from their eager attention: switch to it for
    the run when a loss needs them (it is slower and keeps [B, H, L, L] maps), then back."""
    before = [m.config._attn_implementation for m in models] if wanted else []
    for m in models if wanted else []:
        m.set_attn_implementation("eager")
    try:
        yield
    finally:
        for m, implementation in zip(models, before):
            m.set_attn_implementation(implementation)


def clip_each(accelerator: Accelerator, models: list[torch.nn.Module], max_norm: float) -> None:
    """Clip each model's gradient norm to max_norm on its own, through accelerator.clip_grad_norm_.

    One model at a time: under FSDP accelerate then hands each to the wrapped model's own clipping
    (which knows its shards), and the hidden projections' large early gradients do not scale down
    the student's, as one joint norm would. Under fp16 loss scaling the first call unscales every
    optimizer's gradients and GradScaler refuses a second unscale in the same step, so the later
    calls run with accelerate's unscaling switched off.
    """
    if _sharded(models[0]):
        # The student is FSDP-sharded by the trainer, not by accelerate (_shard_student), and
        # accelerate's clip_grad_norm_ reads ACCELERATE_USE_FSDP at call time: it would hand any model
        # it prepared (the DDP-wrapped projection) to a clip_grad_norm_ method only its own FSDP
        # wrapper has. torch's clipping takes the sharded gradients (DTensors) as they are, the
        # norm all-reduced over the shards. fp16 is refused under FSDP, so there is nothing to unscale.
        for m in models:
            torch.nn.utils.clip_grad_norm_(list(m.parameters()), max_norm)
        return
    accelerator.clip_grad_norm_(list(models[0].parameters()), max_norm)
    if len(models) == 1:
        return
    own = vars(accelerator).get("unscale_gradients")
    accelerator.unscale_gradients = lambda optimizer=None: None
    try:
        for m in models[1:]:
            accelerator.clip_grad_norm_(list(m.parameters()), max_norm)
    finally:
        if own is None:
            del accelerator.unscale_gradients
        else:
            accelerator.unscale_gradients = own


def average_gradients(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """The mean of each gradient over the processes, as DDP would make it, in one collective."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def token_share(accelerator: Accelerator, mask: torch.Tensor) -> torch.Tensor | float:
    """This process's supervised tokens over the mean per process in the global batch; 1.0 alone.

    The logit terms are means over a batch's supervised tokens, and DDP (FSDP's reduce-scatter too)
    averages the processes' gradients: a plain per-process mean would weigh each process's tokens by
    1/(its own count).
    Scaled by this share, the average is the one-process mean over the same global batch, so the
    run follows the one-process run (tests/test_ddp.py). Layer terms average over every position,
    equal in number on each process, and need no share.
    """
    if accelerator.num_processes == 1:
        return 1.0
    count = mask.sum().float()
    total = accelerator.reduce(count.clone(), reduction="sum")
    return count * accelerator.num_processes / total.clamp_min(1.0)


def shared_confidence_mean(accelerator: Accelerator):
    """losses.ConfidenceMean over every process's supervised positions; None alone (each batch's own).

    With the logit term scaled by token_share, weights normalized by this mean make the averaged
    gradients those of one process's confidence-weighted mean over the global batch."""
    if accelerator.num_processes == 1:
        return None

    def mean(confidence: torch.Tensor) -> torch.Tensor:
        total = accelerator.reduce(torch.stack([confidence.sum().float(), confidence.new_tensor(confidence.numel(),
                                                                                              dtype=torch.float32)]),
                                   reduction="sum")
        return (total[0] / total[1].clamp_min(1.0)).to(confidence.dtype)

    return mean


def _sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _refuse_under_fsdp(cfg: TrainConfig) -> None:
    """What the FSDP-sharded student cannot do, said before any work is done."""
    if cfg.qat is not None and cfg.qat.learn_scales:
        # fake-quant itself runs in the sharded modules' forwards (qat._enable_in_forward); LSQ's scales
        # are re-initialised from the full weights when QAT starts, which FSDP holds only in shards
        raise UserError("QAT with learn_scales does not run under FSDP: launch with --multi_gpu (DDP) instead "
                        "of --use_fsdp, or turn learn_scales off")
    if cfg.mode == "self":  # the EMA teacher is a full copy of the student, updated from its weights each step
        raise UserError("distill mode 'self' does not run under FSDP: launch with --multi_gpu (DDP) instead")
    if cfg.on_policy_fraction > 0:
        # each process samples its own continuations, stopping at its own end-of-text: the processes'
        # forward passes, and so FSDP's all-gathers, would not pair up
        raise UserError("on-policy distillation does not run under FSDP: launch with --multi_gpu (DDP) instead")
    if resolve_precision(cfg.mixed_precision) == "fp16":  # GradScaler cannot unscale sharded gradients
        raise UserError("fp16 does not run under FSDP: use mixed_precision bf16 or no, or launch with --multi_gpu")


@contextmanager
def _fsdp_hidden_from_accelerate(fsdp: bool):
    """Make the Accelerator without FSDP: on CPU processes accelerate refuses the request (its FSDP
    plugin wants a GPU), on GPUs it would wrap the student itself, and the trainer shards it instead,
    the same way on both (_shard_student)."""
    value = os.environ.pop("ACCELERATE_USE_FSDP", None) if fsdp else None
    try:
        yield
    finally:
        if value is not None:
            os.environ["ACCELERATE_USE_FSDP"] = value


def _from_main_process(module: torch.nn.Module, accelerator: Accelerator) -> None:
    """Every process gets the main process's weights and buffers, as DDP's wrapping gives them.
    Under `accelerate launch --use_fsdp` transformers loads checkpoints on the main process alone by
    default (--fsdp_cpu_ram_efficient_loading) and leaves the others' parameters on the meta device."""
    tensors = list(chain(module.parameters(), module.buffers()))
    if any(t.is_meta for t in tensors):
        tied = _tied_names(module)
        module.to_empty(device=accelerator.device)
        for name, to in tied.items():  # to_empty gives each name its own tensor: tie them again
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner), attr, module.get_parameter(to))
    else:
        module.to(accelerator.device)
    for t in chain(module.parameters(), module.buffers()):
        torch.distributed.broadcast(t.data, src=0)


def _shard_student(student: torch.nn.Module, accelerator: Accelerator) -> tuple[torch.nn.Module, int]:
    """An FSDP2-sharded copy of `student` on this process's device, and how many of its parameter
    values this process holds.

    A copy, because fully_shard turns a module's parameters into shards for good (it has no inverse),
    and the caller keeps using `student` as a plain model (save_pretrained, evaluation): distill()
    gathers the trained weights back into it (_gather_into). The copy is made with its parameters on
    the meta device and only its shards are materialized, so no process holds a second full student
    on the device. Each decoder layer is its own FSDP unit (transformers names their classes in
    _no_split_modules), so a forward all-gathers one layer's weights at a time; the root unit holds
    the embeddings, final norm and lm_head (tied or not).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    meta = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in student.parameters()}
    replica = copy.deepcopy(student, meta)  # the memo stands the meta parameters in for the real ones
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    units = set(getattr(replica, "_no_split_modules", None) or ())
    for module in replica.modules():
        if module is not replica and type(module).__name__ in units:
            fully_shard(module, mesh=mesh)
    fully_shard(replica, mesh=mesh)
    replica.to_empty(device=accelerator.device)
    main = accelerator.is_main_process
    set_model_state_dict(replica, student.state_dict() if main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # buffers (RoPE's inverse frequencies) are not sharded, and not in the state dict when non-persistent
    with torch.no_grad():
        for name, buffer in replica.named_buffers():
            if main:
                buffer.copy_(student.get_buffer(name))
            torch.distributed.broadcast(buffer, src=0)
    held = sum(p.to_local().numel() for p in replica.parameters())
    return replica, held


def _gather_into(student: torch.nn.Module, replica: torch.nn.Module) -> None:
    """The sharded replica's full weights into the caller's plain student, one tensor at a time
    (every process takes part in each all-gather; none ever holds two full copies on the device)."""
    tied = _tied_names(student)
    with torch.no_grad():
        for name, p in replica.named_parameters():
            full = p.full_tensor()
            target = student.get_parameter(name)
            if target.is_meta:  # loaded on the main process alone (_from_main_process): a new tensor
                owner, _, attr = name.rpartition(".")
                setattr(student.get_submodule(owner), attr,
                        torch.nn.Parameter(full.to(target.dtype), requires_grad=target.requires_grad))
            else:
                target.data = full.to(target.device, target.dtype)
        for name, to in tied.items():
            owner, _, attr = name.rpartition(".")
            setattr(student.get_submodule(owner), attr, student.get_parameter(to))
        for name, buffer in replica.named_buffers():
            owner, _, attr = name.rpartition(".")
            target = student.get_buffer(name)
            if target.is_meta:
                setattr(student.get_submodule(owner), attr, buffer.clone())
            else:
                target.copy_(buffer)


def _autocast_forward(accelerator: Accelerator, module: torch.nn.Module):
    """module's forward as accelerator.prepare would make it: under mixed-precision autocast, outputs
    in float32. The sharded student is not prepared (accelerate would wrap it in DDP)."""
    def forward(*args, **kwargs):
        with accelerator.autocast():
            return convert_to_fp32(module(*args, **kwargs))
    return forward


_STUDENT_FILE = "student.safetensors"


def _optimizer_shard_file(rank: int) -> str:
    return f"optimizer_shard_{rank}.bin"


def _tied_names(model: torch.nn.Module) -> dict[str, str]:
    """Parameter name -> the name it is tied to (lm_head.weight -> model.embed_tokens.weight)."""
    first, tied = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def _save_sharded(accelerator: Accelerator, model: torch.nn.Module, optimizer, folder: Path) -> None:
    """The FSDP student's part of a checkpoint: its full, gathered weights (the main process writes
    them, tied names once, as safetensors takes them) and each process's optimizer moments for its
    own shards (a resume needs the same number of processes anyway: it is in the run's identity)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if accelerator.is_main_process:
        tied = _tied_names(model)
        save_file({k: v.contiguous() for k, v in full.items() if k not in tied}, str(folder / _STUDENT_FILE))
    state = optimizer.state_dict()
    state["state"] = {i: {k: v.to_local().cpu() if isinstance(v, DTensor) else v for k, v in moments.items()}
                      for i, moments in state["state"].items()}
    torch.save(state, folder / _optimizer_shard_file(accelerator.process_index))


def _load_sharded(accelerator: Accelerator, model: torch.nn.Module, optimizer, folder: Path) -> None:
    """Undo _save_sharded: the main process reads the weights and FSDP hands out the shards."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import DTensor

    full = {}
    if accelerator.is_main_process:
        full = load_file(str(folder / _STUDENT_FILE))
        full.update({name: full[to] for name, to in _tied_names(model).items()})
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    state = torch.load(folder / _optimizer_shard_file(accelerator.process_index), weights_only=True)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, moments in state["state"].items():
        p = params[i]
        if isinstance(p, DTensor):
            for k, v in moments.items():
                if v.shape == p.to_local().shape and v.dim() > 0:  # the moments; "step" is a plain scalar
                    moments[k] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False,
                                                    shape=p.shape, stride=p.stride())
    optimizer.load_state_dict(state)


# Architectures whose causal-LM logits are lm_head(final hidden state) and nothing more (no soft-capping,
# scaling or bias), so the fused top-k loss may apply the lm_head itself.
_PLAIN_HEAD_TYPES = ("llama", "mistral")


def _fused_head(student, model, cfg: TrainConfig) -> torch.nn.Linear | None:
    """The student's lm_head when this step's logit term is a top-k one that can run fused from the
    final hidden states (losses.kd_loss_top_k_from_hidden: the student's [B, L, V] logits are never
    built, only a chunk of rows at a time); None where the logits path must be kept.

    The forward still goes through `student`, the prepared module: under DDP its forward is what
    readies the gradient reduction, and the lm_head weight's gradient reaches the reducer's hooks
    like any other. Under other wrappers (FSDP holds the weight sharded outside its forward,
    DeepSpeed and compiled modules own their parameters' handling) the weight read here is not the
    one the forward computes with, so they keep the logits path. An lm_head with hooks (QAT's
    activation rounding) or a bias, or another architecture, keeps it too: the fused loss computes
    only h W^T."""
    if cfg.mode == "black_box" or cfg.loss.top_k <= 0:
        return None
    if _sharded(model):  # the trainer's own FSDP2 sharding is in place: `student is model` does not tell it
        return None
    ddp = isinstance(student, torch.nn.parallel.DistributedDataParallel) and student.module is model
    if not (student is model or ddp) or model.config.model_type not in _PLAIN_HEAD_TYPES:
        return None
    # transformers puts the final norm's output last in hidden_states unless told not to
    if getattr(model.config, "tie_last_hidden_states", None) is False:
        return None
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or head._forward_hooks or \
            head._forward_pre_hooks:
        return None
    return head


def _step_loss(student_out, teacher_out, labels: torch.Tensor, mask: torch.Tensor, cfg: TrainConfig, alpha: float,
               projection, pairs: list[tuple[int, int]], head_maps: list[list[int]] | None = None,
               cached: tuple[torch.Tensor, ...] | None = None, share: torch.Tensor | float = 1.0,
               head: torch.nn.Linear | None = None, confidence_mean=None) -> tuple[torch.Tensor, dict]:
    """The training loss of one batch: the logit term (black_box: cross-entropy on the teacher's text),
    plus the layer terms that have a weight.
    cached: the batch's teacher top-k (ids, log-probs, tail) from the logit cache, used instead of
    teacher_out's logits. share: this process's token_share, which scales the logit term;
    confidence_mean: shared_confidence_mean's, for the confidence weights.
    head: the student's lm_head (_fused_head) when student_out holds its final hidden states and no
    logits worth reading: the top-k term then computes the logits itself, a chunk at a time."""
    spec = cfg.loss
    settings = dict(temperature=cfg.temperature, alpha=alpha, objective=spec.objective, beta=spec.jsd_beta,
                    confidence_weighting=spec.confidence_weighting, confidence_mean=confidence_mean)
    if cfg.mode == "black_box":  # the teacher's text alone: CE on the answers, no layer terms (config refuses them)
        loss, parts = modes.response_ce(student_out, labels, mask)
    elif head is not None:
        # bf16 matmuls under bf16 autocast (the softmax math stays float32); float32 otherwise, fp16
        # too: the fused loss takes its gradients in its forward, before fp16 loss scaling, where
        # small ones would flush to zero in fp16
        fused = dict(settings, matmul_dtype=torch.bfloat16 if resolve_precision(cfg.mixed_precision) == "bf16"
                     else None)
        hidden = student_out.hidden_states[-1]  # after the final norm: what the lm_head multiplies
        if cached is not None:
            loss, parts = kd_loss_top_k_from_hidden(hidden, head.weight, *cached, mask, labels, **fused)
        else:
            loss, parts = kd_loss_from_hidden(hidden, head.weight, teacher_out.logits, mask, labels,
                                              top_k=spec.top_k, **fused)
    elif cached is not None:
        loss, parts = kd_loss_top_k(student_out.logits, *cached, mask, labels, **settings)
    else:
        loss, parts = kd_loss(student_out.logits, teacher_out.logits, mask, labels, top_k=spec.top_k, **settings)
    loss, parts = loss * share, {k: v * share for k, v in parts.items()}
    if spec.hidden_weight > 0:
        # hidden_states[0] is the embedding output, so layer i's output is entry i + 1
        student_hidden = [student_out.hidden_states[i + 1] for i, _ in pairs]
        teacher_hidden = [teacher_out.hidden_states[j + 1] for _, j in pairs]
        parts["hidden"] = hidden_state_mse(projection(student_hidden), teacher_hidden)
        loss = loss + spec.hidden_weight * parts["hidden"]
    if spec.attention_weight > 0:
        parts["attention"] = attention_transfer([student_out.attentions[i] for i, _ in pairs],
                                                [teacher_out.attentions[j] for _, j in pairs], spec.attention_kind,
                                                head_maps)
        loss = loss + spec.attention_weight * parts["attention"]
    return loss, {k: v.detach() for k, v in parts.items()}


def _latest_checkpoint(workdir: Path) -> Path | None:
    # "ckpt.old" survives only if a save died between its two renames; it is then the newest.
    for name in ("ckpt", "ckpt.old"):
        if (workdir / name / "meta.json").is_file():
            return workdir / name
    return None


def _out_of_room(folder: Path) -> int | None:
    """The errno a failed write most likely had: ENOSPC when the disk is (nearly) full, EFBIG when
    this process runs under a file size limit; None when room is not the problem."""
    import resource  # Unix only, like the limit it reads

    if shutil.disk_usage(folder).free < 64 << 20:
        return errno.ENOSPC
    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return errno.EFBIG
    return None


def _save_checkpoint(accelerator: Accelerator, model: torch.nn.Module, meta: dict, workdir: Path,
                     optimizer=None) -> None:
    """Write the checkpoint to ckpt.tmp, then swap it in for ckpt; meta.json is written last.
    optimizer: the FSDP student's, which accelerate does not hold (_save_sharded)."""
    tmp, final, old = workdir / "ckpt.tmp", workdir / "ckpt", workdir / "ckpt.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    # Checkpoints hold the plain float master weights under their usual names; the fake-quant
    # (parametrizations, or under FSDP the modules' forwards) is recreated from the state's "qat" on resume.
    spec = fake_quant_spec(model)
    disable_fake_quant(model)
    # accelerate warns that it drops a tied lm_head.weight from the safetensors file; loading
    # embed_tokens.weight back into the one shared Parameter restores both, so the warning is noise.
    other = logging.getLogger("accelerate.utils.other")
    level = other.level
    other.setLevel(logging.ERROR)
    try:
        accelerator.save_state(str(tmp))
        if _sharded(model):
            _save_sharded(accelerator, model, optimizer, tmp)
    except RuntimeError as e:
        # torch.save's writer drops the errno of a failed write ("unexpected pos ..."): say what it was
        code = _out_of_room(workdir)
        if code is None:
            raise
        raise OSError(code, f"{os.strerror(code)} while writing the training checkpoint") from e
    finally:
        other.setLevel(level)
    if spec is not None:
        enable_fake_quant(model, spec)
    accelerator.wait_for_everyone()  # every process's RNG (and shard) file is in ckpt.tmp before it is renamed
    if accelerator.is_main_process:
        (tmp / "meta.json").write_text(json.dumps(meta))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


class _StopRequest:
    """Ctrl-C (or SIGTERM) during training asks for a stop at the end of the current step, after a
    checkpoint; a second one stops at once. Only the main thread can take signals, so elsewhere it stays out."""

    def __init__(self):
        self.asked, self._previous = False, None

    # SIGTERM too: under `accelerate launch` torchrun's agent passes a Ctrl-C on to the workers as SIGTERM
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            # getsignal gives None for a handler installed from C; the default then is Python's own
            self._previous = {s: signal.getsignal(s) or signal.SIG_DFL for s in self.SIGNALS}
            for s in self.SIGNALS:
                signal.signal(s, self._ask)
        return self

    def _ask(self, signum, frame):
        self.asked = True
        self.__exit__()  # a second signal acts at once

    def __exit__(self, *exc):
        for s, handler in (self._previous or {}).items():
            signal.signal(s, handler)

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether any process was asked: they all stop at the same step, or the collectives would hang."""
        if accelerator.num_processes == 1:
            return self.asked
        flag = torch.tensor([float(self.asked)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _prepare_cache(accelerator: Accelerator, teacher, input_ids: torch.Tensor, position_ids: torch.Tensor,
                   cfg: TrainConfig, root: Path, extra: dict | None):
    """The run's logit cache, teacher pass done where shards are missing (in parallel across processes)."""
    return logit_cache.prepare(
        teacher, input_ids, position_ids, root, k=cfg.loss.top_k, temperature=cfg.temperature,
        precision=accelerator.mixed_precision, batch_size=cfg.batch_size, autocast=accelerator.autocast,
        rank=accelerator.process_index, processes=accelerator.num_processes, wait=accelerator.wait_for_everyone,
        extra=extra)


def distill(student, teacher, examples: list[dict], cfg: TrainConfig, workdir: Path, *, resume: bool = False,
            progress: bool = True, stop_after: int | None = None, cache_dir: Path | None = None,
            cache_extra: dict | None = None) -> dict:
    """Train `student` to match `teacher` on `examples`; returns the run's figures.

    resume=True continues from workdir/ckpt when it belongs to the same run (config and data);
    otherwise training starts over. stop_after=N stops after step N as if the process had been
    killed there (for tests). The student is left in eval mode with plain float weights.

    cfg.logit_cache: the teacher's top-k comes from a logit cache under cache_dir (default
    workdir/logit-cache), built first where missing; cache_extra is more identity for its key (the
    tokenizer). The teacher then runs only when a hidden-state or attention term needs its layers.

    cfg.mode and the on-policy and EMA settings choose what the student learns from (modes.py):
    `teacher` may be a list of teachers sharing a tokenizer (their mean distribution is the target),
    and None where no teacher is run (black_box, self).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    teachers = len(teacher) if isinstance(teacher, (list, tuple)) else 1
    modes.check(cfg, teachers)
    teacher = modes.combine_teachers(teacher, cfg.temperature)
    if teacher is None and cfg.mode == "white_box":
        raise ValueError("white_box mode distills a teacher's logits: pass the teacher")
    if cfg.logit_cache and cfg.loss.top_k <= 0:
        raise ValueError("a logit cache holds the teacher's top-k tokens: it needs loss.top_k > 0")
    # `accelerate launch --use_fsdp`: the student is sharded across the processes (_shard_student)
    fsdp = processes.fsdp_requested()
    if fsdp:
        _refuse_under_fsdp(cfg)
    # cpu=True where torch sees no accelerator: accelerate then runs a multi-process launch (torchrun,
    # `accelerate launch --multi_gpu`) as DDP over gloo; left to itself it would run each process alone
    with _fsdp_hidden_from_accelerate(fsdp):
        accelerator = Accelerator(cpu=not torch.accelerator.is_available(),
                                  mixed_precision=resolve_precision(cfg.mixed_precision))
    set_seed(cfg.seed)

    # ---- data: every row the run will see, in order; processes take alternate batches. Each batch
    # carries its rows' indices, which name the cached rows: the same under resume and under DDP.
    rows = cfg.steps * cfg.batch_size * accelerator.num_processes
    data = pack_rows(examples, cfg.seq_len, rows, cfg.seed)
    loader = DataLoader(TensorDataset(*data, torch.arange(rows)), batch_size=cfg.batch_size, shuffle=False)
    identity = _run_identity(cfg, data, accelerator.num_processes)
    if teachers > 1:
        identity["teachers"] = teachers
    if fsdp:  # its checkpoints hold the student and optimizer in their own files
        identity["fsdp"] = True

    # ---- models and optimizer; norms and biases are not weight-decayed
    if teacher is not None:
        teacher.eval().requires_grad_(False)
        if fsdp:  # unsharded: the teacher only infers, each process on its own rows
            _from_main_process(teacher, accelerator)
        else:
            teacher.to(accelerator.device)
    cache, cache_figures = None, None
    if cfg.logit_cache:  # before the student trains: the teacher pass is paid once, and its time apart
        cache, cache_figures = _prepare_cache(accelerator, teacher, data[0], data[3], cfg,
                                              Path(cache_dir) if cache_dir else workdir / "logit-cache", cache_extra)
    student.train()
    if cfg.qat and cfg.qat.learn_scales:
        init_learned_scales(student, cfg.qat)  # in the optimizer and the checkpoints from the start
    # self mode: the coach is the student's moving average, saved in every checkpoint
    ema = (modes.EmaTeacher(student, steps=cfg.steps, start=cfg.ema_momentum, end=cfg.ema_momentum_end,
                            accelerator=accelerator) if cfg.mode == "self" else None)
    coach = ema.model if ema is not None else teacher
    # on-policy steps continue training prompts with the student's own samples (GKD)
    prompts = (modes.prompt_pool(examples, cfg.seq_len, cfg.on_policy_max_new_tokens)
               if cfg.on_policy_fraction > 0 else None)
    # the hidden-state loss's projections W_l train with the student and are checkpointed beside it
    spec = cfg.loss
    pairs = (_layer_pairs(cfg.layer_map, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
             if _uses_layers(spec) else [])
    projection = None
    if spec.hidden_weight > 0:
        projection = HiddenProjection(len(pairs), student.config.hidden_size, teacher.config.hidden_size,
                                      seed=cfg.seed, channels=cfg.hidden_channels).to(accelerator.device)
    head_maps = _head_maps(cfg, pairs) if spec.attention_weight > 0 else None
    original, held = student, None
    if fsdp:  # from here on `student` is the sharded copy; `original` gets its weights at the end
        student, held = _shard_student(student, accelerator)
    params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    if projection is not None:
        params += [("projection." + n, p) for n, p in projection.named_parameters()]
    decayed = {n for n, p in params if p.dim() >= 2 and not n.endswith(SCALE)}
    groups = [{"params": [p for n, p in params if n in decayed], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in params if n not in decayed], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    if fsdp:
        # accelerate would wrap the sharded student in DDP, and would save only the main process's
        # optimizer shards: the trainer keeps both (_save_sharded, _load_sharded)
        loader = accelerator.prepare(loader)
        if projection is not None:
            projection = accelerator.prepare(projection)
    elif projection is None:
        student, optimizer, loader = accelerator.prepare(student, optimizer, loader)
    else:  # save_state/load_state then keep it too, as a second model
        student, projection, optimizer, loader = accelerator.prepare(student, projection, optimizer, loader)
    model = student if fsdp else accelerator.unwrap_model(student)
    forward = _autocast_forward(accelerator, student) if fsdp else student
    # Fake-quant parametrizations (switched on at QAT's start, off and on around each checkpoint)
    # give the weights new gradient accumulators, and DDP's hooks sit on the ones it saw when it
    # wrapped the model: they would never fire again. So DDP does not reduce the student's
    # gradients; average_gradients does, once per step, whatever the parametrizations did.
    explicit_sync = isinstance(student, torch.nn.parallel.DistributedDataParallel)
    if explicit_sync:
        student.require_backward_grad_sync = False
    confidence_mean = shared_confidence_mean(accelerator)

    # ---- resume: weights, optimizer moments and RNG states come back with load_state
    state = {"step": 0, "tokens": 0, "seconds": 0.0, "loss_curve": [], "part_curves": {}, "qat": None,
             "on_policy": 0}
    ckpt = _latest_checkpoint(workdir) if resume else None
    if ckpt is not None:
        meta = json.loads((ckpt / "meta.json").read_text())
        if meta["identity"] == identity:
            accelerator.load_state(str(ckpt))
            if fsdp:
                _load_sharded(accelerator, model, optimizer, ckpt)
            state = {"part_curves": {}, "on_policy": 0, **meta["state"]}
            if state["qat"]:
                enable_fake_quant(model, QuantSpec.from_dict(state["qat"]))
        else:
            accelerator.print(f"checkpoint {ckpt} is from a different run (config or data); starting over")

    resumed_from = state["step"]
    last = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    batches = iter(accelerator.skip_first_batches(loader, state["step"]))
    session_tokens, t0, seconds0 = 0, time.perf_counter(), state["seconds"]
    bar = _progress_bar(progress and accelerator.is_main_process)
    # only the models' own outputs that a loss term reads are asked for
    wanted = {"use_cache": False, "output_hidden_states": spec.hidden_weight > 0,
              "output_attentions": spec.attention_weight > 0}
    teacher_runs = cfg.mode != "black_box" and (cache is None or _uses_layers(spec))
    with bar, _StopRequest() as stop, _attention_probabilities([model, teacher], spec.attention_weight > 0):
        task = bar.add_task("distill", total=cfg.steps, completed=state["step"], loss=None, tok_s=0.0)
        for step in range(state["step"], last):
            if cfg.qat and step >= cfg.qat_start_step and not state["qat"]:
                if cfg.qat.learn_scales:
                    init_learned_scales(model, cfg.qat)  # from the weights as they are now
                enable_fake_quant(model, cfg.qat)
                state["qat"] = cfg.qat.to_dict()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr

            inputs, labels, mask, positions, row_index = next(batches)
            on_policy = prompts is not None and modes.on_policy_step(step, cfg.on_policy_fraction, cfg.seed)
            if on_policy:  # this step's rows: the student's own continuations of training prompts
                inputs, labels, mask, positions = modes.on_policy_batch(
                    model, prompts, rows=cfg.batch_size, max_new_tokens=cfg.on_policy_max_new_tokens, seed=cfg.seed,
                    step=step, rank=accelerator.process_index, autocast=accelerator.autocast)
                state["on_policy"] += 1
            teacher_out = None
            if teacher_runs or on_policy:  # the logit cache holds no scores for the student's samples
                with torch.inference_mode(), accelerator.autocast():
                    teacher_out = coach(input_ids=inputs, position_ids=positions, **wanted)
            cached = (None if cache is None or on_policy else
                      tuple(t.to(inputs.device) for t in cache.rows(row_index.cpu())))
            # a fused top-k term needs the final hidden states, not the [B, L, V] logits (one position kept)
            head = _fused_head(student, model, cfg)
            fused = {"output_hidden_states": True, "logits_to_keep": 1} if head is not None else {}
            student_out = forward(input_ids=inputs, position_ids=positions, **{**wanted, **fused})
            # on the student's own samples the soft term alone: no cross-entropy on its own tokens
            alpha = 1.0 if on_policy else alpha_at(step, cfg.steps, cfg.alpha, spec.alpha_end, spec.alpha_schedule)
            loss, parts = _step_loss(student_out, teacher_out, labels, mask, cfg, alpha, projection, pairs, head_maps,
                                     cached, token_share(accelerator, mask), head, confidence_mean)
            accelerator.backward(loss)
            if explicit_sync:
                average_gradients(accelerator, model)
            if cfg.grad_clip > 0:
                clip_each(accelerator, [student] if projection is None else [student, projection], cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                state["ema_momentum"] = ema.update(model, step)

            # one collective for the loss and its parts
            figures = accelerator.reduce(torch.stack([loss.detach(), *parts.values()]).float(), reduction="mean")
            loss_value, *part_values = figures.tolist()
            for name, value in zip(parts, part_values):
                # 4 significant digits: layer terms can be far below the loss's 4 decimals
                state["part_curves"].setdefault(name, []).append(float(f"{value:.4g}"))
            step_tokens = inputs.numel() * accelerator.num_processes
            session_tokens += step_tokens
            elapsed = time.perf_counter() - t0
            state.update(step=step + 1, tokens=state["tokens"] + step_tokens, seconds=seconds0 + elapsed)
            state["loss_curve"].append(round(loss_value, 4))
            bar.update(task, advance=1, loss=loss_value, tok_s=session_tokens / max(elapsed, 1e-9))

            stopping = stop.agreed(accelerator)
            if state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.steps or stopping:
                _save_checkpoint(accelerator, model, {"identity": identity, "state": state}, workdir,
                                 optimizer if fsdp else None)
            if stopping:
                bar.stop()
                if accelerator.is_main_process:  # beside the CLI's own messages, on stderr
                    print(f"stopped after step {state['step']} of {cfg.steps}; checkpoint saved", file=sys.stderr)
                raise KeyboardInterrupt

    disable_fake_quant(model)
    model.eval()
    if fsdp:
        _gather_into(original, student)
        original.eval()
    accelerator.wait_for_everyone()
    curve = state["loss_curve"]
    result = {
        "steps": state["step"],
        "resumed_from": resumed_from,
        "tokens": state["tokens"],
        "seconds": round(state["seconds"], 3),
        "tokens_per_s": round(state["tokens"] / state["seconds"], 1) if state["seconds"] > 0 else 0.0,
        "final_loss": curve[-1] if curve else None,
        "mixed_precision": accelerator.mixed_precision,
        "qat_ran": state["qat"] is not None,  # fake-quant switched on before the run ended
        "loss_curve": curve,
        "loss_parts": state["part_curves"],  # per step: "soft" (the soft-target divergence), "ce", "hidden", "attention"
    }
    if cache_figures is not None:  # only with the cache on, so other runs' summaries stay as they were
        result["logit_cache"] = cache_figures
    if cfg.mode != "white_box":
        result["mode"] = cfg.mode
    if prompts is not None:
        result["on_policy_batches"] = state["on_policy"]
    if ema is not None:  # the mean teacher's momentum at the last step run
        result["ema_momentum"] = state.get("ema_momentum")
    if fsdp:  # this process's share of the student's parameter values while it trained
        result["fsdp"] = {"parameters": sum(p.numel() for p in original.parameters()), "held": held}
    return result
