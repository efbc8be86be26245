"""ONNX INT4/INT8: quantize() == ORT's MLAS quantizer bytes, exported folder == quantize(), KV-cache
runner, parity with the HF model computing with the stored weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import edgedistill.export.onnx as export_mod
from edgedistill.distill.qat_onnx import block_for, which_onnx_weights_are_quantized
from edgedistill.distill.quantized import (
    PER_CHANNEL,
    Scheme,
    load_learned_scales,
    quantize,
    quantize_named,
    save_learned_scales,
)
from edgedistill.errors import UserError
from edgedistill.export.onnx import dequantize_onnx_weights, export_onnx, group_schemes, pack
from edgedistill.formats import tensor_group
from edgedistill.runtime import load_runner
from edgedistill.runtime.ort import OrtRunner

FORMATS = {"onnx-int4": 4, "onnx-int8": 8}

# Bounds, from measuring the tiny teacher (accuracy_level 4, i.e. int8 activations in MatMulNBits):
# top-1 agreement 1.0 and mean KL ~9e-7 against the HF model computing with the stored weights, for
# both formats; an unrelated model of the same shape gives agreement 0.64 and KL 0.025. With
# accuracy_level 1 the logits match to 4e-7, while the float HF model is 0.19 (int4) / 0.011 (int8) away.
MIN_TOP1 = 0.9
MAX_KL = 1e-4
EXACT_LOGITS = 1e-4


def mlas_quantize(w: np.ndarray, bits: int, block: int, symmetric: bool = True):
    """The oracle: ORT's own MLAS quantizer on a [out, in] matrix.

    (codes [out, blocks, bytes], scales [out, blocks], zero points [out, ceil(blocks * bits / 8)]).
    MLAS leaves the padding of a ragged last block (and all zero points when symmetric) untouched.
    """
    from onnxruntime.capi import _pybind_state as ort_c

    rows, cols = w.shape
    blocks = -(-cols // block)
    packed = np.zeros((rows, blocks, block * bits // 8), np.uint8)
    scales = np.zeros((rows, blocks), np.float32)
    zero_points = np.zeros((rows, -(-blocks * bits // 8)), np.uint8)
    fn = ort_c.quantize_matmul_8bits if bits == 8 else ort_c.quantize_matmul_4bits
    fn(packed, np.ascontiguousarray(w.T, np.float32), scales, zero_points, block, rows, cols, symmetric)
    return packed, scales, zero_points


def assert_equals_mlas(w: np.ndarray, bits: int, block_size: int, symmetric: bool) -> None:
    rows, cols = w.shape
    q = quantize(torch.from_numpy(w), Scheme(f"onnx-int{bits}", block_size, symmetric))
    codes, scales, zps = mlas_quantize(w, bits, q.block, symmetric)
    assert q.codes.shape == (rows, -(-cols // q.block), q.block) and q.scale.dtype == torch.float32
    # scales bit for bit (the sign of a zero included)
    np.testing.assert_array_equal(q.scale.numpy().view(np.uint32), scales.view(np.uint32))
    # codes of the real columns; MLAS packs a lone last 4-bit code with a zero high nibble
    ours, theirs = pack(q.codes, bits).reshape(rows, -1), codes.reshape(rows, -1)
    whole = cols * bits // 8
    np.testing.assert_array_equal(ours[:, :whole], theirs[:, :whole])
    if cols * bits % 8:
        np.testing.assert_array_equal(ours[:, whole] & 0x0F, theirs[:, whole] & 0x0F)
    # the padding holds the code of 0.0 (the zero point): it dequantizes to exactly 0
    flat = q.codes.reshape(rows, -1)
    assert (flat[:, cols:] == q.zero_point.repeat_interleave(q.block, 1)[:, cols:]).all()
    if symmetric:
        assert (q.zero_point == 1 << (bits - 1)).all()
    else:
        np.testing.assert_array_equal(pack(q.zero_point, bits), zps)


def hard_cases(rng: np.random.Generator, block: int) -> list[np.ndarray]:
    zero_blocks = rng.standard_normal((4, 3 * block))
    zero_blocks[:, :block] = 0
    zero_blocks[1:, 2 * block:] = 0
    cases = [
        rng.standard_normal((37, 3 * block)) * 0.05,
        rng.standard_normal((5, 2 * block + 7)) * 300,  # ragged last block (zero padded)
        rng.standard_normal((3, 5)),  # fewer columns than one block
        np.round(rng.standard_normal((16, 2 * block)) * 8) / 8,  # exact halves: roundf, not half-even
        np.abs(rng.standard_normal((8, block))),  # one-signed blocks: asymmetric zero point 0 / 2**bits-1
        -np.abs(rng.standard_normal((8, block + 3))),
        rng.integers(-8, 8, (8, 2 * block)) * 0.5,  # max == -min ties: the negative end wins
        rng.standard_normal((6, 2 * block)) * np.logspace(-6, 4, 6)[:, None],
        zero_blocks,
    ]
    return [c.astype(np.float32) for c in cases]


# ---- the quantization rule ----------------------------------------------------------------------

@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_equals_mlas_bytes(bits, block, symmetric):
    rng = np.random.default_rng(bits * block + symmetric)
    for w in hard_cases(rng, block):
        assert_equals_mlas(w, bits, block, symmetric)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [4, 8])
def test_per_channel_is_one_block_per_row(bits, symmetric):
    # the padded block is what the node's block_size attribute must say; MLAS quantizes up to 256
    assert [block_for(PER_CHANNEL, c) for c in (1, 16, 17, 64, 80, 256, 576, 1536)] == \
        [16, 16, 32, 64, 128, 256, 1024, 2048]
    rng = np.random.default_rng(bits)
    for cols in (7, 16, 33, 80, 200, 256):
        for w in (rng.standard_normal((9, cols)), np.round(rng.standard_normal((9, cols)) * 4) / 4):
            assert_equals_mlas(w.astype(np.float32), bits, PER_CHANNEL, symmetric)
    w = torch.randn(5, 576)
    q = quantize(w, Scheme(f"onnx-int{bits}", PER_CHANNEL, symmetric))
    assert q.codes.shape == (5, 1, 1024) and q.scale.shape == (5, 1)


def test_rule_details():
    w = torch.zeros(1, 32)
    w[0, :3] = torch.tensor([0.25, -4.0, 4.0])
    # symmetric: scale = -4 / -8 = 0.5 (the tie |max| == |min| takes the negative end); 0.25 / 0.5 + 8
    # = 8.5 rounds away from zero to 9 (half-to-even would give 8, i.e. 0.0); +4 -> 16 clips to 15
    assert quantize(w, Scheme("onnx-int4")).dequantize()[0, :3].tolist() == [0.5, -4.0, 3.5]
    assert quantize(w, Scheme("onnx-int8")).dequantize()[0, :3].tolist() == [0.25, -4.0, 4.0 * 127 / 128]
    # asymmetric: scale = (4 - -4) / 15 in float32, which rounds up, so the zero point is
    # roundf(4 / scale) = roundf(7.4999995) = 7, not the 8 of exact arithmetic; it is stored
    q = quantize(w, Scheme("onnx-int4", symmetric=False))
    assert q.scale.item() == np.float32(8.0) / np.float32(15.0) and q.zero_point.item() == 7
    assert_equals_mlas(w.numpy(), 4, 32, symmetric=False)
    # all-zero block: asymmetric scale 0 and zero point 0; symmetric scale -0.0 and the midpoint
    zeros = torch.zeros(2, 16)
    q = quantize(zeros, Scheme("onnx-int8", 16, symmetric=False))
    assert (q.scale == 0).all() and (q.zero_point == 0).all() and (q.codes == 0).all()
    q = quantize(zeros, Scheme("onnx-int8", 16))
    assert (q.zero_point == 128).all() and (q.codes == 128).all() and torch.signbit(q.scale).all()


def test_bad_block_sizes_are_user_errors():
    for block in (8, 48, 100):
        with pytest.raises(UserError, match="power of two"):
            quantize(torch.randn(2, 64), Scheme("onnx-int4", block))


# ---- learned scales ----------------------------------------------------------------------------

@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [4, 8])
def test_learned_scale_path(bits, symmetric):
    scheme = Scheme(f"onnx-int{bits}", 32, symmetric)
    w = torch.randn(6, 80)
    rule = quantize(w, scheme)
    # the rule's own scale given back reproduces the rule exactly
    again = quantize(w, scheme, rule.scale.clone())
    for a, b in ((again.codes, rule.codes), (again.scale, rule.scale), (again.zero_point, rule.zero_point)):
        assert torch.equal(a, b)
    # another scale: the same roundf / clamp formula; asymmetric keeps the rule's zero point
    learned = rule.scale * torch.linspace(0.6, 1.4, rule.scale.numel()).reshape(rule.scale.shape)
    q = quantize(w, scheme, learned)
    assert torch.equal(q.scale, learned) and torch.equal(q.zero_point, rule.zero_point)
    x = torch.nn.functional.pad(w, (0, 16)).reshape(6, 3, 32).numpy().astype(np.float32)
    recip = (np.float32(1) / learned.numpy())[..., None]
    zp = rule.zero_point.numpy().astype(np.float32)[..., None]
    t = x * recip + zp
    want = np.clip(np.trunc(t) + np.where(np.abs(t - np.trunc(t)) >= 0.5, np.sign(t), 0), 0, (1 << bits) - 1)
    np.testing.assert_array_equal(q.codes.numpy(), want.astype(np.uint8))
    with pytest.raises(ValueError, match="learned scale"):
        quantize(w, scheme, learned[:, :2])


def test_learned_scales_file_round_trip(tmp_path):
    scheme, other = Scheme("onnx-int4", 32), Scheme("onnx-int4", 64)
    w = torch.randn(4, 64)
    s = quantize(w, scheme).scale * 1.25
    save_learned_scales(tmp_path, {"a.weight": (scheme, s), "b.weight": (other, torch.ones(4, 1))})
    learned = load_learned_scales(tmp_path)
    assert learned["a.weight"][0] == scheme and torch.equal(learned["a.weight"][1], s)
    assert torch.equal(quantize_named("a.weight", w, scheme, learned).scale, s)
    # a scale learned for another scheme is not used
    assert torch.equal(quantize_named("b.weight", w, scheme, learned).scale, quantize(w, scheme).scale)


# ---- export: bytes, structure ------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tiny_teacher_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for fmt in FORMATS:
        out[fmt] = root / fmt
        export_onnx(tiny_teacher_dir, out[fmt], fmt)
    return out


@pytest.fixture(scope="module")
def prompt_ids(tiny_teacher_dir) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France? Say why."}],
                                   add_generation_prompt=True, tokenize=False)
    return tok(text)["input_ids"]


def expected_weights(model_dir: Path, fmt: str, **settings) -> dict[str, np.ndarray]:
    """quantize(...).dequantize() of every quantized HF tensor, as the export settings choose schemes."""
    schemes = group_schemes(fmt, settings.get("block_size", 32), settings.get("symmetric", True),
                            settings.get("int8_per_channel", False), settings.get("group_bits"))
    state = load_file(model_dir / "model.safetensors")
    learned = load_learned_scales(model_dir)
    names = which_onnx_weights_are_quantized(AutoConfig.from_pretrained(model_dir))
    return {n: quantize_named(n, state[n], schemes[tensor_group(n)], learned).dequantize().numpy() for n in names}


def hf_with_weights(model_dir: Path, weights: dict[str, np.ndarray]):
    """The float HF model with its quantized matrices replaced (a tied lm_head follows the embedding)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    state = model.state_dict()
    with torch.no_grad():
        for name, w in weights.items():
            state[name].copy_(torch.from_numpy(w))
    return model


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def parity(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || got)) over positions."""
    lp = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    lq = torch.log_softmax(torch.from_numpy(got).double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    return float((ref.argmax(-1) == got.argmax(-1)).mean()), kl


def assert_weights_exact(folder: Path, want: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    got = dequantize_onnx_weights(folder)
    assert sorted(got) == sorted(want)
    for name, w in got.items():
        assert w.dtype == np.float32
        np.testing.assert_array_equal(w, want[name], err_msg=name)
    return got


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_weights_equal_quantize(exported, tiny_teacher_dir, fmt):
    assert_weights_exact(exported[fmt], expected_weights(tiny_teacher_dir, fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_matrix_is_quantized_and_tied(exported, fmt):
    model = onnx.load(exported[fmt] / "model.onnx", load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert "MatMul" not in ops and "Gather" not in [n.op_type for n in model.graph.node if "embed" in n.name]
    gbq = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gbq) == 1 and {a.name: a.i for a in gbq[0].attribute}["bits"] == FORMATS[fmt]
    # what stays float: scales, norm weights (1-D) and the rotary tables
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert all(t.name.endswith("scales") or len(t.dims) <= 1 or t.name in ("cos_cache", "sin_cache") for t in floats)
    # one quantized [vocab, hidden] matrix serves the embedding and the lm_head
    lm_head = next(n for n in model.graph.node if n.name.startswith("/lm_head/"))
    reshape = next(n for n in model.graph.node if n.output[0] == gbq[0].input[0])
    assert reshape.input[0] == lm_head.input[1] and gbq[0].input[2] == lm_head.input[2]
    # nothing left over from the builder: no float embedding table, no unused initializer
    used = {i for n in model.graph.node for i in n.input}
    assert all(t.name in used for t in model.graph.initializer)


@pytest.mark.parametrize("fmt", FORMATS)
def test_folder_has_kv_cache_config_and_tokenizer(exported, fmt):
    out = exported[fmt]
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(FORMATS)  # no .partial, no cache left
    model = onnx.load(out / "model.onnx", load_external_data=False)
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    assert {f"past_key_values.{i}.{kv}" for i in range(4) for kv in ("key", "value")} <= inputs
    assert {f"present.{i}.{kv}" for i in range(4) for kv in ("key", "value")} <= outputs
    info = json.loads((out / export_mod.INFO_FILE).read_text())
    assert info["format"] == fmt and info["block_size"] == 32 and info["accuracy_level"] == 4
    assert info["symmetric"] is True and info["int8_per_channel"] is False
    assert info["scheme_by_group"]["mlp"] == {"format": fmt, "block_size": 32, "symmetric": True}
    assert OrtRunner(out).fmt == fmt


# Each setting is exported at accuracy_level 1 (float activations), so the runtime's logits must be
# those of the HF model computing with the dequantized weights, to float rounding.
SETTINGS = {
    "int4-b16": ("onnx-int4", True, {"block_size": 16}),
    "int4-b64-asym": ("onnx-int4", True, {"block_size": 64, "symmetric": False}),
    "int8-b128-padded-asym": ("onnx-int8", True, {"block_size": 128, "symmetric": False}),  # K=64: one padded block
    "int8-per-channel-untied": ("onnx-int8", False, {"int8_per_channel": True}),
    "int4-embed8-per-channel-asym": ("onnx-int4", True,
                                     {"group_bits": {"embed": 8}, "int8_per_channel": True, "symmetric": False}),
    "int4-embed8-untied": ("onnx-int4", False, {"group_bits": {"embed": 8}}),
    "int4-attn8-mlp8": ("onnx-int4", True, {"group_bits": {"attn": 8, "mlp": 8}}),
}


@pytest.fixture(scope="module")
def untied_dir(tokenizer_dir, tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("untied"), tokenizer_dir, layers=1, tied=False, seed=3)


@pytest.mark.parametrize("name", SETTINGS)
def test_settings_export_exactly_and_run(name, tiny_teacher_dir, untied_dir, tmp_path, prompt_ids):
    fmt, tied, settings = SETTINGS[name]
    src = tiny_teacher_dir if tied else untied_dir
    out = tmp_path / fmt
    export_onnx(src, out, fmt, accuracy_level=1, **settings)
    weights = assert_weights_exact(out, expected_weights(src, fmt, **settings))

    model = onnx.load(out / "model.onnx", load_external_data=False)
    schemes = group_schemes(fmt, settings.get("block_size", 32), settings.get("symmetric", True),
                            settings.get("int8_per_channel", False), settings.get("group_bits"))
    for node in model.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            group = "embed" if "embed_tokens" in node.name or "lm_head" in node.name else node.name.split("/")[3]
            attrs = {a.name: a.i for a in node.attribute}
            scheme = schemes[group]
            assert attrs["bits"] == FORMATS[scheme.fmt], node.name
            cols = attrs.get("K", 64)
            assert attrs["block_size"] == block_for(scheme.block_size, cols), node.name
            assert (len(node.input) > 3) == (not scheme.symmetric), node.name
    info = json.loads((out / export_mod.INFO_FILE).read_text())
    assert info["group_bits"] == settings.get("group_bits", {}) and info["symmetric"] == settings.get("symmetric", True)

    with load_runner(out, fmt) as runner:
        got = runner.logits(prompt_ids)
    assert np.abs(hf_logits(hf_with_weights(src, weights), prompt_ids) - got).max() < EXACT_LOGITS


def test_ragged_per_channel_pads_and_slices_the_tied_table(tokenizer_dir, tmp_path, prompt_ids):
    # hidden 80 (5 heads of 16) and intermediate 320: per-channel blocks of 128 / 512 (more than MLAS
    # quantizes), mostly padding; the tied embedding reads whole padded lm_head rows and slices hidden out
    src = make_tiny_llama(tmp_path / "ragged", tokenizer_dir, layers=1, hidden=80, intermediate=320, heads=5,
                          kv_heads=1, seed=5)
    out = tmp_path / "onnx-int8"
    export_onnx(src, out, "onnx-int8", int8_per_channel=True, accuracy_level=1)
    weights = assert_weights_exact(out, expected_weights(src, "onnx-int8", int8_per_channel=True))
    model = onnx.load(out / "model.onnx", load_external_data=False)
    assert any(n.op_type == "Slice" and n.name.startswith("/model/embed_tokens/") for n in model.graph.node)
    with OrtRunner(out) as runner:
        got = runner.logits(prompt_ids)
    assert np.abs(hf_logits(hf_with_weights(src, weights), prompt_ids) - got).max() < EXACT_LOGITS


def test_learned_scales_are_exported(tiny_teacher_dir, tmp_path, prompt_ids):
    src = tmp_path / "student"
    shutil.copytree(tiny_teacher_dir, src)
    state = load_file(src / "model.safetensors")
    scheme = Scheme("onnx-int4", 64, symmetric=False)
    torch.manual_seed(0)
    scales = {}
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.embed_tokens.weight"):
        rule = quantize(state[name], scheme).scale
        scales[name] = (scheme, rule * (0.8 + 0.4 * torch.rand(rule.shape)))
    # learned for another scheme than the export's: ignored
    scales["model.layers.0.self_attn.q_proj.weight"] = (Scheme("onnx-int4", 32, False), torch.ones(64, 2))
    save_learned_scales(src, scales)

    out = tmp_path / "onnx-int4"
    export_onnx(src, out, "onnx-int4", block_size=64, symmetric=False, accuracy_level=1)
    want = expected_weights(src, "onnx-int4", block_size=64, symmetric=False)
    weights = assert_weights_exact(out, want)
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.embed_tokens.weight"):
        assert not np.array_equal(weights[name], quantize(state[name], scheme).dequantize().numpy()), name
    with OrtRunner(out) as runner:
        got = runner.logits(prompt_ids)
    assert np.abs(hf_logits(hf_with_weights(src, weights), prompt_ids) - got).max() < EXACT_LOGITS


def test_bad_inputs_are_user_errors(tiny_teacher_dir, tmp_path):
    with pytest.raises(UserError):
        export_onnx(tiny_teacher_dir, tmp_path / "x", "onnx-int3")
    with pytest.raises(UserError, match="power of two"):
        export_onnx(tiny_teacher_dir, tmp_path / "x", "onnx-int4", block_size=48)
    with pytest.raises(UserError, match="accuracy_level"):
        export_onnx(tiny_teacher_dir, tmp_path / "x", "onnx-int4", accuracy_level=7)
    with pytest.raises(UserError, match="16-bit"):
        export_onnx(tiny_teacher_dir, tmp_path / "x", "onnx-int4", group_bits={"embed": 16})
    assert not any(tmp_path.iterdir())


def test_failed_build_leaves_previous_artifact_and_no_partial(tiny_teacher_dir, tmp_path, monkeypatch):
    out = tmp_path / "onnx-int4"
    out.mkdir()
    (out / "old").write_text("previous build")

    def broken_builder(student_dir, partial, *args):
        partial.mkdir()
        (partial / "model.onnx").write_text("half written")
        raise RuntimeError("builder died")

    monkeypatch.setattr(export_mod, "_run_builder", broken_builder)
    with pytest.raises(RuntimeError, match="builder died"):
        export_onnx(tiny_teacher_dir, out, "onnx-int4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx-int4"]
    assert (out / "old").read_text() == "previous build"


# ---- runtime: parity with the HF model on the stored weights, KV path, generate -----------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_logits_match_hf_model_on_stored_weights(exported, tiny_teacher_dir, tokenizer_dir, tmp_path, prompt_ids,
                                                 fmt):
    with OrtRunner(exported[fmt]) as runner:
        got = runner.logits(prompt_ids)
    assert got.shape == (len(prompt_ids), 49152) and got.dtype == np.float32
    reference = hf_with_weights(tiny_teacher_dir, expected_weights(tiny_teacher_dir, fmt))
    top1, kl = parity(hf_logits(reference, prompt_ids), got)
    assert top1 >= MIN_TOP1 and kl <= MAX_KL, (top1, kl)

    # the same bounds reject a different model of the same shape
    other = make_tiny_llama(tmp_path / "other", tokenizer_dir, seed=1)
    top1, kl = parity(hf_logits(hf_with_weights(other, expected_weights(other, fmt)), prompt_ids), got)
    assert top1 < MIN_TOP1 and kl > MAX_KL, (top1, kl)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fp32_activations_reproduce_stored_weights_exactly(tiny_teacher_dir, tmp_path, prompt_ids, fmt):
    # accuracy_level 1 removes the activation rounding, leaving only the weights to test
    export_onnx(tiny_teacher_dir, tmp_path / fmt, fmt, accuracy_level=1)
    with OrtRunner(tmp_path / fmt) as runner:
        got = runner.logits(prompt_ids)
    reference = hf_with_weights(tiny_teacher_dir, expected_weights(tiny_teacher_dir, fmt))
    assert np.abs(hf_logits(reference, prompt_ids) - got).max() < EXACT_LOGITS
    float_model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()
    assert np.abs(hf_logits(float_model, prompt_ids) - got).max() > 10 * EXACT_LOGITS


@pytest.mark.parametrize("fmt", FORMATS)
def test_kv_cache_path_matches_full_sequence(exported, prompt_ids, fmt):
    with OrtRunner(exported[fmt], n_threads=1) as runner:
        full = runner.logits(prompt_ids)
        stepped = runner.step_logits(prompt_ids)
        assert np.abs(full - stepped).max() < 1e-4
        assert (full.argmax(-1) == stepped.argmax(-1)).all()

        gen = runner.generate(prompt_ids, 6)
        assert len(gen.tokens) == 6 and gen.prefill_s > 0 and gen.decode_s > 0
        # greedy with the cache == greedy recomputing the whole sequence each step
        seq = list(prompt_ids)
        for _ in range(6):
            seq.append(int(runner.logits(seq)[-1].argmax()))
        assert gen.tokens == seq[len(prompt_ids):]

        stop = gen.tokens[0]
        assert runner.generate(prompt_ids, 6, stop_ids=[stop]).tokens == [stop]


def test_runner_limits_and_loader(exported, prompt_ids):
    runner = load_runner(exported["onnx-int8"], "onnx-int8")
    assert isinstance(runner, OrtRunner) and runner.fmt == "onnx-int8"
    assert runner.n_ctx == 512  # the tiny model's trained context caps the default 2048
    runner.close()
    small = OrtRunner(exported["onnx-int4"], n_ctx=len(prompt_ids) + 2, fmt="onnx-int4")
    assert len(small.generate(prompt_ids, 10).tokens) == 2
    with pytest.raises(ValueError):
        small.logits(list(prompt_ids) * 2)


def test_onnxruntime_genai_loads_and_generates(exported, prompt_ids):
    og = pytest.importorskip("onnxruntime_genai")
    for fmt, path in exported.items():
        model = og.Model(str(path))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt_ids) + 4, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens([prompt_ids])
        tokens = []
        while not gen.is_done():
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
        assert tokens == OrtRunner(path).generate(prompt_ids, 4).tokens, fmt
