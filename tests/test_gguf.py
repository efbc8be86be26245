"""GGUF codes and scales, export and the llama.cpp runner, checked against gguf-py, llama.cpp and transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import make_tiny_llama, smollm2_gguf_path

import edgedistill.export.gguf as export_mod
from edgedistill.distill.quantized import Scheme, quantize, quantize_named, save_learned_scales
from edgedistill.errors import UserError
from edgedistill.export.gguf import dequantize_gguf_tensors, export_gguf, pack_blocks, permute_qk
from edgedistill.formats import tensor_format, tensor_group
from edgedistill.runtime import load_runner
from edgedistill.runtime.llamacpp import LlamaCppRunner

FORMATS = ["gguf-q4_0", "gguf-q8_0"]
QTYPE = {"gguf-q4_0": gguf.GGMLQuantizationType.Q4_0, "gguf-q8_0": gguf.GGMLQuantizationType.Q8_0}

# Bounds for llama.cpp against the PyTorch model computing with the quantized weights. llama.cpp also rounds activations to
# 8 bits inside its quantized dot products and keeps the KV cache in fp16, so it is not exact.
# Measured on the sharp tiny model below (64 positions): top-1 0.95-0.97, KL 0.8e-3 to 1.6e-3.
# An export with the q/k rows left in HF order measures top-1 ~0.18, KL ~1.5; the unquantized model
# against a Q4_0 export measures top-1 ~0.42, KL ~0.39.
MIN_TOP1 = 0.9
MAX_KL = 5e-3


def reference_bytes(x: np.ndarray, fmt: str) -> np.ndarray:
    return gguf.quants.quantize(x, QTYPE[fmt])


def parity(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement and mean KL(ref || got) over positions."""
    p = torch.log_softmax(torch.as_tensor(ref, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.as_tensor(got, dtype=torch.float64), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    return float((ref.argmax(-1) == got.argmax(-1)).mean()), kl


# --- codes, scales and their bytes ------------------------------------------------------------


def awkward_weights(seed: int = 0) -> np.ndarray:
    """Random rows at many scales, plus blocks that stress ties, zeros, rounding halves and fp16 range."""
    rng = np.random.default_rng(seed)
    scales = np.logspace(-7, 2, 64, dtype=np.float32)[:, None]
    x = (rng.standard_normal((64, 256)) * scales).astype(np.float32)
    x[0, :32] = 0  # zero block: scale 0
    x[1, :32] = 0.5  # every element ties for the maximum
    x[2, :32] = rng.integers(-4, 5, 32) * 0.01  # ties between +max and -max
    x[3, :32] = np.arange(-16, 16) / 2 * 127 / 16  # codes land on exact halves before Q8_0 rounding
    x[4, :32] = np.linspace(-1, 1, 32)
    x[5, :32] = rng.standard_normal(32) * 1e5  # huge: the fp16 scale is far from the float32 one
    x[6, :32] = rng.standard_normal(32) * 1e-30  # tiny: the fp16 scale underflows to 0
    x[7, :32] = rng.standard_normal(32) * 1e-6  # the fp16 scale is subnormal
    return x


def random_learned_scale(x: np.ndarray, fmt: str, seed: int = 0) -> torch.Tensor:
    """The reference scale of each block times a random factor in [0.6, 1.4], as LSQ might move it."""
    ref = quantize(torch.from_numpy(x), Scheme(fmt)).scale
    gen = torch.Generator().manual_seed(seed)
    return ref * (0.6 + 0.8 * torch.rand(ref.shape, generator=gen))


@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_bytes_equal_gguf_reference(fmt):
    for seed in range(3):
        x = awkward_weights(seed)
        np.testing.assert_array_equal(pack_blocks(quantize(torch.from_numpy(x), Scheme(fmt)), fmt),
                                      reference_bytes(x, fmt))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("learned", [False, True])
def test_gguf_reads_our_bytes_as_the_quantized_weight(fmt, learned):
    x = awkward_weights(4)
    q = quantize(torch.from_numpy(x), Scheme(fmt), random_learned_scale(x, fmt) if learned else None)
    read = gguf.quants.dequantize(pack_blocks(q, fmt), QTYPE[fmt])
    np.testing.assert_array_equal(read, q.dequantize().numpy())


@pytest.mark.parametrize("fmt", FORMATS)
def test_learned_scale_is_stored_as_fp16_and_codes_use_the_stored_value(fmt):
    x = awkward_weights(5)
    scale = random_learned_scale(x, fmt)
    q = quantize(torch.from_numpy(x), Scheme(fmt), scale)
    assert torch.equal(q.scale, scale.half().float())
    # codes come from the fp16 value the file holds, not from the float the optimizer had
    again = quantize(torch.from_numpy(x), Scheme(fmt), q.scale)
    assert torch.equal(again.codes, q.codes)
    ref = quantize(torch.from_numpy(x), Scheme(fmt))
    assert not torch.equal(q.codes, ref.codes)
    # shrunken scales saturate: codes clamp to the format's range instead of wrapping
    tight = quantize(torch.from_numpy(x), Scheme(fmt), scale * 0.25)
    lo, hi = (0, 15) if fmt == "gguf-q4_0" else (1, 255)
    assert int(tight.codes.min()) == lo and int(tight.codes.max()) == hi


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_per_row_commutes_with_the_qk_permutation(fmt):
    x = awkward_weights(6)[:, :64]  # 64 rows: 4 heads of 16
    packed = pack_blocks(quantize(torch.from_numpy(x), Scheme(fmt)), fmt)
    permuted_first = pack_blocks(quantize(torch.from_numpy(permute_qk(x, 4)), Scheme(fmt)), fmt)
    np.testing.assert_array_equal(permute_qk(packed, 4), permuted_first)


def test_quantize_rejects_what_gguf_cannot_store():
    w = torch.zeros(4, 64)
    with pytest.raises(UserError, match="block size 64"):
        quantize(w, Scheme("gguf-q4_0", block_size=64))
    with pytest.raises(UserError, match="asymmetric"):
        quantize(w, Scheme("gguf-q8_0", symmetric=False))
    with pytest.raises(UserError, match="multiple of 32"):
        quantize(torch.zeros(4, 48), Scheme("gguf-q4_0"))
    with pytest.raises(UserError, match="2-D"):
        quantize(torch.zeros(64), Scheme("gguf-q8_0"))
    with pytest.raises(UserError, match="learned scale has shape"):
        quantize(w, Scheme("gguf-q4_0"), torch.ones(4, 3))
    with pytest.raises(UserError, match="fp16"):
        quantize(w, Scheme("gguf-q8_0"), torch.full((4, 2), 1e6))


# --- export -----------------------------------------------------------------------------------


def sharpen(src: Path, dst: Path, seed: int = 1) -> Path:
    """Redraw the weights at a scale where logits are peaked (std ~2.4 rather than ~0.16).

    The fixture's default init gives near-uniform next-token distributions, on which any export,
    broken or not, agrees with any other; these weights make the parity bounds able to fail.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = 0.3 if "embed_tokens" in name else p.shape[1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.save_pretrained(dst)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, dst)
    return dst


@pytest.fixture(scope="module")
def sharp_dir(tiny_teacher_dir, tmp_path_factory) -> Path:
    return sharpen(tiny_teacher_dir, tmp_path_factory.mktemp("sharp"))


class Artifact:
    """An export of the sharp model, read back once and shared by the tests of this module."""

    def __init__(self, model_dir: Path, path: Path, fmt: str, **kw):
        export_gguf(model_dir, path, fmt, **kw)
        self.path, self.fmt = path, fmt
        reader = gguf.GGUFReader(path)
        self.types = {t.name: t.tensor_type for t in reader.tensors}
        self.kv = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
        self.tokenizer = tokenizer_fields(reader)
        self.weights = dequantize_gguf_tensors(reader)


@pytest.fixture(scope="module")
def exported(sharp_dir, tmp_path_factory):
    """q4_0 builds its tokenizer from the HF files, q8_0 copies the teacher GGUF's: both paths run."""
    out = tmp_path_factory.mktemp("gguf")
    made = {}

    def get(fmt: str) -> Artifact:
        if fmt not in made:
            kw = {"tokenizer_gguf": smollm2_gguf_path()} if fmt == "gguf-q8_0" else {}
            made[fmt] = Artifact(sharp_dir, out / f"model-{fmt.split('-')[1]}.gguf", fmt, **kw)
        return made[fmt]

    return get


def tokenizer_fields(reader: gguf.GGUFReader) -> dict:
    out = {}
    for k, f in reader.fields.items():
        if k.startswith("tokenizer."):
            raw = f.types[-1] == gguf.GGUFValueType.STRING  # compare bytes, as llama.cpp reads them
            out[k] = [bytes(f.parts[i]) for i in f.data] if raw else f.contents()
    return out


def quantized_model(model_dir: Path, fmt: str | None = None, group_bits: dict | None = None,
                    learned: dict | None = None, **kw):
    """The HF model; with `fmt`, every 2-D weight (embedding and linears) replaced by
    quantize(...).dequantize() in its tensor's format, with its learned scale if any.

    A tied embedding / lm_head is one parameter, listed once under the embedding's name, which is
    the name the exporter quantizes it under.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw).eval()
    if fmt is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    scheme = Scheme(tensor_format(fmt, tensor_group(name), group_bits))
                    p.copy_(quantize_named(name, p, scheme, learned or {}).dequantize())
    return model


def logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].numpy()


def hf_logits(model_dir: Path, ids, fmt: str | None = None, **kw) -> np.ndarray:
    """Logits of the HF model; with `fmt`, computed with the quantized weights (see quantized_model)."""
    return logits(quantized_model(model_dir, fmt, **kw), ids)


def runtime_logits(path: Path, ids) -> np.ndarray:
    runner = LlamaCppRunner(path, n_ctx=256)
    try:
        return runner.logits(ids)
    finally:
        runner.close()


IDS = np.random.default_rng(0).integers(0, 49152, 64).tolist()


@pytest.mark.parametrize("fmt", FORMATS)
def test_llamacpp_logits_match_quantized_model(fmt, sharp_dir, exported):
    path = exported(fmt).path
    got = runtime_logits(path, IDS)
    assert got.shape == (len(IDS), 49152) and got.dtype == np.float32
    top1, kl = parity(hf_logits(sharp_dir, IDS, fmt), got)
    assert top1 >= MIN_TOP1 and kl <= MAX_KL, (top1, kl)

    # the bound can fail: the unquantized model is measurably further from the artifact
    top1_f, kl_f = parity(hf_logits(sharp_dir, IDS), got)
    if fmt == "gguf-q4_0":
        assert top1_f < MIN_TOP1 and kl_f > MAX_KL, (top1_f, kl_f)
    else:  # Q8_0 weight error is as small as llama.cpp's own activation rounding: only compare
        assert kl_f > 1.5 * kl, (kl_f, kl)


def test_unpermuted_qk_fails_the_parity_bound(sharp_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "permute_qk", lambda w, n_head: w)
    path = tmp_path / "broken.gguf"
    export_gguf(sharp_dir, path, "gguf-q4_0")
    top1, kl = parity(hf_logits(sharp_dir, IDS, "gguf-q4_0"), runtime_logits(path, IDS))
    assert top1 < MIN_TOP1 and kl > MAX_KL, (top1, kl)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantized_weights_equal_quantize(fmt, sharp_dir, exported):
    from safetensors.torch import load_file

    weights = load_file(sharp_dir / "model.safetensors")
    deq = exported(fmt).weights
    assert set(deq) == set(weights) - {"lm_head.weight"}  # tied: llama.cpp reuses token_embd
    for name, w in weights.items():
        if name in deq:
            want = quantize(w, Scheme(fmt)).dequantize().numpy() if w.dim() == 2 else w.numpy()
            np.testing.assert_array_equal(deq[name], want, err_msg=name)


@pytest.mark.parametrize("fmt", FORMATS)
def test_file_layout(fmt, exported):
    types, field = exported(fmt).types, exported(fmt).kv
    assert "output.weight" not in types
    assert types["token_embd.weight"] == QTYPE[fmt]
    assert all(types[n] == QTYPE[fmt] for n in types if not n.endswith("norm.weight"))
    assert all(types[n] == gguf.GGMLQuantizationType.F32 for n in types if n.endswith("norm.weight"))
    assert field["general.architecture"] == "llama"
    assert field["general.file_type"] == {"gguf-q4_0": 2, "gguf-q8_0": 7}[fmt]
    assert (field["llama.context_length"], field["llama.embedding_length"], field["llama.block_count"]) == (512, 64, 4)
    assert (field["llama.attention.head_count"], field["llama.attention.head_count_kv"]) == (4, 2)
    assert field["llama.rope.dimension_count"] == 16 and field["llama.rope.freq_base"] == 10000.0
    assert field["llama.vocab_size"] == 49152


# --- learned scales ---------------------------------------------------------------------------

LEARNED_BITS = {"embed": 8}
IGNORED = "model.layers.0.self_attn.v_proj.weight"  # its scale was learned for another scheme


@pytest.fixture(scope="module")
def learned_export(sharp_dir, tmp_path_factory):
    """A copy of the sharp student with a learned scale for every 2-D weight, exported to Q4_0 with
    the embedding in Q8_0 (model dir, file, the same export without learned scales, the scales)."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("learned")
    model_dir = root / "student"
    shutil.copytree(sharp_dir, model_dir)
    learned = {}
    for i, (name, w) in enumerate(sorted(load_file(model_dir / "model.safetensors").items())):
        if w.dim() == 2:
            fmt = tensor_format("gguf-q4_0", tensor_group(name), LEARNED_BITS)
            if name == IGNORED:
                fmt = "gguf-q8_0"
            learned[name] = (Scheme(fmt), random_learned_scale(w.numpy(), fmt, seed=i))
    save_learned_scales(model_dir, learned)
    export_gguf(model_dir, root / "learned.gguf", "gguf-q4_0", group_bits=LEARNED_BITS)
    export_gguf(sharp_dir, root / "plain.gguf", "gguf-q4_0", group_bits=LEARNED_BITS)
    return model_dir, root / "learned.gguf", root / "plain.gguf", learned


def test_learned_scales_are_what_the_file_holds(learned_export):
    model_dir, path, plain, learned = learned_export
    want = quantized_model(model_dir, "gguf-q4_0", LEARNED_BITS, learned).state_dict()
    reader = gguf.GGUFReader(path)
    deq = dequantize_gguf_tensors(reader)
    assert set(deq) == set(want) - {"lm_head.weight"}
    for name, w in deq.items():
        np.testing.assert_array_equal(w, want[name].numpy(), err_msg=name)

    # the learned scales changed the bytes of every tensor they apply to, and of no other
    raw = {t.name: bytes(t.data) for t in reader.tensors}
    raw_plain = {t.name: bytes(t.data) for t in gguf.GGUFReader(plain).tensors}
    changed = {n for n in raw if raw[n] != raw_plain[n]}
    assert changed == {n for n in raw if not n.endswith("norm.weight") and n != "blk.0.attn_v.weight"}


def test_transformers_and_llamacpp_run_the_learned_export(learned_export):
    # transformers dequantizes Q4_0/Q8_0 exactly and un-permutes q/k, so it must compute what the
    # torch model with the quantized weights computes; llama.cpp within its activation rounding
    model_dir, path, _, learned = learned_export
    want = logits(quantized_model(model_dir, "gguf-q4_0", LEARNED_BITS, learned), IDS)
    got = hf_logits(path.parent, IDS, gguf_file=path.name)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

    runtime = runtime_logits(path, IDS)
    top1, kl = parity(want, runtime)
    assert top1 >= MIN_TOP1 and kl <= MAX_KL, (top1, kl)
    # the bound can fail: the model quantized with the reference scales is further from the file
    top1_ref, kl_ref = parity(hf_logits(model_dir, IDS, "gguf-q4_0", group_bits=LEARNED_BITS), runtime)
    assert kl_ref > MAX_KL and top1_ref < top1, (top1_ref, kl_ref)


def test_untied_model_writes_a_quantized_output(tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = sharpen(make_tiny_llama(tmp_path / "hf", tokenizer_dir, tied=False, seed=3), tmp_path / "sharp")
    path = tmp_path / "untied.gguf"
    export_gguf(model_dir, path, "gguf-q4_0")
    deq = dequantize_gguf_tensors(path)
    lm_head = AutoModelForCausalLM.from_pretrained(model_dir).lm_head.weight.detach()
    np.testing.assert_array_equal(deq["lm_head.weight"], quantize(lm_head, Scheme("gguf-q4_0")).dequantize().numpy())
    top1, kl = parity(hf_logits(model_dir, IDS, "gguf-q4_0"), runtime_logits(path, IDS))
    assert top1 >= MIN_TOP1 and kl <= MAX_KL, (top1, kl)


@pytest.mark.parametrize("tied", [True, False])
def test_embed_group_at_8_bits_in_a_q4_0_file(tied, sharp_dir, tokenizer_dir, tmp_path):
    model_dir = sharp_dir if tied else sharpen(make_tiny_llama(tmp_path / "hf", tokenizer_dir, tied=False, seed=3),
                                               tmp_path / "sharp")
    path = tmp_path / "mixed.gguf"
    export_gguf(model_dir, path, "gguf-q4_0", group_bits={"embed": 8})
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    embed = {"token_embd.weight"} if tied else {"token_embd.weight", "output.weight"}
    assert {n for n, t in types.items() if t == gguf.GGMLQuantizationType.Q8_0} == embed
    assert {t for n, t in types.items() if n not in embed and not n.endswith("norm.weight")} == {QTYPE["gguf-q4_0"]}
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0

    reference = quantized_model(model_dir, "gguf-q4_0", {"embed": 8})
    want = reference.state_dict()
    deq = dequantize_gguf_tensors(reader)
    assert set(deq) == set(want) - ({"lm_head.weight"} if tied else set())
    for name, w in deq.items():
        np.testing.assert_array_equal(w, want[name].numpy(), err_msg=name)

    runner = load_runner(path, "gguf-q4_0")
    try:
        got = runner.logits(IDS)
    finally:
        runner.close()
    top1, kl = parity(logits(reference, IDS), got)
    assert top1 >= MIN_TOP1 and kl <= MAX_KL, (top1, kl)
    # the bound can fail: the all-Q4_0 model is measurably further from the mixed file
    top1_q4, kl_q4 = parity(hf_logits(model_dir, IDS, "gguf-q4_0"), got)
    assert kl_q4 > MAX_KL and top1_q4 < top1, (top1_q4, kl_q4)


def test_group_bits_the_runtime_cannot_store_are_refused(sharp_dir, tmp_path):
    with pytest.raises(UserError, match="16-bit"):
        export_gguf(sharp_dir, tmp_path / "x.gguf", "gguf-q4_0", group_bits={"attn": 16})
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def teacher_tokenizer() -> dict:
    return tokenizer_fields(gguf.GGUFReader(smollm2_gguf_path()))


@pytest.mark.parametrize("fmt", FORMATS)
def test_tokenizer_metadata_equals_the_teachers(fmt, exported, teacher_tokenizer):
    # q4_0 rebuilt it from the HF files, q8_0 copied it: either way the same bytes as the teacher's
    # (tokens, types, merges, pre "smollm", bos/eos/unk/pad ids, add_bos, chat template)
    assert exported(fmt).tokenizer == teacher_tokenizer


def test_llamacpp_tokenizes_like_hf(exported, sharp_dir):
    import llama_cpp
    from transformers import AutoTokenizer

    text = "<|im_start|>user\nIn 2024, 12345 apples don't   fit!\n<|im_end|>"
    want = AutoTokenizer.from_pretrained(sharp_dir)(text).input_ids
    runner = LlamaCppRunner(exported("gguf-q4_0").path, n_ctx=64)
    try:
        llm: llama_cpp.Llama = runner._llm
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == want
    finally:
        runner.close()


def test_generate_is_greedy_and_timed(exported):
    runner = load_runner(exported("gguf-q8_0").path, "gguf-q8_0")
    try:
        assert isinstance(runner, LlamaCppRunner) and runner.fmt == "gguf-q8_0"
        prompt = IDS[:8]
        gen = runner.generate(prompt, 12)
        assert len(gen.tokens) == 12 and all(isinstance(t, int) for t in gen.tokens)
        assert gen.prefill_s > 0 and gen.decode_s > 0
        assert runner.generate(prompt, 12).tokens == gen.tokens
        # each generated token is the argmax of the logits over prompt + what came before
        logits = runner.logits(prompt + gen.tokens[:-1])
        assert logits[len(prompt) - 1:].argmax(-1).tolist() == gen.tokens
        # a fresh context each call: a different prompt in between changes nothing
        runner.logits(IDS[20:40])
        np.testing.assert_array_equal(runner.logits(prompt + gen.tokens[:-1]), logits)
        stopped = runner.generate(prompt, 12, stop_ids=[gen.tokens[3]])
        assert stopped.tokens == gen.tokens[: gen.tokens.index(gen.tokens[3]) + 1]
    finally:
        runner.close()


def test_export_is_atomic(sharp_dir, tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    export_gguf(sharp_dir, path, "gguf-q4_0")
    assert path.is_file() and not path.with_suffix(".gguf.partial").exists()

    def killed(*args, **kw):
        raise KeyboardInterrupt

    broken = tmp_path / "killed.gguf"
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", killed)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(sharp_dir, broken, "gguf-q4_0")
    assert list(tmp_path.glob("killed*")) == []


def test_export_rejects_bad_input(sharp_dir, tmp_path):
    with pytest.raises(UserError, match="not a GGUF format"):
        export_gguf(sharp_dir, tmp_path / "x.gguf", "onnx-int4")
    with pytest.raises(UserError, match="config.json"):
        export_gguf(tmp_path, tmp_path / "x.gguf", "gguf-q8_0")
    with pytest.raises(UserError, match="safetensors"):
        shutil.copy(sharp_dir / "config.json", tmp_path / "config.json")
        export_gguf(tmp_path, tmp_path / "x.gguf", "gguf-q8_0")
