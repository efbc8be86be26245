"""Build the student from the teacher's weights: keep the most important layers, heads, neurons, channels.

Importance comes from the teacher's activations on calibration text drawn from the build's data (in
the spirit of Minitron): mean |activation| of each residual channel, MLP neuron and attention head,
and for depth, how much each layer changes its input (1 - cosine similarity of input and output).
Without calibration data a weight-norm rule stands in. Shapes stay consistent for GQA, and the
student-to-teacher layer mapping is recorded for hidden-state losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def layer_map(n_teacher: int, n_student: int, scores: Tensor | None = None) -> list[int]:
    """Teacher layers to keep, in order: the first and last always, then the most important.

    Without scores, evenly spaced layers.
    """
    if n_student >= n_teacher:
        return list(range(n_teacher))
    if scores is None:
        if n_student == 1:
            return [n_teacher - 1]
        return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]
    keep = {0, n_teacher - 1} if n_student >= 2 else {n_teacher - 1}
    for i in torch.argsort(scores, descending=True).tolist():
        if len(keep) >= n_student:
            break
        keep.add(i)
    return sorted(keep)


@dataclass
class Importance:
    """Per-unit importance measured on calibration text."""

    hidden: Tensor  # [hidden]
    layers: Tensor | None  # [n_layers]: 1 - cos(input, output) of each decoder layer; None: evenly spaced
    neurons: list[Tensor]  # per layer [intermediate]
    heads: list[Tensor]  # per layer [n_heads]


@torch.no_grad()
def calibrate(teacher, sequences: list[list[int]]) -> Importance:
    """One pass of the teacher over `sequences`, recording activations with forward hooks."""
    cfg = teacher.config
    n_layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    hid = torch.zeros(n_layers, hidden)
    change = torch.zeros(n_layers)
    neurons = [torch.zeros(cfg.intermediate_size) for _ in range(n_layers)]
    heads = [torch.zeros(cfg.num_attention_heads) for _ in range(n_layers)]
    # The model may sit on an accelerator (a trained intermediate student, or a teacher that an earlier
    # target's distill moved there): inputs go to its device, scores come back to the CPU.
    device = next(teacher.parameters()).device
    hooks = []

    def on_layer(i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            hid[i] += x.float().abs().mean(dim=(0, 1)).cpu()
            change[i] += (1 - torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)).mean().cpu()
        return hook

    def on_down(i):
        def hook(module, args):  # a pre-hook that returns None leaves the input as it is
            neurons[i] += args[0].float().abs().mean(dim=(0, 1)).cpu()
        return hook

    def on_o(i):
        def hook(module, args):
            heads[i] += args[0].float().unflatten(-1, (-1, head_dim)).norm(dim=-1).mean(dim=(0, 1)).cpu()
        return hook

    for i, layer in enumerate(teacher.model.layers):
        hooks.append(layer.register_forward_hook(on_layer(i), with_kwargs=True))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(on_down(i)))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o(i)))
    try:
        for ids in sequences:
            teacher(input_ids=torch.tensor([ids], device=device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    # each layer's residual stream has its own scale; normalise before summing so no layer dominates
    hidden_score = (hid / hid.mean(dim=1, keepdim=True).clamp_min(1e-12)).sum(0)
    return Importance(hidden_score, change, neurons, heads)


def sliced(config) -> Importance:
    """The naive baseline as importance scores: evenly spaced layers, the first channels, heads and neurons."""
    def first(n: int) -> Tensor:
        return torch.arange(n, 0, -1, dtype=torch.float32)

    n = config.num_hidden_layers
    return Importance(first(config.hidden_size), None, [first(config.intermediate_size) for _ in range(n)],
                      [first(config.num_attention_heads) for _ in range(n)])


def _float(w, module=None) -> Tensor:
    """A weight as float32; bitsandbytes weights are dequantized through their own scales."""
    if getattr(w, "quant_state", None) is not None:  # 4-bit
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, w.quant_state).float()
    if w.dtype == torch.int8:  # LLM.int8(): row scales live on the weight, or on the module after a forward
        scb = getattr(w, "SCB", None)
        if scb is None and module is not None:
            scb = getattr(getattr(module, "state", None), "SCB", None)
        if scb is None:
            raise RuntimeError("an 8-bit teacher weight has no scales to dequantize with")
        return w.data.float() * scb.float().unsqueeze(1) / 127.0
    return w.detach().float()


def _w(module) -> Tensor:
    return _float(module.weight, module)


def _top(scores: Tensor, k: int) -> Tensor:
    return torch.sort(torch.topk(scores, k).indices).values


def hidden_channels(teacher, k: int) -> Tensor:
    """Channels of the residual stream with the most weight mass across embedding and norms."""
    sd = teacher.state_dict()
    score = _float(sd["model.embed_tokens.weight"]).norm(dim=0)
    score = score / score.mean()
    for name, w in sd.items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            score = score + _float(w).abs() / _float(w).abs().mean()
    return _top(score, k)


def _weight_head_scores(attn, head_dim: int, n_kv: int) -> tuple[Tensor, Tensor]:
    """Per query head and per kv group scores from weight norms (the rule without calibration data)."""
    q, k, v, o = (_w(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    q, k, v = (w.view(-1, head_dim, w.shape[1]) for w in (q, k, v))
    o = o.view(o.shape[0], -1, head_dim)
    head_score = q.flatten(1).norm(dim=1) * o.transpose(0, 1).flatten(1).norm(dim=1)
    kv_score = k.flatten(1).norm(dim=1) * v.flatten(1).norm(dim=1) * head_score.view(n_kv, -1).sum(1)
    return head_score, kv_score


def _head_groups(head_score: Tensor, kv_score: Tensor, kv_keep: int, group_keep: int) -> tuple[list[int], list[int]]:
    """Kept query heads and kv heads, in student order: whole kv groups, then the strongest heads inside each.

    Student query head i is teacher query head q_heads[i] (not the i-th contiguous group), which is
    what the attention loss must compare it with: the init stage records q_heads as the head map.
    """
    group = head_score.numel() // kv_score.numel()
    q_heads, kv_heads = [], []
    for g in _top(kv_score, kv_keep).tolist():
        kv_heads.append(g)
        inner = _top(head_score[g * group:(g + 1) * group], group_keep)
        q_heads.extend((g * group + inner).tolist())
    return q_heads, kv_heads


def _rows(heads: list[int], head_dim: int) -> Tensor:
    """Weight rows of the given heads."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


