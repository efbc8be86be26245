"""Student init from teacher weights: exact at full shape, valid GQA shapes when cut, reloadable."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from edgedistill.plan import student_config
from edgedistill.prune import build_student, layer_map


def _student_cfg(teacher, **shape):
    base = dict(layers=teacher.config.num_hidden_layers, hidden=teacher.config.hidden_size,
                intermediate=teacher.config.intermediate_size, heads=teacher.config.num_attention_heads,
                kv_heads=teacher.config.num_key_value_heads, head_dim=teacher.config.head_dim)
    base.update(shape)
    d = student_config(teacher.config.to_dict(), base, 256)
    return AutoConfig.for_model(**d)


def test_layer_map_keeps_first_and_last():
    assert layer_map(30, 8)[0] == 0 and layer_map(30, 8)[-1] == 29
    assert len(set(layer_map(30, 8))) == 8
    assert layer_map(4, 4) == [0, 1, 2, 3]


def test_full_shape_reproduces_teacher_logits(tiny_teacher_dir):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    student, info = build_student(teacher, _student_cfg(teacher))
    ids = torch.randint(0, teacher.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(teacher(ids).logits, student(ids).logits)
    assert info["layer_map"] == [0, 1, 2, 3]


def test_cut_student_is_valid_gqa_and_reloads(tiny_teacher_dir, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    # teacher: 4 heads in 2 kv groups of 2, hidden 64, head_dim 16 -> keep 1 group of 2 heads
    student, info = build_student(teacher, _student_cfg(teacher, layers=2, hidden=32, intermediate=64,
                                                        heads=2, kv_heads=1))
    assert info["layer_map"] == [0, 3]
    assert student.model.layers[0].self_attn.k_proj.weight.shape == (16, 32)
    assert student.model.layers[0].self_attn.q_proj.weight.shape == (32, 32)
    student.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, teacher.config.vocab_size, (1, 10))
    with torch.no_grad():
        out = again(ids).logits
    assert torch.isfinite(out).all() and torch.equal(out, student(ids).logits)
    # the student's weights really are slices of the teacher's, not a fresh init
    emb_t, emb_s = teacher.model.embed_tokens.weight, student.model.embed_tokens.weight
    assert all(any(torch.equal(emb_s[:, j], emb_t[:, i]) for i in range(emb_t.shape[1])) for j in range(4))
