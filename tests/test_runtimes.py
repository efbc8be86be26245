"""The published artifacts, as they are, in the runtimes people already use.

Each test loads one artifact of the tiny CLI build (`tiny_build`, phone-4gb) through a runtime's own
public API, formats a chat with the chat template the artifact carries, generates greedily, and
compares the reply with the PyTorch reference; it also checks what the artifact carried over (chat
template, BOS/EOS/pad ids, context length, RoPE theta) as far as the runtime lets one read it.

What is compared, and why exact equality is a fair requirement:

- The reference is the published `student/` run through `fake_quant_model_copy` with the artifact's
  `quant` entry from manifest.json (and the student's learned scales): it holds exactly the weights
  the file stores. For llama.cpp (Q8_0 activation blocks in its Q4_0/Q8_0 kernels) and for
  onnxruntime's MatMulNBits at accuracy_level 4 (int8 activation blocks) the manifest's spec has
  act=True, so the reference also rounds activations as the runtime does. transformers' GGUF loader
  dequantizes the file to float and computes in float32, so its reference is the same spec with
  act=False.
- The runtime's first N reply token ids must equal the reference's greedy reply
  (`generate(do_sample=False)`) exactly. Two float computations of the same function differ in their
  last bits (accumulation order, and an int8 activation code that a last-bit difference flips), so
  where the reference itself has two tokens within TIE_NATS (verify.py's tie margin) at some step,
  the runtime may take either: the tokens are then judged tie-aware, by teacher forcing the
  reference on the runtime's own reply and requiring the runtime's token to be within TIE_NATS of
  the reference's top at every step. Without such a near-tie that check *is* exact equality, and
  `_assert_same_reply` then asserts equality itself. On the tiny build every step's top-1 margin is
  ~0.24 nats, far above the runtimes' logit error (measured: llama.cpp within ~4e-3 of the
  reference, onnxruntime-genai within 3e-5, transformers identical), so it is exact in practice.
- The tiny student, distilled 4 steps from a random teacher, is close to uniform and answers every
  prompt with newlines, so equal token ids alone say little. Each test therefore also compares the
  whole next-token distribution each reply token was picked from (and, where the runtime returns
  them, those at every prompt position) with the teacher-forced reference: tie-aware top-1
  agreement and mean KL within the build's own parity bounds (manifest.json `parity`);
  transformers' float logits must equal the reference's elementwise. It also checks the prompt
  token ids the runtime built from its own chat template against the student tokenizer's. Even so,
  this student's logits hardly depend on the context (a GGUF written with RoPE theta 100 instead of
  10000 still matches the reference to a KL of 3e-7), so what the artifact carries over is asserted
  directly (metadata, config, the ONNX rotary tables), not inferred from the reply.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import require
from edgedistill.verify import TIE_NATS, logit_agreement

N = 8  # reply tokens compared
TARGET = "phone-4gb"
MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Name three colours of the rainbow."},
]


# ---- the reference ------------------------------------------------------------------------------


class Reference:
    """The published student folder, its tokenizer, and the fake-quant copy for each artifact."""

    def __init__(self, folder: Path):
        from transformers import AutoTokenizer

        from edgedistill.distill.quantized import load_learned_scales
        from edgedistill.distill.stage import load_student

        self.folder = folder
        self.manifest = json.loads((folder / "manifest.json").read_text())
        student_dir = folder / self.manifest["student"]
        self.student = load_student(student_dir)
        self.learned = load_learned_scales(student_dir)
        self.config = json.loads((student_dir / "config.json").read_text())
        self.tok = AutoTokenizer.from_pretrained(student_dir)
        self.template = self.tok.chat_template
        self.prompt_text = self.tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
        self.prompt = self.tok(self.prompt_text, add_special_tokens=False)["input_ids"]
        self.rope_theta = float((self.config.get("rope_parameters") or self.config)["rope_theta"])
        self._models: dict = {}

    def artifact(self, file: str) -> dict:
        return next(a for a in self.manifest["artifacts"] if a["file"] == file)

    def model(self, file: str, *, act: bool | None = None) -> torch.nn.Module:
        """The student with `file`'s stored weights; act=None: the activation rounding the manifest
        records for the artifact's runtime, False: float activations."""
        from edgedistill.distill.qat import fake_quant_model_copy
        from edgedistill.distill.quantized import QuantSpec

        spec = QuantSpec.from_dict(self.artifact(file)["quant"])
        if act is not None:
            spec = replace(spec, act=act)
        if spec not in self._models:
            self._models[spec] = fake_quant_model_copy(self.student, spec, learned=self.learned).eval()
        return self._models[spec]

    def greedy(self, model: torch.nn.Module, n: int) -> list[int]:
        ids = torch.tensor([self.prompt])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 pad_token_id=self.tok.pad_token_id)
        return out[0, len(self.prompt):].tolist()


