"""The parity gate: runtime activation rounding as QAT models it, and the checks that fail a build."""

from __future__ import annotations

import math

import gguf
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from transformers import AutoModelForCausalLM

from edgedistill.distill import qat
from edgedistill.distill.quantized import Scheme, quantize
from edgedistill.verify import bounds, gate, weight_parity
from conftest import make_tiny_llama


def _ort_identity_matmul(cols: int, block: int):
    """One MatMulNBits node at accuracy_level 4 whose weight is the identity: it returns its input
    as the kernel quantized it, so the activation rounding can be read off directly."""
    import onnxruntime as ort

    q = quantize(torch.eye(cols), Scheme("onnx-int8", block))
    packed = (q.codes.numpy().astype(np.uint8)).reshape(cols, -1, block)
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=cols, N=cols, bits=8,
                            block_size=block, accuracy_level=4)
    graph = helper.make_graph(
        [node], "identity", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, cols])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, cols])],
        [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(q.scale.numpy().reshape(-1), "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("block", [16, 32, 64])
def test_ort_activation_model_matches_the_matmulnbits_kernel(block):
    cols = 256
    g = torch.Generator().manual_seed(block)
    x = torch.randn(7, cols, generator=g) * torch.rand(7, 1, generator=g) * 10
    x[0, :block] = 0  # an all-zero block
    got = _ort_identity_matmul(cols, block).run(None, {"A": x.numpy()})[0]
    want = qat.act_quant(x, "ort", block).numpy()
    # The kernel subtracts the weights' zero point from an int8 dot product in float32, which costs a
    # few ulps of the block sum; any rounding of a different code would cost a whole step (amax/127).
    step = np.abs(x.numpy()).max() / 127
    np.testing.assert_allclose(got, want, rtol=0, atol=step / 100)
    assert np.abs(got - x.numpy()).max() > 1e-3  # the input really was rounded


def test_llamacpp_activation_model_is_ggmls_q8_0_rule():
    # llama.cpp quantizes a matmul input with quantize_row_q8_0, the rule gguf-py's Q8_0 quantizer implements
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 128, generator=g) * 3
    ref = gguf.quants.dequantize(gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0),
                                 gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(qat.act_quant(x, "llamacpp", 32).numpy(), ref)


def test_activation_fake_quant_hooks_round_inputs_pass_gradients_and_come_off():
    from test_distill import tiny_llama

    model = tiny_llama(0, layers=1, hidden=64)
    x = torch.randint(0, 256, (2, 9))
    qat.enable_fake_quant(model, qat.QuantSpec("gguf-q4_0"))
    weights_only = model(x).logits
    qat.enable_fake_quant(model, qat.QuantSpec("gguf-q4_0", act=True))
    with_act = model(x).logits
    assert not torch.allclose(weights_only, with_act)
    with_act.sum().backward()
    assert model.model.layers[0].mlp.down_proj.parametrizations.weight.original.grad.abs().sum() > 0
    # the copy verify compares with computes the same as the training model
    with torch.no_grad():
        copy_logits = qat.fake_quant_model_copy(model, qat.fake_quant_spec(model))(x).logits
    assert torch.allclose(copy_logits, with_act, atol=1e-5)
    qat.disable_fake_quant(model)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_top1_agreement_counts_near_ties_as_agreement_and_only_those():
    from edgedistill.verify import TIE_NATS, logit_agreement

    ref = np.array([[1.0, 1.0 + TIE_NATS / 2, 0.0], [1.0, 1.0 + 10 * TIE_NATS, 0.0], [3.0, 0.0, 0.0]])
    got = np.array([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0], [3.0, 0.0, 0.0]])  # picks token 0 each time
    r = logit_agreement(ref, got)
    assert r["top1_agreement"] == pytest.approx(2 / 3) and r["top1_strict"] == pytest.approx(1 / 3)
    assert logit_agreement(ref, ref)["kl"] == 0.0 and logit_agreement(ref, got)["kl"] > 0


