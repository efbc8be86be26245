"""Export a Hugging Face Llama student folder as a GGUF file (Q4_0 or Q8_0) for llama.cpp.

Every 2-D weight, the token embedding included, is written as the codes and scales
`edgedistill.distill.quantized.quantize` gives for it (with the LSQ scale the student learned for it,
if any): the very values fake-quant training computed with and verify compares against. Norm
weights stay F32.

llama.cpp applies rotary embeddings to adjacent pairs (x0, x1), (x2, x3), ... of each head, while
HF Llama rotates the two halves of the head against each other. The q/k projections are therefore
written with their rows reordered per head (see `permute_qk`). Quantization blocks run along the
input dimension and the reordering moves whole rows, so it commutes with quantization; we quantize
in HF row order, where the learned scales (one row per HF output row) line up, and reorder the
packed rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import gguf
import numpy as np
import torch

from edgedistill.distill.quantized import QuantizedWeight, Scheme, load_learned_scales, quantize_named
from edgedistill.errors import UserError
from edgedistill.export import load_float_weights
from edgedistill.formats import TENSOR_GROUPS, tensor_format, tensor_group

QUANT_TYPES = {"gguf-q4_0": gguf.GGMLQuantizationType.Q4_0, "gguf-q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"gguf-q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "gguf-q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}

# llama.cpp picks its pre-tokenizer (the regex that splits text before BPE) by name. Its own
# converter identifies a tokenizer by hashing how it encodes a probe text; we key on a hash of the
# token list instead, which needs no tokenizer run and identifies the same families.
_PRE_BY_VOCAB = {
    "0e0d60eaa849a6265d6376432d4e79de04a0b21c91918017d99781f9785245d6": "smollm",  # SmolLM / SmolLM2
}


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows -> llama.cpp order: within each head, interleave the first and second halves."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_qk`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def export_gguf(student_dir: Path, out_file: Path, fmt: str, *, tokenizer_gguf: Path | None = None,
                group_bits: dict | None = None) -> None:
    """Write `student_dir` (an HF Llama folder) to `out_file` in `fmt` ("gguf-q4_0" | "gguf-q8_0").

    `group_bits`: wider formats per tensor group (e.g. {"embed": 8}: token_embd and output in Q8_0),
    see edgedistill.formats.tensor_format. The file type stays fmt's, as llama.cpp's own mixes do.

    `tokenizer_gguf`: a GGUF file whose tokenizer metadata is copied verbatim (the teacher's, when the
    teacher came as GGUF); otherwise the metadata is built from the HF tokenizer files.
    Learned scales saved in the student folder (edgedistill.distill.quantized.SCALES_FILE) are used
    for the tensors stored in the scheme they were learned for.
    """
    if fmt not in QUANT_TYPES:
        raise UserError(f"not a GGUF format: {fmt!r}; known: {', '.join(QUANT_TYPES)}")
    student_dir, out_file = Path(student_dir), Path(out_file)
    if not (student_dir / "config.json").is_file():
        raise UserError(f"{student_dir}: not a Hugging Face model folder (no config.json)")
    cfg = json.loads((student_dir / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise UserError(f"{student_dir}: GGUF export supports Llama students, got model_type {cfg.get('model_type')!r}")

    # every group's format up front: an impossible group_bits fails before any work
    formats = {g: tensor_format(fmt, g, group_bits) for g in TENSOR_GROUPS}
    weights = load_float_weights(student_dir)  # first: a missing checkpoint fails before the tokenizer work
    learned = load_learned_scales(student_dir)

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_hparams(writer, cfg, student_dir.resolve().name, fmt)
    if tokenizer_gguf is not None:
        _copy_tokenizer(writer, Path(tokenizer_gguf))
    else:
        _hf_tokenizer(writer, student_dir, cfg["vocab_size"])
    for name, data, qtype in _gguf_tensors(weights, cfg, formats, learned, student_dir):
        writer.add_tensor(name, data, raw_dtype=qtype)

    partial = out_file.with_suffix(".gguf.partial")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(partial, "rb+") as f:  # the rename below must not land before the bytes do
            os.fsync(f.fileno())
        os.replace(partial, out_file)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise


def dequantize_gguf_tensors(path: Path | gguf.GGUFReader) -> dict[str, np.ndarray]:
    """The weights of a GGUF file written by `export_gguf`, as HF-named float32 arrays in HF layout.

    A tied model has no `lm_head.weight` entry: it reuses `model.embed_tokens.weight`. Pass a
    GGUFReader already open on the file to skip parsing it again (seconds for a 49k-token vocab).
    """
    reader = path if isinstance(path, gguf.GGUFReader) else gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    n_blocks = int(reader.fields[f"{arch}.block_count"].contents())
    n_head = int(reader.fields[f"{arch}.attention.head_count"].contents())
    n_head_kv = int(reader.fields[f"{arch}.attention.head_count_kv"].contents())
    to_hf = {gguf_name: hf for hf, gguf_name in _hf_to_gguf_names(n_blocks).items()}
    out = {}
    for t in reader.tensors:
        hf = to_hf[t.name]
        # t.data has the on-disk shape in numpy order ([rows, bytes per row] when quantized)
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape([int(n) for n in reversed(t.shape)])
        if hf.endswith("self_attn.q_proj.weight") or hf.endswith("self_attn.q_proj.bias"):
            w = unpermute_qk(w, n_head)
        elif hf.endswith("self_attn.k_proj.weight") or hf.endswith("self_attn.k_proj.bias"):
            w = unpermute_qk(w, n_head_kv)
        out[hf] = np.ascontiguousarray(w)
    return out


def _hf_to_gguf_names(n_blocks: int) -> dict[str, str]:
    """HF Llama parameter names -> GGUF tensor names, through gguf-py's tensor-name map."""
    names = ["model.embed_tokens", "model.norm", "lm_head"]
    for i in range(n_blocks):
        names += [f"model.layers.{i}.{p}" for p in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    return {f"{n}{s}": f"{tmap.get_name(n)}{s}" for n in names for s in (".weight", ".bias")}


def _gguf_tensors(weights: dict[str, np.ndarray], cfg: dict, formats: dict[str, str], learned: dict,
                  student_dir: Path):
    """Yield (gguf name, data, raw dtype) for every tensor the file holds, in llama.cpp's layout.

    formats: the format of each tensor group (edgedistill.formats.tensor_group); learned: the
    student's learned scales (edgedistill.distill.quantized.load_learned_scales).
    """
    n_head = cfg["num_attention_heads"]
    n_head_kv = cfg.get("num_key_value_heads") or n_head
    names = _hf_to_gguf_names(cfg["num_hidden_layers"])
    if cfg.get("tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when output is absent
    elif "lm_head.weight" not in weights:
        raise UserError(f"{student_dir}: untied model without lm_head.weight")
    for hf, w in weights.items():
        if hf not in names:
            raise UserError(f"{student_dir}: tensor {hf!r} has no place in a llama GGUF")
        if w.ndim == 2:
            tensor_fmt = formats[tensor_group(hf)]
            if w.shape[1] % 32:
                raise UserError(f"{hf}: input dim {w.shape[1]} is not a multiple of 32, so it cannot be "
                                f"quantized to {QUANT_TYPES[tensor_fmt].name}")
            # quantized in HF row order, where a learned scale's rows line up; rows are packed
            # independently, so reordering packed rows below equals quantizing reordered weights
            q = quantize_named(hf, torch.from_numpy(w), Scheme(tensor_fmt), learned)
            data, qtype = pack_blocks(q, tensor_fmt), QUANT_TYPES[tensor_fmt]
        else:
            data, qtype = w.astype(np.float32), gguf.GGMLQuantizationType.F32
        if ".self_attn.q_proj." in hf:
            data = permute_qk(data, n_head)
        elif ".self_attn.k_proj." in hf:
            data = permute_qk(data, n_head_kv)
        yield names[hf], data, qtype


# Packed by hand rather than with gguf.quants.quantize: that computes its own scales from the float
# weights, while the file must hold the codes and scales training used (learned ones included).
# Without a learned scale the bytes are the same (tests/test_gguf.py checks it).
def pack_blocks(q: QuantizedWeight, fmt: str) -> np.ndarray:
    """A QuantizedWeight as the uint8 [rows, bytes per row] array of ggml blocks of type `fmt`.

    block_q4_0: fp16 d, then 16 bytes; byte j holds code j in its low nibble, code j + 16 in its high.
    block_q8_0: fp16 d, then 32 int8 (code - 128).
    """
    zero = {"gguf-q4_0": 8, "gguf-q8_0": 128}[fmt]
    if q.block != 32 or not bool((q.zero_point == zero).all()):
        raise ValueError(f"{fmt} stores blocks of 32 with the implicit zero point {zero}")
    codes = q.codes.cpu().numpy()
    d = q.scale.cpu().numpy().astype(np.float16)  # exact: the scale already is an fp16 value
    if fmt == "gguf-q4_0":
        body = codes[..., :16] | (codes[..., 16:] << np.uint8(4))
    else:
        body = codes ^ np.uint8(0x80)  # the byte of the int8 code - 128
    blocks = np.concatenate([d[..., None].view(np.uint8), body], axis=-1)
    return blocks.reshape(codes.shape[0], -1)


def _add_hparams(w: gguf.GGUFWriter, cfg: dict, name: str, fmt: str) -> None:
    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}  # transformers 5 | 4
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(FILE_TYPES[fmt])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or n_head)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type != "default":
        raise UserError(f"rope scaling {rope_type!r} is not supported by the GGUF exporter")
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))