def _logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _assert_same_reply(ref: Reference, model: torch.nn.Module, got: list[int], got_logits: np.ndarray,
                       prompt_logits: np.ndarray | None = None, atol: float | None = None) -> None:
    """got: the runtime's reply tokens; got_logits [len(got), vocab]: the logits it picked each from;
    prompt_logits: the runtime's logits at the prompt positions too, if it returns them; atol: the
    logits must also equal the reference's elementwise within atol (a runtime that computes in
    float32 exactly as PyTorch does)."""
    assert len(got) == len(got_logits) > 0
    # the runtime's tokens are the argmax of the logits we hold for it (greedy, and rows aligned)
    assert got == [int(i) for i in got_logits.argmax(-1)]
    if ref.tok.eos_token_id in got:
        got = got[: got.index(ref.tok.eos_token_id) + 1]
        got_logits = got_logits[: len(got)]
    p = len(ref.prompt)
    forced = _logits(model, ref.prompt + got[:-1])  # the reference teacher-forced on the runtime's reply
    steps = forced[p - 1:]
    gap = steps.max(-1) - steps[np.arange(len(got)), got]
    assert (gap <= TIE_NATS).all(), f"reply {got}: the reference's top is ahead by {gap.round(5).tolist()} nats"
    top2 = np.sort(steps, axis=-1)[:, -2:]
    if (top2[:, 1] - top2[:, 0] > TIE_NATS).all():  # no near-tie: exact greedy equality
        assert got == ref.greedy(model, len(got))
    bound = ref.manifest["parity"]["kl"]
    agree = logit_agreement(steps, got_logits)
    assert agree["top1_agreement"] == 1.0 and agree["kl"] <= bound, agree
    if prompt_logits is not None:
        agree = logit_agreement(forced[: p - 1], prompt_logits)
        assert agree["top1_agreement"] >= ref.manifest["parity"]["top1"] and agree["kl"] <= bound, agree
    if atol is not None:
        np.testing.assert_allclose(got_logits, steps, rtol=0, atol=atol)
        if prompt_logits is not None:
            np.testing.assert_allclose(prompt_logits, forced[: p - 1], rtol=0, atol=atol)


@pytest.fixture(scope="module")
def ref(tiny_build) -> Reference:
    res, out, _ = tiny_build
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return Reference(out / TARGET)


# ---- llama.cpp (llama-cpp-python) ---------------------------------------------------------------


@pytest.mark.parametrize("file", ["model-q8_0.gguf", "model-q4_0.gguf"])
def test_llama_cpp_chat(ref, file):
    import llama_cpp

    # n_ctx=0: the context length the file declares. logits_all: llama.cpp keeps every position's
    # logits (llm.scores), which the comparison reads; it changes no computation.
    llm = llama_cpp.Llama(model_path=str(ref.folder / file), n_ctx=0, logits_all=True, verbose=False)
    try:
        meta = llm.metadata
        # carried over: chat template (create_chat_completion formats with it), special ids,
        # context length and RoPE theta
        assert llm.chat_format == "chat_template.default"  # the file's template, not a guessed one
        assert meta["tokenizer.chat_template"] == ref.template
        assert (llm.token_bos(), llm.token_eos()) == (ref.tok.bos_token_id, ref.tok.eos_token_id)
        assert int(meta["tokenizer.ggml.padding_token_id"]) == ref.tok.pad_token_id
        assert llm.tokenize(ref.tok.eos_token.encode(), add_bos=False, special=True) == [ref.tok.eos_token_id]
        context = ref.artifact(file)["context"]
        assert llm.n_ctx() == int(meta["llama.context_length"]) == context == ref.config["max_position_embeddings"]
        assert float(meta["llama.rope.freq_base"]) == ref.rope_theta

        reply = llm.create_chat_completion(MESSAGES, temperature=0.0, max_tokens=N)
        text, usage = reply["choices"][0]["message"]["content"], reply["usage"]
        # llm.input_ids: the prompt create_chat_completion tokenized from the GGUF's template, then the
        # reply tokens it fed back; the last sampled token is never fed back: it is the argmax of the
        # last row of scores (checked in _assert_same_reply against every row)
        p, n = len(ref.prompt), llm.n_tokens
        assert usage["prompt_tokens"] == p and llm.input_ids[:p].tolist() == ref.prompt
        scores = np.array(llm.scores[:n], dtype=np.float32)
        got = llm.input_ids[p:n].tolist() + [int(scores[-1].argmax())]
        assert len(got) == usage["completion_tokens"]
    finally:
        llm.close()
    _assert_same_reply(ref, ref.model(file), got, scores[p - 1:], prompt_logits=scores[: p - 1])
    eos = ref.tok.eos_token_id
    assert text == ref.tok.decode([t for t in got if t != eos])


# ---- transformers' GGUF loader (dequantized to float) -------------------------------------------