@dataclass
class Lineage:
    """Where a model's units come from in the original teacher: per layer the teacher layer, per
    layer the teacher query head of each head, and the teacher channel of each hidden channel.

    A cut's record (build_student's info) speaks of the model it was cut from; composing it onto
    that model's lineage (`through`) gives the new model's in teacher terms, across any number of
    progressive cuts. `relative_to` undoes that for the model a student trains against.
    """

    layers: list[int]
    heads: list[list[int]]
    channels: list[int]

    @classmethod
    def of_teacher(cls, config) -> "Lineage":
        n, h = config.num_hidden_layers, config.num_attention_heads
        return cls(list(range(n)), [list(range(h)) for _ in range(n)], list(range(config.hidden_size)))

    def through(self, info: dict) -> "Lineage":
        """The lineage of a model cut from this one, whose cut is recorded in `info`."""
        return Lineage([self.layers[j] for j in info["layer_map"]],
                       [[self.heads[j][h] for h in heads] for j, heads in zip(info["layer_map"], info["head_map"],
                                                                               strict=True)],
                       [self.channels[c] for c in info["hidden_channels"]])

    def record(self) -> dict:
        return {"layer_map": self.layers, "head_map": self.heads, "hidden_channels": self.channels}

    def relative_to(self, coach: "Lineage") -> dict:
        """This model's units as units of `coach` (a model it was cut from, both in teacher terms)."""
        layers = [coach.layers.index(t) for t in self.layers]
        return {"layer_map": layers,
                "head_map": [[coach.heads[j].index(t) for t in heads] for j, heads in zip(layers, self.heads)],
                "hidden_channels": [coach.channels.index(t) for t in self.channels]}


def _mlp_neurons(mlp, k: int) -> Tensor:
    score = _w(mlp.gate_proj).norm(dim=1) * _w(mlp.up_proj).norm(dim=1) * _w(mlp.down_proj).norm(dim=0)
    return _top(score, k)


