"""ONNX INT4/INT8 export through onnxruntime-genai's model builder, plus a reader for its weights.

The builder writes a decoder with a KV cache (past_key_values.N.* in, present.N.* out), with
every linear as MatMulNBits, and genai_config.json + tokenizer files beside it. Two gaps are
closed after it runs so that *every* matrix is quantized with the one MLAS rule that
edgedistill.distill.qat_onnx mirrors:

- INT8: ORT's quantizer only quantizes Gather to 4 bits, so the token embedding would stay a
  float32 copy. A tied model instead reads the lm_head's int8 matrix through GatherBlockQuantized
  (bits=8), exactly as the builder does for INT4; an untied one gets its own int8 matrix.
- Untied INT4: ORT quantizes a lone Gather with a numpy path (round half to even, x / s) that
  differs from MLAS in the last code now and then, so the builder is told to leave it and it is
  quantized here with MLAS.

A tensor group given more bits than the format (group_bits, e.g. {"embed": 8}) is re-quantized
afterwards, with the same MLAS rule, from the student's float weights: see `_requantize_groups`.

edgedistill_onnx.json in the folder records the format and the settings (accuracy_level and
group_bits included).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgedistill.errors import UserError
from edgedistill.export import load_float_weights
from edgedistill.formats import TENSOR_GROUPS, tensor_format, tensor_group

BITS = {"onnx-int4": 4, "onnx-int8": 8}
INFO_FILE = "edgedistill_onnx.json"
MODEL_FILE = "model.onnx"
EMBED_GATHER = "/model/embed_tokens/Gather"

# 4 = MatMulNBits quantizes the activations to int8 per block and multiplies int8 x int8, the
# builder's own CPU default. Measured on a SmolLM2-135M-shaped model, 2 threads, 128-token prompt:
# decode 74 vs 28 tok/s (int4) and 31 vs 1.7 tok/s (int8: no fp32 kernel, it dequantizes B on each
# call) against level 1, prefill ~1.6x faster. The price is activation rounding that QAT does not
# model: mean KL to the fake-quant model ~4e-5 there (1e-13 with level 1); top-1 95-98% on its
# near-flat random logits. Verify compares weights exactly either way (dequantize_onnx_weights).
ACCURACY_LEVEL = 4
ACCURACY_LEVEL_WHY = {
    0: "unset: the kernel's float32 compute",
    1: "float32 activations: computes what the fake-quant model computes, slowest",
    2: "float16 activations",
    3: "bfloat16 activations",
    4: "int8 activations (per-block dynamic quantization of A): fastest CPU kernels, not modelled by QAT",
}


def export_onnx(student_dir: Path, out_dir: Path, fmt: str, *, block_size: int = 32,
                fake_quant_state: dict | None = None, accuracy_level: int = ACCURACY_LEVEL,
                group_bits: dict | None = None) -> None:
    """Build the `fmt` ("onnx-int4" | "onnx-int8") folder for the HF Llama folder student_dir.

    `group_bits`: wider formats per tensor group (e.g. {"embed": 8}: the embedding and lm_head as
    8-bit blocks in an INT4 folder), see edgedistill.formats.tensor_format.
    """
    if fmt not in BITS:
        raise UserError(f"not an ONNX format: {fmt!r}; known: {', '.join(BITS)}")
    if fake_quant_state is not None:
        raise NotImplementedError("fake_quant_state is not supported yet")
    if accuracy_level not in ACCURACY_LEVEL_WHY:
        raise UserError(f"accuracy_level must be one of {sorted(ACCURACY_LEVEL_WHY)}, got {accuracy_level}")
    student_dir, out_dir = Path(student_dir), Path(out_dir)
    cfg = json.loads((student_dir / "config.json").read_text())
    _check_blockable(cfg, block_size)
    bits, tied = BITS[fmt], bool(cfg.get("tie_word_embeddings", False))
    bits_by_group = {g: BITS[tensor_format(fmt, g, group_bits)] for g in TENSOR_GROUPS}

    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _run_builder(student_dir, partial, bits, block_size, accuracy_level, tied)
        _quantize_embedding(partial / MODEL_FILE, bits, block_size, tied)
        if any(b != bits for b in bits_by_group.values()):
            _requantize_groups(partial, student_dir, bits_by_group, block_size, tied)
        info = {
            "format": fmt, "bits": bits, "block_size": block_size, "symmetric": True,
            "accuracy_level": accuracy_level, "accuracy_level_means": ACCURACY_LEVEL_WHY[accuracy_level],
            "tied_embeddings": tied, "quantized": "every decoder linear, the token embedding and the lm_head",
            "group_bits": group_bits or {}, "bits_by_group": bits_by_group,
            "builder": _versions(),
        }
        (partial / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _replace_dir(partial, out_dir)


def _check_blockable(cfg: dict, block_size: int) -> None:
    # Every quantized matrix is blocked along its input dim; a ragged last block would need padding
    # that GatherBlockQuantized here does not handle, and GGUF rejects it anyway.
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    dims = {"hidden_size": cfg["hidden_size"], "intermediate_size": cfg["intermediate_size"],
            "attention width": head_dim * cfg["num_attention_heads"]}
    bad = {k: v for k, v in dims.items() if v % block_size}
    if bad:
        raise UserError(f"ONNX export with block_size {block_size} needs multiples of it; got {bad}")


def _run_builder(student_dir: Path, out: Path, bits: int, block_size: int, accuracy_level: int,
                 tied: bool) -> None:
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    opts = {
        "block_size": block_size, "accuracy_level": accuracy_level, "is_symmetric": "true",
        "algo_config": "default",  # the MLAS round-to-nearest rule that qat_onnx mirrors
        "op_types_to_quantize": "MatMul/Gather", "shared_embeddings": str(tied).lower(),
    }
    if not tied:
        opts["nodes_to_exclude"] = EMBED_GATHER  # quantized by _quantize_embedding instead
    precision = f"int{bits}"
    with tempfile.TemporaryDirectory(prefix="edgedistill-ortgenai-") as cache, _quiet():
        kv = parse_extra_options(None, str(student_dir), str(out), precision, "cpu", cache,
                                 [f"{k}={v}" for k, v in opts.items()])
        create_model(None, str(student_dir), str(out), precision, "cpu", cache, **kv)


@contextlib.contextmanager
def _quiet():
    """Silence the builder (prints, tqdm, logging, native code) unless it fails; then replay it."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            # Python-level streams too: pytest and others swap sys.stdout for a non-fd object.
            with contextlib.redirect_stdout(sys.__stdout__), contextlib.redirect_stderr(sys.__stderr__):
                yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.__stdout__.flush()
            sys.__stderr__.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            if failed:
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace")[-20000:])