def test_gate_checks_each_bound():
    parity = {"top1_agreement": 0.995, "kl": 2e-4,
              "weights": {"worst_tensor": "w", "worst_diff": 0.0, "worst_allowed": 1e-4, "ok": True}}
    assert all(c["ok"] for c in gate(parity, 0.99, 1e-3))
    failed = {c["name"] for c in gate(parity | {"top1_agreement": 0.98, "kl": 2e-3}, 0.99, 1e-3) if not c["ok"]}
    assert failed == {"parity_top1", "parity_kl"}


def test_gate_widens_only_to_the_measured_noise_floor():
    weights = {"worst_tensor": "w", "worst_diff": 0.0, "worst_allowed": 1e-4, "ok": True}
    floor = {"top1_agreement": 0.96, "kl": 2e-3, "positions": 1024}
    # a runtime that lands on the floor passes
    on_floor = {"top1_agreement": 0.955, "kl": 2.2e-3, "noise_floor": floor, "weights": weights}
    assert all(c["ok"] for c in gate(on_floor, 0.99, 1e-3))
    # one well past it fails, however the floor came out
    past = on_floor | {"top1_agreement": 0.90, "kl": 5e-3}
    assert {c["name"] for c in gate(past, 0.99, 1e-3) if not c["ok"]} == {"parity_top1", "parity_kl"}
    # a floor tighter than the configured bounds leaves them as configured
    tight = on_floor | {"noise_floor": {"top1_agreement": 1.0, "kl": 0.0, "positions": 1024},
                        "top1_agreement": 0.985, "kl": 5e-4}
    b = bounds(tight, 0.99, 1e-3)
    assert b["top1_min"] == 0.99 and b["kl_max"] == 1e-3
    assert {c["name"] for c in gate(tight, 0.99, 1e-3) if not c["ok"]} == {"parity_top1"}
    # and a floor far off (a fragile student) widens them only to the ceiling
    wild = on_floor | {"noise_floor": {"top1_agreement": 0.5, "kl": 1.0, "positions": 1024}}
    b = bounds(wild, 0.99, 1e-3)
    assert b["top1_min"] == pytest.approx(0.90) and b["kl_max"] == pytest.approx(1e-2)


def test_weight_parity_fails_a_missing_tensor(tiny_student, tmp_path, monkeypatch):
    from edgedistill.export import gguf as gguf_export
    from edgedistill.export.gguf import export_gguf

    path = tmp_path / "m.gguf"
    export_gguf(tiny_student, path, "gguf-q8_0")
    reference = _reference(tiny_student, "gguf-q8_0")
    real = gguf_export.dequantize_gguf_tensors
    monkeypatch.setattr(gguf_export, "dequantize_gguf_tensors",
                        lambda p: {k: v for k, v in real(p).items() if "k_proj" not in k})
    w = weight_parity(path, "gguf-q8_0", reference)
    assert not w["ok"] and w["missing"] == ["model.layers.0.self_attn.k_proj.weight"]
    assert "missing" in gate({"top1_agreement": 1.0, "kl": 0.0, "weights": w}, 0.99, 1e-3)[0]["message"]


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory, tokenizer_dir):
    return make_tiny_llama(tmp_path_factory.mktemp("student"), tokenizer_dir, layers=1, hidden=64, intermediate=128)


def _reference(student_dir, fmt):
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    return qat.fake_quant_model_copy(model, qat.QuantSpec(fmt))