# One format: its GGUF loader parses the file's 49k-token vocabulary in Python three times (config,
# tokenizer, weights: ~15 s); Q4_0 and Q8_0 take the same path (gguf-py's dequantize).
def test_transformers_gguf(ref):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = "model-q4_0.gguf"
    tok = AutoTokenizer.from_pretrained(ref.folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(ref.folder, gguf_file=file, dtype=torch.float32).eval()
    cfg = model.config
    assert tok.chat_template == ref.template
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        ref.tok.bos_token_id, ref.tok.eos_token_id, ref.tok.pad_token_id)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (ref.tok.bos_token_id, ref.tok.eos_token_id)
    assert cfg.max_position_embeddings == ref.artifact(file)["context"]
    assert cfg.rope_parameters["rope_theta"] == ref.rope_theta
    assert cfg.rope_parameters.get("rope_type", "default") == "default"

    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert prompt == ref.prompt_text and ids == ref.prompt
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
        got = out.sequences[0, len(ids):].tolist()
        prompt_logits = model(x).logits[0, :-1].float().numpy()
    # the file's weights in float, float activations: the weights-only fake-quant student, which
    # this computes exactly (measured: identical logits), hence the elementwise check too
    _assert_same_reply(ref, ref.model(file, act=False), got, torch.cat(out.logits).float().numpy(),
                       prompt_logits=prompt_logits, atol=1e-4)


# ---- onnxruntime-genai ----------------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["onnx-int4", "onnx-int8"])
def test_onnxruntime_genai_chat(ref, folder):
    import onnx
    import onnxruntime_genai as og
    from onnx import numpy_helper

    path = ref.folder / folder
    model = og.Model(str(path))
    tok = og.Tokenizer(model)
    context = ref.artifact(folder)["context"]
    # carried over: the template (the folder's chat_template.jinja, which og renders), special ids,
    # the context length og enforces, RoPE theta baked into the graph's rotary tables
    assert (path / "chat_template.jinja").read_text() == ref.template
    prompt = tok.apply_chat_template(json.dumps(MESSAGES), add_generation_prompt=True)
    assert prompt == ref.prompt_text
    assert tok.encode(prompt).tolist() == ref.prompt
    assert (tok.bos_token_id, list(tok.eos_token_ids), tok.pad_token_id) == (
        ref.tok.bos_token_id, [ref.tok.eos_token_id], ref.tok.pad_token_id)
    params = og.GeneratorParams(model)
    with pytest.raises(Exception, match="context_length"):
        params.set_search_options(max_length=context + 1)
        og.Generator(model, params)
    graph = onnx.load(path / "model.onnx").graph
    head_dim = ref.config["head_dim"]
    inv_freq = ref.rope_theta ** -(np.arange(0, head_dim, 2) / head_dim)
    angles = np.arange(context)[:, None] * inv_freq
    tables = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name in ("cos_cache", "sin_cache")}
    np.testing.assert_allclose(tables["cos_cache"], np.cos(angles), atol=1e-3)
    np.testing.assert_allclose(tables["sin_cache"], np.sin(angles), atol=1e-3)

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ref.prompt) + N)
    gen = og.Generator(model, params)
    gen.append_tokens(tok.encode(prompt))
    got, rows = [], []
    while not gen.is_done():
        rows.append(gen.get_logits().reshape(-1).copy())  # the logits the next token is picked from
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    del gen
    _assert_same_reply(ref, ref.model(folder), got, np.stack(rows))
    assert tok.decode(got) == ref.tok.decode(got, skip_special_tokens=True)


# ---- optimum (ORTModelForCausalLM) ----------------------------------------------------------------


def test_onnx_folder_is_an_hf_style_folder(ref):
    """What optimum's ORTModelForCausalLM needs beside model.onnx: the model's config.json (type,
    KV-cache shape), tokenizer files and chat template; checked even where optimum is not installed."""
    for folder in ("onnx-int4", "onnx-int8"):
        path = ref.folder / folder
        assert json.loads((path / "config.json").read_text()) == ref.config
        assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"} <= {
            p.name for p in path.iterdir()}


OPTIMUM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-optimum" / "bin" / "python"


@pytest.mark.parametrize("folder", ["onnx-int4", "onnx-int8"])
def test_optimum_ort_model(ref, folder, tmp_path):
    # optimum-onnx 0.1.0 (the newest) requires transformers<4.58 and fails to import with transformers 5
    # (ImportError: cannot import name 'get_parameter_dtype'), so it runs in its own environment
    # (tests/optimum-env.txt; .ci/run makes it) and loads the folder as it is, as a user of optimum would.
    require(OPTIMUM_PYTHON.exists(), "optimum's environment is missing: python3 -m venv .venv-optimum && "
                                     ".venv-optimum/bin/pip install -r tests/optimum-env.txt")
    got, logits = optimum_generate(ref.folder / folder, ref.prompt, N, tmp_path / "reply.npz")
    _assert_same_reply(ref, ref.model(folder), got, logits)


def optimum_generate(folder: Path, prompt: list[int], n: int, out: Path) -> tuple[list[int], np.ndarray]:
    """Greedy reply tokens and the logits of each step from optimum's ORTModelForCausalLM."""
    import subprocess

    script = Path(__file__).with_name("optimum_generate.py")
    res = subprocess.run([str(OPTIMUM_PYTHON), str(script), str(folder), json.dumps(prompt), str(n), str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    with np.load(out) as saved:
        return saved["tokens"].tolist(), saved["logits"]
