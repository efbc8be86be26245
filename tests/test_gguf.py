"""GGUF fake-quant, export and the llama.cpp runner, checked against gguf-py, llama.cpp and transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import make_tiny_llama, smollm2_gguf_path

import edgedistill.export.gguf as export_mod
from edgedistill.distill.qat_gguf import FAKE_QUANT, fake_quant_q4_0, fake_quant_q8_0
from edgedistill.errors import UserError
from edgedistill.export.gguf import dequantize_gguf_tensors, export_gguf
from edgedistill.runtime import load_runner
from edgedistill.runtime.llamacpp import LlamaCppRunner

FORMATS = ["gguf-q4_0", "gguf-q8_0"]
QTYPE = {"gguf-q4_0": gguf.GGMLQuantizationType.Q4_0, "gguf-q8_0": gguf.GGMLQuantizationType.Q8_0}

# Bounds for llama.cpp against the fake-quant PyTorch model. llama.cpp also rounds activations to
# 8 bits inside its quantized dot products and keeps the KV cache in fp16, so it is not exact.
# Measured on the sharp tiny model below (64 positions): top-1 0.95-0.97, KL 0.8e-3 to 1.6e-3.
# An export with the q/k rows left in HF order measures top-1 ~0.18, KL ~1.5; the unquantized model
# against a Q4_0 export measures top-1 ~0.42, KL ~0.39.
MIN_TOP1 = 0.9
MAX_KL = 5e-3


def reference(x: np.ndarray, fmt: str) -> np.ndarray:
    return gguf.quants.dequantize(gguf.quants.quantize(x, QTYPE[fmt]), QTYPE[fmt])


def parity(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement and mean KL(ref || got) over positions."""
    p = torch.log_softmax(torch.as_tensor(ref, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.as_tensor(got, dtype=torch.float64), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    return float((ref.argmax(-1) == got.argmax(-1)).mean()), kl


# --- fake-quant -------------------------------------------------------------------------------


def awkward_weights(seed: int = 0) -> np.ndarray:
    """Random rows at many scales, plus blocks that stress ties, zeros and rounding halves."""
    rng = np.random.default_rng(seed)
    scales = np.logspace(-7, 2, 64, dtype=np.float32)[:, None]
    x = (rng.standard_normal((64, 256)) * scales).astype(np.float32)
    x[0, :32] = 0  # zero block: scale 0
    x[1, :32] = 0.5  # every element ties for the maximum
    x[2, :32] = rng.integers(-4, 5, 32) * 0.01  # ties between +max and -max
    x[3, :32] = np.arange(-16, 16) / 2 * 127 / 16  # codes land on exact halves before Q8_0 rounding
    x[4, :32] = np.linspace(-1, 1, 32)
    return x


@pytest.mark.parametrize("fmt", FORMATS)
def test_fake_quant_equals_gguf_reference_bit_for_bit(fmt):
    for seed in range(3):
        x = awkward_weights(seed)
        got = FAKE_QUANT[fmt](torch.from_numpy(x)).numpy()
        np.testing.assert_array_equal(got, reference(x, fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_fake_quant_gradient_is_straight_through(fmt):
    w = torch.randn(8, 64, requires_grad=True)
    g = torch.randn(8, 64)
    out = FAKE_QUANT[fmt](w)
    (out * g).sum().backward()
    assert torch.equal(w.grad, g)
    assert not torch.equal(out.detach(), w.detach())  # it did quantize
    np.testing.assert_array_equal(out.detach().numpy(), reference(w.detach().numpy(), fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_fake_quant_is_idempotent(fmt):
    # a student saved with already-quantized weights exports to the same values
    w = torch.from_numpy(awkward_weights(7))
    once = FAKE_QUANT[fmt](w)
    assert torch.equal(FAKE_QUANT[fmt](once), once)


def test_fake_quant_rejects_shapes_without_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        fake_quant_q4_0(torch.zeros(4, 48))
    with pytest.raises(ValueError, match="2-D"):
        fake_quant_q8_0(torch.zeros(64))


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


def hf_logits(model_dir: Path, ids, fmt: str | None = None, **kw) -> np.ndarray:
    """Logits of the HF model; with `fmt`, every 2-D weight (embedding and linears) fake-quantized."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        if fmt is not None:
            for p in model.parameters():
                if p.dim() == 2:
                    p.copy_(FAKE_QUANT[fmt](p))
        return model(torch.tensor([list(ids)])).logits[0].numpy()


def runtime_logits(path: Path, ids) -> np.ndarray:
    runner = LlamaCppRunner(path, n_ctx=256)
    try:
        return runner.logits(ids)
    finally:
        runner.close()


IDS = np.random.default_rng(0).integers(0, 49152, 64).tolist()


@pytest.mark.parametrize("fmt", FORMATS)
def test_llamacpp_logits_match_fake_quant_model(fmt, sharp_dir, exported):
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
def test_dequantized_weights_equal_fake_quant(fmt, sharp_dir, exported):
    from safetensors.torch import load_file

    weights = load_file(sharp_dir / "model.safetensors")
    deq = exported(fmt).weights
    assert set(deq) == set(weights) - {"lm_head.weight"}  # tied: llama.cpp reuses token_embd
    for name, w in weights.items():
        if name in deq:
            want = FAKE_QUANT[fmt](w).numpy() if w.dim() == 2 else w.numpy()
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


def test_transformers_reads_the_export(sharp_dir, exported):
    # transformers dequantizes GGUF exactly, so its logits are the fake-quant model's; one format
    # suffices (loading is slow, and names and q/k order are shared by both)
    path = exported("gguf-q4_0").path
    got = hf_logits(path.parent, IDS, gguf_file=path.name)
    want = hf_logits(sharp_dir, IDS, "gguf-q4_0")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)  # measured: identical


def test_untied_model_writes_a_quantized_output(tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = sharpen(make_tiny_llama(tmp_path / "hf", tokenizer_dir, tied=False, seed=3), tmp_path / "sharp")
    path = tmp_path / "untied.gguf"
    export_gguf(model_dir, path, "gguf-q4_0")
    deq = dequantize_gguf_tensors(path)
    lm_head = AutoModelForCausalLM.from_pretrained(model_dir).lm_head.weight.detach()
    np.testing.assert_array_equal(deq["lm_head.weight"], fake_quant_q4_0(lm_head).numpy())
    top1, kl = parity(hf_logits(model_dir, IDS, "gguf-q4_0"), runtime_logits(path, IDS))
    assert top1 >= MIN_TOP1 and kl <= MAX_KL, (top1, kl)


@pytest.mark.parametrize("tied", [True, False])
def test_embed_group_at_8_bits_in_a_q4_0_file(tied, sharp_dir, tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from edgedistill.distill.qat import fake_quant_model_copy

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

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    reference = fake_quant_model_copy(model, "gguf-q4_0", {"embed": 8})
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
    with torch.no_grad():
        ref_logits = reference(torch.tensor([IDS])).logits[0].numpy()
    top1, kl = parity(ref_logits, got)
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
