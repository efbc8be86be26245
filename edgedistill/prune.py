"""Build the student from the teacher's weights: keep some layers, slice widths by importance.

This is a simple magnitude rule (evenly spaced layers, channels/neurons/GQA groups ranked by weight
norms). It keeps shapes consistent for GQA and records which teacher layer each student layer came from.
"""

from __future__ import annotations

import torch
from torch import Tensor


def layer_map(n_teacher: int, n_student: int) -> list[int]:
    """Evenly spaced teacher layers, always keeping the first and the last."""
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def _float(w) -> Tensor:
    # bitsandbytes parameters dequantize through their own API; plain tensors pass through.
    if hasattr(w, "quant_state") and w.quant_state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, w.quant_state).float()
    if hasattr(w, "SCB") and getattr(w, "SCB", None) is not None:
        return (w.data.float() * w.SCB.float().unsqueeze(1) / 127.0)
    return w.detach().float()


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


def _head_groups(attn, kv_keep: int, group_keep: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """Indices of kept query rows and kv rows; whole kv groups, then the strongest heads inside each."""
    q = _float(attn.q_proj.weight).view(-1, head_dim, attn.q_proj.weight.shape[1])
    k = _float(attn.k_proj.weight).view(-1, head_dim, attn.k_proj.weight.shape[1])
    v = _float(attn.v_proj.weight).view(-1, head_dim, attn.v_proj.weight.shape[1])
    o = _float(attn.o_proj.weight).view(attn.o_proj.weight.shape[0], -1, head_dim)
    n_kv, n_q = k.shape[0], q.shape[0]
    group = n_q // n_kv
    head_score = q.flatten(1).norm(dim=1) * o.transpose(0, 1).flatten(1).norm(dim=1)
    kv_score = k.flatten(1).norm(dim=1) * v.flatten(1).norm(dim=1) * head_score.view(n_kv, group).sum(1)
    q_heads, kv_heads = [], []
    for g in _top(kv_score, kv_keep).tolist():
        kv_heads.append(g)
        inner = _top(head_score[g * group:(g + 1) * group], group_keep)
        q_heads.extend((g * group + inner).tolist())
    rows = lambda heads: torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])  # noqa: E731
    return rows(q_heads), rows(kv_heads)


def _mlp_neurons(mlp, k: int) -> Tensor:
    score = _float(mlp.gate_proj.weight).norm(dim=1) * _float(mlp.up_proj.weight).norm(dim=1) \
        * _float(mlp.down_proj.weight).norm(dim=0)
    return _top(score, k)


@torch.no_grad()
def build_student(teacher, student_cfg) -> tuple[torch.nn.Module, dict]:
    """A student model initialised from `teacher` in the shape of `student_cfg`, and how it was cut."""
    from transformers import AutoModelForCausalLM

    tc = teacher.config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    kv_keep = student_cfg.num_key_value_heads
    group_keep = student_cfg.num_attention_heads // kv_keep
    layers = layer_map(tc.num_hidden_layers, student_cfg.num_hidden_layers)
    hid = hidden_channels(teacher, student_cfg.hidden_size)

    student = AutoModelForCausalLM.from_config(student_cfg, dtype=torch.float32)
    s_sd = student.state_dict()
    t_layers = teacher.model.layers

    def put(name: str, value: Tensor) -> None:
        assert s_sd[name].shape == value.shape, (name, s_sd[name].shape, value.shape)
        s_sd[name].copy_(value)

    put("model.embed_tokens.weight", _float(teacher.model.embed_tokens.weight)[:, hid])
    put("model.norm.weight", _float(teacher.model.norm.weight)[hid])
    if not student_cfg.tie_word_embeddings:
        put("lm_head.weight", _float(teacher.lm_head.weight)[:, hid])
    for i, ti in enumerate(layers):
        tl, p = t_layers[ti], f"model.layers.{i}."
        q_rows, kv_rows = _head_groups(tl.self_attn, kv_keep, group_keep, head_dim)
        neurons = _mlp_neurons(tl.mlp, student_cfg.intermediate_size)
        a, m = tl.self_attn, tl.mlp
        put(p + "self_attn.q_proj.weight", _float(a.q_proj.weight)[q_rows][:, hid])
        put(p + "self_attn.k_proj.weight", _float(a.k_proj.weight)[kv_rows][:, hid])
        put(p + "self_attn.v_proj.weight", _float(a.v_proj.weight)[kv_rows][:, hid])
        put(p + "self_attn.o_proj.weight", _float(a.o_proj.weight)[hid][:, q_rows])
        put(p + "mlp.gate_proj.weight", _float(m.gate_proj.weight)[neurons][:, hid])
        put(p + "mlp.up_proj.weight", _float(m.up_proj.weight)[neurons][:, hid])
        put(p + "mlp.down_proj.weight", _float(m.down_proj.weight)[hid][:, neurons])
        put(p + "input_layernorm.weight", _float(tl.input_layernorm.weight)[hid])
        put(p + "post_attention_layernorm.weight", _float(tl.post_attention_layernorm.weight)[hid])
    student.eval()
    return student, {"layer_map": layers, "rule": "evenly spaced layers; weight-norm importance for "
                     "hidden channels, GQA groups, heads and MLP neurons"}


def run(ctx) -> dict:
    """Stage `init`: the untrained student, cut from the teacher to the planned shape."""
    from transformers import AutoConfig

    from edgedistill.plan import student_config

    teacher, tok = ctx.session.teacher(ctx["teacher"])
    plan = ctx["plan"].summary["student"]
    cfg = AutoConfig.for_model(**student_config(teacher.config.to_dict(), plan["shape"], plan["context"]))
    student, info = build_student(teacher, cfg)
    student.save_pretrained(ctx.dir / "student")
    tok.save_pretrained(ctx.dir / "student")
    return {"params": sum(p.numel() for p in student.parameters()), **info}