@torch.no_grad()
def build_student(teacher, student_cfg, importance: Importance | None = None) -> tuple[torch.nn.Module, dict]:
    """A student model initialised from `teacher` in the shape of `student_cfg`, and how it was cut."""
    from transformers import AutoModelForCausalLM

    tc = teacher.config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    n_kv = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    kv_keep = student_cfg.num_key_value_heads
    group_keep = student_cfg.num_attention_heads // kv_keep
    imp = importance
    layers = layer_map(tc.num_hidden_layers, student_cfg.num_hidden_layers, imp.layers if imp else None)
    hid = _top(imp.hidden, student_cfg.hidden_size) if imp else hidden_channels(teacher, student_cfg.hidden_size)

    student = AutoModelForCausalLM.from_config(student_cfg, dtype=torch.float32)
    s_sd = student.state_dict()
    t_layers = teacher.model.layers
    head_map = []  # per student layer, the teacher query head of each student head

    def put(name: str, value: Tensor) -> None:
        assert s_sd[name].shape == value.shape, (name, s_sd[name].shape, value.shape)
        s_sd[name].copy_(value)

    put("model.embed_tokens.weight", _float(teacher.model.embed_tokens.weight)[:, hid])
    put("model.norm.weight", _float(teacher.model.norm.weight)[hid])
    if not student_cfg.tie_word_embeddings:
        put("lm_head.weight", _float(teacher.lm_head.weight)[:, hid])
    for i, ti in enumerate(layers):
        tl, p = t_layers[ti], f"model.layers.{i}."
        if imp:
            head_score, kv_score = imp.heads[ti], imp.heads[ti].view(n_kv, -1).sum(1)
        else:
            head_score, kv_score = _weight_head_scores(tl.self_attn, head_dim, n_kv)
        q_heads, kv_heads = _head_groups(head_score, kv_score, kv_keep, group_keep)
        head_map.append(q_heads)
        q_rows, kv_rows = _rows(q_heads, head_dim), _rows(kv_heads, head_dim)
        neurons = (_top(imp.neurons[ti], student_cfg.intermediate_size) if imp
                   else _mlp_neurons(tl.mlp, student_cfg.intermediate_size))
        a, m = tl.self_attn, tl.mlp
        put(p + "self_attn.q_proj.weight", _w(a.q_proj)[q_rows][:, hid])
        put(p + "self_attn.k_proj.weight", _w(a.k_proj)[kv_rows][:, hid])
        put(p + "self_attn.v_proj.weight", _w(a.v_proj)[kv_rows][:, hid])
        put(p + "self_attn.o_proj.weight", _w(a.o_proj)[hid][:, q_rows])
        put(p + "mlp.gate_proj.weight", _w(m.gate_proj)[neurons][:, hid])
        put(p + "mlp.up_proj.weight", _w(m.up_proj)[neurons][:, hid])
        put(p + "mlp.down_proj.weight", _w(m.down_proj)[hid][:, neurons])
        put(p + "input_layernorm.weight", _float(tl.input_layernorm.weight)[hid])
        put(p + "post_attention_layernorm.weight", _float(tl.post_attention_layernorm.weight)[hid])
    student.eval()
    rule = ("activation importance on calibration text: residual channels, GQA groups and heads, MLP neurons; "
            "layers by 1 - cos(input, output), first and last kept") if imp else \
        "evenly spaced layers; weight-norm importance for hidden channels, GQA groups, heads and MLP neurons"
    # the cut, unit by unit, for the distillation losses: layers and heads to compare, and the
    # channels that start the hidden-state projections
    return student, {"layer_map": layers, "head_map": head_map, "hidden_channels": hid.tolist(), "rule": rule}


def cut(model, shape: dict, context: int, calib: list[list[int]]) -> tuple[torch.nn.Module, dict]:
    """`model` pruned to a plan `shape`; importance is measured on `calib` when there is any."""
    from transformers import AutoConfig

    from edgedistill.plan import student_config

    cfg = AutoConfig.for_model(**student_config(model.config.to_dict(), shape, context))
    return build_student(model, cfg, calibrate(model, calib) if calib else None)


def _save(model, tok, folder) -> None:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def run(ctx) -> dict:
    """Stage `init`: the untrained student, cut from the teacher to the planned shape.

    A progressive plan first prunes and distills through its intermediate shapes; the student is then
    cut from the last of them, which is saved as `assistant/` to be the distill stage's teacher.
    """
    from edgedistill import progressive
    from edgedistill.data.teacher_answers import read_jsonl
    from edgedistill.measure.quality import heldout_examples

    teacher, tok = ctx.session.teacher(ctx["teacher"])
    plan = ctx["plan"].summary["student"]
    n = ctx.cfg.plan.calibration_examples
    train = read_jsonl(ctx["data"].path("train_tokens.jsonl"))
    calib = [ex["input_ids"] for ex in train[:n]]
    chain = plan["progressive"]
    source, source_lineage, stages = teacher, Lineage.of_teacher(teacher.config), []
    if chain:
        cfg = ctx.cfg
        source, source_lineage, stages = progressive.run_chain(
            teacher, chain, cfg=cfg, calib=calib, context=plan["context"],
            train=train,
            heldout=heldout_examples(read_jsonl(ctx["data"].path("heldout_tokens.jsonl")), cfg.eval.max_examples),
            workdir=ctx.dir, resume=ctx.session.resume, progress=ctx.session.progress, say=ctx.console.print)
        _save(source, tok, ctx.dir / "assistant")
    student, info = cut(source, plan["shape"], plan["context"], calib)
    # the report and the distill stage read the cut in units of the original teacher, not of the
    # assistant (the distill stage maps them back to the assistant's own: coach_maps)
    info.update(source_lineage.through(info).record())
    _save(student, tok, ctx.dir / "student")
    return {"params": sum(p.numel() for p in student.parameters()), "calibration_examples": len(calib), **info,
            "progressive": stages}