def test_gate_catches_a_corrupted_gguf_scale(tiny_student, tmp_path):
    from edgedistill.export.gguf import export_gguf

    path = tmp_path / "m.gguf"
    export_gguf(tiny_student, path, "gguf-q4_0")
    reference = _reference(tiny_student, "gguf-q4_0")
    clean = weight_parity(path, "gguf-q4_0", reference)
    assert clean["ok"] and clean["max_abs_diff"] == 0.0

    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_down.weight")
    with open(path, "r+b") as f:  # the first block's fp16 scale d, doubled
        f.seek(tensor.data_offset)
        d = np.frombuffer(f.read(2), np.float16)[0]
        f.seek(tensor.data_offset)
        f.write(np.float16(d * 2).tobytes())
    bad = weight_parity(path, "gguf-q4_0", reference)
    assert not bad["ok"] and bad["worst_tensor"] == "model.layers.0.mlp.down_proj.weight"
    failed = [c for c in gate({"top1_agreement": 1.0, "kl": 0.0, "weights": bad}, 0.99, 1e-3) if not c["ok"]]
    assert [c["name"] for c in failed] == ["parity_weights"] and "down_proj" in failed[0]["message"]


def test_gate_catches_a_corrupted_onnx_scale(tiny_student, tmp_path):
    from edgedistill.export.onnx import export_onnx

    out = tmp_path / "onnx-int4"
    export_onnx(tiny_student, out, "onnx-int4")
    reference = _reference(tiny_student, "onnx-int4")
    assert weight_parity(out, "onnx-int4", reference)["ok"]

    model = onnx.load(str(out / "model.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and "down_proj" in n.name)
    init = next(i for i in model.graph.initializer if i.name == node.input[2])
    scales = numpy_helper.to_array(init).copy()
    scales.flat[0] *= 1.01
    init.CopyFrom(numpy_helper.from_array(scales, init.name))
    onnx.save(model, str(out / "model.onnx"), save_as_external_data=False)
    bad = weight_parity(out, "onnx-int4", reference)
    assert not bad["ok"] and bad["worst_tensor"] == "model.layers.0.mlp.down_proj.weight"


# ---------------------------------------------------------------- learned scales (LSQ)

@pytest.mark.parametrize("fmt", ["gguf-q4_0", "onnx-int4"])
def test_lsq_forward_is_the_exported_codes_and_its_gradients_are_lsqs(fmt):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(4, 64, generator=g) * 0.1).requires_grad_()
    scheme = Scheme(fmt)
    scale = torch.nn.Parameter(quantize(w, scheme).scale * 0.9)  # off the rule: some codes clamp
    out = qat._lsq(w, scale, scheme)
    stored = quantize(w, scheme, scale.detach())
    assert torch.equal(out.detach(), stored.dequantize())

    out.sum().backward()
    c = (stored.codes.float() - stored.zero_point.float().unsqueeze(-1)).reshape(4, -1)
    ratio = w.detach() / scale.detach().repeat_interleave(32, dim=1)
    inside = (ratio - c).abs() <= 0.5 + 1e-3
    assert inside.any() and (~inside).any()
    assert torch.equal(w.grad, inside.float())
    qmax = 7.0
    want = torch.where(inside, c - ratio, c).reshape(4, 2, 32).sum(-1) / (32 * qmax) ** 0.5
    torch.testing.assert_close(scale.grad, want, rtol=1e-5, atol=1e-6)


def test_learned_scales_train_save_and_reach_the_copy(tmp_path):
    from test_distill import TRAIN, random_examples, tiny_llama

    from edgedistill.distill.quantized import load_learned_scales, save_learned_scales
    from edgedistill.distill.trainer import TrainConfig, distill

    spec = qat.QuantSpec("gguf-q4_0", learn_scales=True)
    student, teacher = tiny_llama(1, layers=1, hidden=32), tiny_llama(0, layers=2, hidden=64)
    with torch.no_grad():
        student.model.embed_tokens.weight[3] = 0  # an all-zero row: scale 0, LSQ must stay finite
    rule = quantize(student.model.layers[0].mlp.up_proj.weight, Scheme("gguf-q4_0")).scale
    # fake-quant (and the scales' initialisation) from step 0, so `rule` is where LSQ started
    cfg = TrainConfig(**(TRAIN | {"steps": 12}), qat=spec, qat_start_step=0)
    result = distill(student, teacher, random_examples(30, 1), cfg, tmp_path / "run", progress=False)
    assert result["qat_ran"] and all(math.isfinite(x) for x in result["loss_curve"])
    learned = qat.learned_scales(student, remove=True)
    assert not any(n.endswith(qat.SCALE) for n, _ in student.named_parameters())
    assert set(learned) == {f"{n}.weight" for n, _ in qat.quantized_modules(student) if n != "lm_head"}  # tied
    scale = learned["model.layers.0.mlp.up_proj.weight"][1]
    assert scale.shape == rule.shape and not torch.equal(scale, rule)  # they trained

    save_learned_scales(tmp_path, learned)
    loaded = load_learned_scales(tmp_path)
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        with_learned = qat.fake_quant_model_copy(student, spec, learned=loaded)(x).logits
        with_rule = qat.fake_quant_model_copy(student, spec, learned={})(x).logits
    assert not torch.allclose(with_learned, with_rule)
    # a scale learned for another format is not used
    with torch.no_grad():
        other = qat.fake_quant_model_copy(student, qat.QuantSpec("gguf-q8_0"), learned=loaded)(x).logits
        plain = qat.fake_quant_model_copy(student, qat.QuantSpec("gguf-q8_0"), learned={})(x).logits
    assert torch.equal(other, plain)


def test_learned_scales_resume_bit_identically_and_only_trained_ones_are_kept(tmp_path):
    from test_distill import RESUME, random_examples, tiny_llama

    from edgedistill.distill.trainer import TrainConfig, distill

    spec = qat.QuantSpec("gguf-q4_0", {"embed": 8}, learn_scales=True)
    cfg = TrainConfig(**RESUME, qat=spec, qat_start_step=5)
    teacher, data = tiny_llama(0, layers=2, hidden=64), random_examples(30, 1)
    straight = tiny_llama(1, layers=1, hidden=32)
    full = distill(straight, teacher, data, cfg, tmp_path / "a", progress=False)
    # killed after step 10 (last checkpoint: step 8, LSQ already on), then resumed
    distill(tiny_llama(1, layers=1, hidden=32), teacher, data, cfg, tmp_path / "b", progress=False, stop_after=10)
    resumed = tiny_llama(1, layers=1, hidden=32)
    second = distill(resumed, teacher, data, cfg, tmp_path / "b", progress=False, resume=True)
    assert second["resumed_from"] == 8 and second["loss_curve"] == full["loss_curve"]
    a, b = qat.learned_scales(straight), qat.learned_scales(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k][1], b[k][1]) and a[k][0] == b[k][0] for k in a)
    assert a["model.embed_tokens.weight"][0].fmt == "gguf-q8_0"  # each scale knows its own scheme

    never = TrainConfig(**RESUME, qat=spec, qat_start_step=RESUME["steps"])
    assert not distill(tiny_llama(1, layers=1, hidden=32), teacher, data, never, tmp_path / "c",
                       progress=False)["qat_ran"]


def test_noise_floor_is_the_mean_over_three_last_bit_perturbations():
    from test_distill import tiny_llama

    from edgedistill.verify import _logits, noise_floor

    model = tiny_llama(0, layers=2, hidden=64)
    seqs = [list(range(5, 40)), list(range(60, 90))]
    plain = qat.fake_quant_model_copy(model, qat.QuantSpec("gguf-q4_0")).eval()
    calm = noise_floor(plain, _logits(plain, seqs), seqs)
    assert len(calm["realisations"]) == 3 and calm["positions"] == 65
    assert calm["kl"] < 1e-8  # float activations: last-bit changes stay last-bit
    rounded = qat.fake_quant_model_copy(model, qat.QuantSpec("gguf-q4_0", act=True)).eval()
    chaotic = noise_floor(rounded, _logits(rounded, seqs), seqs)
    assert chaotic["kl"] > 100 * calm["kl"]  # int8 activation codes flip and the flips propagate
    assert all(r["kl"] > 0 for r in chaotic["realisations"])  # each perturbation reaches the codes