def _quantize_embedding(model_path: Path, bits: int, block_size: int, tied: bool) -> None:
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(model_path)
    graph = model.graph
    gather = next((n for n in graph.node if n.name == EMBED_GATHER and n.op_type == "Gather"), None)
    if gather is None:
        return  # the builder already wrote GatherBlockQuantized (tied INT4)
    inits = {t.name: t for t in graph.initializer}
    emb_name = gather.input[0]
    vocab, hidden = inits[emb_name].dims
    new_nodes = []
    if tied:
        lm_head = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/"))
        qname, sname = lm_head.input[1], lm_head.input[2]
        flat, shape = f"{qname}/flat", f"{qname}/flat_shape"
        graph.initializer.append(numpy_helper.from_array(np.array([vocab, hidden * bits // 8], np.int64), shape))
        new_nodes.append(helper.make_node("Reshape", [qname, shape], [flat], name="/model/embed_tokens/Reshape"))
    else:
        emb = numpy_helper.to_array(inits[emb_name]).astype(np.float32)
        packed, scales = mlas_quantize(emb, bits, block_size)
        flat, sname = f"{emb_name}_Q{bits}", f"{emb_name}_scales"
        graph.initializer.extend([numpy_helper.from_array(packed.reshape(vocab, -1), flat),
                                  numpy_helper.from_array(scales, sname)])
    new_nodes.append(helper.make_node(
        "GatherBlockQuantized", [flat, gather.input[1], sname], list(gather.output),
        name="/model/embed_tokens/GatherBlockQuantized", domain="com.microsoft",
        bits=bits, block_size=block_size, gather_axis=0, quantize_axis=1))
    # Same position as the Gather it replaces, which keeps the node list topologically sorted.
    nodes = [m for n in graph.node for m in (new_nodes if n is gather else [n])]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.remove(inits[emb_name])
    _save(model, model_path)


def _save(model, model_path: Path) -> None:
    import onnx

    data = model_path.with_name(model_path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save(model, model_path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=data.name, size_threshold=1024)
    shutil.copymode(model_path, data)  # onnx creates it owner-only; match the builder's files


def _requantize_groups(folder: Path, student_dir: Path, bits_by_group: dict[str, int], block_size: int,
                       tied: bool) -> None:
    """Re-quantize, from the student's float weights, every matrix whose group wants other bits.

    MLAS quantizes each row of an [out, in] matrix on its own, so a fused qkv_proj (q, k, v stacked
    along out) re-quantized from its stacked float parts holds exactly each part's own codes: every
    group, fused or not, is the fake-quant of its HF tensors. A tied embedding reads the lm_head's
    codes and scales through a Reshape, so only that Reshape's target shape changes for it.
    """
    import onnx
    from onnx import numpy_helper

    model_path = folder / MODEL_FILE
    model = onnx.load(model_path)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    reshapes = {n.output[0]: n for n in graph.node if n.op_type == "Reshape"}
    dims = _attention_dims(folder)
    weights = load_float_weights(student_dir)
    if tied:
        weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])

    def put(name: str, array: np.ndarray) -> None:
        if name in inits:
            inits[name].CopyFrom(numpy_helper.from_array(array, name))
        else:
            inits[name] = numpy_helper.from_array(array, name)
            graph.initializer.append(inits[name])

    for node in graph.node:
        a = _attrs(node)
        if node.op_type == "MatMulNBits":
            rows = _hf_rows(node.name, a["N"], dims)
            if rows is None:
                raise ValueError(f"{node.name}: cannot tell which HF weights (and tensor group) it holds")
            bits = bits_by_group[tensor_group(rows[0][0])]
            if bits != a["bits"]:
                w = np.concatenate([weights[name] for name, _ in rows])
                packed, scales = mlas_quantize(w, bits, block_size)
                put(node.input[1], packed)
                put(node.input[2], scales.reshape(inits[node.input[2]].dims))
                _set_bits(node, bits)
        elif node.op_type == "GatherBlockQuantized":
            bits = bits_by_group["embed"]
            if bits == a["bits"]:
                continue
            reshape = reshapes.get(node.input[0])
            if reshape is not None:  # tied: the codes are the lm_head's, re-quantized above or below
                vocab, hidden = weights["model.embed_tokens.weight"].shape
                reshape.input[1] = f"{reshape.input[0]}/flat_shape"
                put(reshape.input[1], np.array([vocab, hidden * bits // 8], np.int64))
            else:
                packed, scales = mlas_quantize(weights["model.embed_tokens.weight"], bits, block_size)
                put(node.input[0], packed.reshape(packed.shape[0], -1))
                put(node.input[2], scales)
            _set_bits(node, bits)
    _save(model, model_path)


def _set_bits(node, bits: int) -> None:
    next(a for a in node.attribute if a.name == "bits").i = bits


def mlas_quantize(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """ORT's own blockwise quantizer on a [out, in] matrix: codes [out, blocks, bytes] and scales."""
    from onnxruntime.capi import _pybind_state as ort_c

    rows, cols = w.shape
    k_blocks = -(-cols // block_size)
    packed = np.zeros((rows, k_blocks, block_size * bits // 8), np.uint8)
    scales = np.zeros((rows, k_blocks), np.float32)
    zero_points = np.zeros((rows, k_blocks), np.uint8)  # unused: symmetric
    quantize = ort_c.quantize_matmul_8bits if bits == 8 else ort_c.quantize_matmul_4bits
    quantize(packed, np.ascontiguousarray(w.T, np.float32), scales, zero_points, block_size, rows, cols, True)
    return packed, scales


def _replace_dir(src: Path, dst: Path) -> None:
    # os.replace cannot overwrite a non-empty directory: move the old one aside first.
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def _versions() -> dict:
    import onnxruntime
    import onnxruntime_genai

    return {"onnxruntime_genai": onnxruntime_genai.__version__, "onnxruntime": onnxruntime.__version__}


def read_info(folder: Path) -> dict:
    """The settings edgedistill_onnx.json records for an exported folder ({} if absent)."""
    path = Path(folder) / INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


# ---- reading the artifact back -------------------------------------------------------------------

def dequantize_onnx_weights(out_dir: Path) -> dict[str, np.ndarray]:
    """Every quantized matrix of an exported folder, dequantized to float32 [out, in], by HF name.

    MatMulNBits weights map to their HF linears (a fused qkv_proj is split back into q/k/v); the
    GatherBlockQuantized table is model.embed_tokens.weight; a tied lm_head, being that same
    matrix, is not repeated. A node that cannot be named keeps its ONNX initializer name.
    """
    import onnx
    from onnx import numpy_helper

    out_dir = Path(out_dir)
    model = onnx.load(out_dir / MODEL_FILE)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    reshaped = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Reshape"}

    def arr(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name])

    dims = _attention_dims(out_dir)

    result: dict[str, np.ndarray] = {}
    embed_source = None
    for node in graph.node:
        if node.op_type != "GatherBlockQuantized":
            continue
        a = _attrs(node)
        if a.get("quantize_axis", 1) != 1 or a.get("gather_axis", 0) != 0:
            raise ValueError(f"unexpected GatherBlockQuantized layout in {node.name}")
        embed_source = reshaped.get(node.input[0], node.input[0])
        if inits[embed_source].data_type != onnx.TensorProto.UINT8:
            # INT4/UINT4-typed tables (ORT's own Gather quantizer) have other zero-point defaults
            raise ValueError(f"{embed_source}: expected packed uint8 codes")
        q = arr(embed_source).reshape(-1)
        vocab = arr(node.input[2]).shape[0]
        zp = arr(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        result["model.embed_tokens.weight"] = _dequant(q, arr(node.input[2]), zp, a["bits"], a["block_size"], vocab)

    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = _attrs(node)
        if node.input[1] == embed_source:
            continue  # tied lm_head: already returned as the embedding
        zp = arr(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        w = _dequant(arr(node.input[1]).reshape(-1), arr(node.input[2]), zp, a["bits"], a["block_size"], a["N"])
        w = w[:, : a["K"]]
        result.update(_hf_names(node.name, node.input[1], w, dims))
    return result


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _dequant(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
             block_size: int, rows: int) -> np.ndarray:
    """(code - zp) * scale for row-major codes [rows, blocks * block_size], low nibble first."""
    if bits == 4:
        codes = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(-1)
    q = codes.reshape(rows, -1, block_size).astype(np.float32)
    scales = scales.reshape(rows, -1, 1).astype(np.float32)
    if zero_points is None:
        zp = np.float32(1 << (bits - 1))
    else:
        zp = zero_points.reshape(rows, -1)
        if bits == 4:
            zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(rows, -1)
        zp = zp[:, : q.shape[1], None].astype(np.float32)
    return ((q - zp) * scales).reshape(rows, -1)


def _attention_dims(out_dir: Path) -> dict:
    dec = json.loads((out_dir / "genai_config.json").read_text())["model"]["decoder"]
    return {"q": dec["num_attention_heads"] * dec["head_size"], "kv": dec["num_key_value_heads"] * dec["head_size"]}


def _hf_rows(node_name: str, rows: int, dims: dict) -> list[tuple[str, int]] | None:
    """The HF weights a builder MatMulNBits node holds, stacked along its N rows: (name, rows) each.

    Builder node names look like /model/layers.3/attn/qkv_proj/MatMul_Q4 and /lm_head/MatMul_Q8.
    None for a node that cannot be named.
    """
    parts = node_name.strip("/").split("/")
    if parts[0] == "lm_head":
        return [("lm_head.weight", rows)]
    if len(parts) >= 4 and parts[0] == "model" and parts[1].startswith("layers."):
        prefix = f"model.{parts[1]}"
        block, proj = parts[2], parts[3]
        if block == "attn" and proj == "qkv_proj":
            q, kv = dims["q"], dims["kv"]
            return [(f"{prefix}.self_attn.{p}_proj.weight", n) for p, n in (("q", q), ("k", kv), ("v", kv))]
        if block == "attn":
            return [(f"{prefix}.self_attn.{proj}.weight", rows)]
        if block == "mlp" and proj == "gate_up_proj":
            return [(f"{prefix}.mlp.gate_proj.weight", rows // 2), (f"{prefix}.mlp.up_proj.weight", rows // 2)]
        if block == "mlp":
            return [(f"{prefix}.mlp.{proj}.weight", rows)]
    return None


def _hf_names(node_name: str, init_name: str, w: np.ndarray, dims: dict) -> dict[str, np.ndarray]:
    rows = _hf_rows(node_name, w.shape[0], dims)
    if rows is None:
        return {init_name: w}
    ends = np.cumsum([n for _, n in rows])
    return {name: part for (name, _), part in zip(rows, np.split(w, ends[:-1]))}