def _copy_tokenizer(w: gguf.GGUFWriter, src: Path) -> None:
    """Copy tokenizer.* keys from another GGUF byte for byte (strings stay raw bytes, never re-encoded)."""
    reader = gguf.GGUFReader(src)
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise UserError(f"{src}: no tokenizer in this GGUF file")
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                val = [bytes(field.parts[i]) for i in field.data]
            else:
                val = field.contents()
            w.add_key_value(key, val, vtype, sub_type=sub)
        elif vtype == gguf.GGUFValueType.STRING:
            w.add_key_value(key, bytes(field.parts[field.data[0]]), vtype)
        else:
            w.add_key_value(key, field.contents(), vtype)


def _hf_tokenizer(w: gguf.GGUFWriter, student_dir: Path, n_vocab: int) -> None:
    """tokenizer.* keys from an HF byte-level BPE tokenizer (GPT-2 style, as SmolLM and Llama 3 use)."""
    tj_path = student_dir / "tokenizer.json"
    if not tj_path.is_file():
        raise UserError(f"{student_dir}: no tokenizer.json; pass the teacher GGUF to copy its tokenizer")
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(f"{student_dir}: only byte-level BPE tokenizers can be converted; "
                        "pass the teacher GGUF to copy its tokenizer")

    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in by_id}
    for added in tj.get("added_tokens", []):
        # as llama.cpp's converter: special added tokens are control tokens, the rest user-defined
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(by_id) >= n_vocab:
        raise UserError(f"{student_dir}: tokenizer has ids up to {max(by_id)} but the model's vocab_size is {n_vocab}")
    tokens, token_types = [], []
    for i in range(n_vocab):  # rows of the embedding no token uses still need a name
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        token_types.append(types.get(i, gguf.TokenType.UNUSED))

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer(tokens, tj.get("pre_tokenizer")))
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_add_space_prefix(False)
    special = gguf.SpecialVocab(student_dir, load_merges=True, n_vocab=n_vocab)
    # SpecialVocab writes add_bos_token only when the HF files say; absent means HF adds no BOS,
    # whereas llama.cpp's default for some pre-tokenizers is to add one
    special.add_special_token.setdefault("bos", False)
    special.add_to_gguf(w, quiet=True)


def _pre_tokenizer(tokens: list[str], hf_pre: dict | None) -> str:
    digest = hashlib.sha256(b"\0".join(t.encode("utf-8") for t in tokens)).hexdigest()
    if digest in _PRE_BY_VOCAB:
        return _PRE_BY_VOCAB[digest]
    if hf_pre and hf_pre.get("type") == "ByteLevel" and hf_pre.get("use_regex", True):
        return "gpt-2"  # a bare ByteLevel pre-tokenizer splits with exactly GPT-2's regex
    # unknown family: llama.cpp's generic BPE split; tokenization may differ from HF on edge cases
    return "default"
