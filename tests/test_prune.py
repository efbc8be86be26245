"""Student init from teacher weights: exact at full shape, valid GQA shapes when cut, reloadable."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from edgedistill.plan import student_config
from edgedistill.prune import build_student, calibrate, layer_map, sliced


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


def _calibration(teacher, n=4, length=24):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, teacher.config.vocab_size, (length,), generator=g).tolist() for _ in range(n)]


def test_full_shape_with_measured_importance_is_still_the_teacher(tiny_teacher_dir):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    imp = calibrate(teacher, _calibration(teacher))
    assert imp.hidden.shape == (64,) and imp.layers.shape == (4,) and imp.heads[0].shape == (4,)
    student, _ = build_student(teacher, _student_cfg(teacher), imp)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(teacher(ids).logits, student(ids).logits)


def test_importance_picks_whole_gqa_groups_and_the_strongest_units(tiny_teacher_dir):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    imp = calibrate(teacher, _calibration(teacher))
    # make the second kv group (heads 2, 3) and, inside it, head 3 the important ones in every layer
    for h in imp.heads:
        h.copy_(torch.tensor([0.1, 0.2, 0.3, 5.0]))
    imp.layers.copy_(torch.tensor([0.0, 9.0, 0.1, 0.0]))
    cfg = _student_cfg(teacher, layers=3, hidden=32, intermediate=64, heads=1, kv_heads=1)
    student, info = build_student(teacher, cfg, imp)
    assert info["layer_map"] == [0, 1, 3]  # first and last always, then the layer that changes its input most
    hd = teacher.config.head_dim
    hid = torch.sort(torch.topk(imp.hidden, 32).indices).values
    for i, ti in enumerate(info["layer_map"]):
        t_attn, s_attn = teacher.model.layers[ti].self_attn, student.model.layers[i].self_attn
        assert torch.equal(s_attn.k_proj.weight, t_attn.k_proj.weight[hd:2 * hd][:, hid])  # kv group 1
        assert torch.equal(s_attn.q_proj.weight, t_attn.q_proj.weight[3 * hd:4 * hd][:, hid])  # its head 3
        assert torch.equal(s_attn.o_proj.weight, t_attn.o_proj.weight[hid][:, 3 * hd:4 * hd])


def test_sliced_baseline_keeps_the_first_units_and_evenly_spaced_layers(tiny_teacher_dir):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    student, info = build_student(teacher, _student_cfg(teacher, layers=2, hidden=32, intermediate=64, heads=2,
                                                        kv_heads=1), sliced(teacher.config))
    assert info["layer_map"] == [0, 3]
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, :32])
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight[:64, :32])


def test_cut_records_the_teacher_head_of_each_student_head_and_the_kept_channels(tiny_teacher_dir):
    """Student head h of layer i is teacher head head_map[i][h] of layer layer_map[i], restricted to
    hidden_channels: what the attention loss and the hidden projections start from."""
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    imp = calibrate(teacher, _calibration(teacher))
    for h in imp.heads:  # kv group 1 (heads 2, 3) wins, and inside it head 3 ahead of head 2
        h.copy_(torch.tensor([0.1, 0.2, 0.3, 5.0]))
    student, info = build_student(teacher, _student_cfg(teacher, layers=2, hidden=32, intermediate=64, heads=2,
                                                        kv_heads=1), imp)
    assert info["head_map"] == [[2, 3], [2, 3]]  # not group 0 = heads 0, 1, which grouping by position assumed
    hid = info["hidden_channels"]
    assert hid == torch.sort(torch.topk(imp.hidden, 32).indices).values.tolist()
    hd = teacher.config.head_dim
    for i, ti in enumerate(info["layer_map"]):
        s_q, t_q = student.model.layers[i].self_attn.q_proj.weight, teacher.model.layers[ti].self_attn.q_proj.weight
        for h, th in enumerate(info["head_map"][i]):
            assert torch.equal(s_q[h * hd:(h + 1) * hd], t_q[th * hd:(th + 1) * hd][:, hid])
    _, full = build_student(teacher, _student_cfg(teacher))
    assert full["head_map"] == [[0, 1, 2, 3]] * 4 and full["hidden_channels"] == list(range(64))


def test_lineage_composes_cuts_and_undoes_the_composition():
    from edgedistill.prune import Lineage

    teacher = Lineage([0, 1, 2, 3], [[0, 1, 2, 3]] * 4, list(range(8)))
    first = {"layer_map": [0, 2, 3], "head_map": [[3, 1], [0, 2], [2, 3]], "hidden_channels": [1, 4, 5, 7]}
    second = {"layer_map": [0, 2], "head_map": [[1], [0]], "hidden_channels": [3, 0]}
    assistant = teacher.through(first)
    student = assistant.through(second)
    assert student.layers == [0, 3] and student.heads == [[1], [2]] and student.channels == [7, 1]
    assert student.relative_to(assistant) == second
    assert assistant.relative_to(teacher) == first
