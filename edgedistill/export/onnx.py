"""ONNX INT4/INT8 export through onnxruntime-genai's model builder, plus a reader for its weights.

The builder writes a decoder with a KV cache (past_key_values.N.* in, present.N.* out), every
linear as MatMulNBits, and genai_config.json + tokenizer files beside it. Only its graph is kept:
afterwards *every* quantized initializer is rewritten from `quantized.quantize_named` on the
student's float weights (with the LSQ scale the student folder holds for the tensor, if any), so
the folder stores the very codes, scales and zero points that QAT trained against and verify
checks (edgedistill.distill.quantized). Each tensor's scheme: its own format (after group_bits),
`block_size` (PER_CHANNEL for INT8 tensors with int8_per_channel) and `symmetric`.

- MatMulNBits: B [N, blocks, block * bits / 8] (low nibble first), scales [N, blocks], and for an
  asymmetric scheme zero_points [N, ceil(blocks * bits / 8)]; bits and block_size attributes per
  node. A fused node (qkv_proj, gate_up_proj) stacks its HF matrices' rows: each row is quantized
  on its own, so the stack holds each part's own codes.
- The token embedding is GatherBlockQuantized. Tied: it reads the lm_head's codes, scales and zero
  points (one matrix) through a Reshape; untied: a table of its own. The builder leaves INT8 (ORT
  quantizes Gather to 4 bits only) and untied embeddings as float Gather: they are replaced here.
  Where the block does not divide hidden (e.g. per channel), the padded columns are sliced off.

edgedistill_onnx.json in the folder records the format and the settings (block size, symmetric,
per channel, accuracy_level, group_bits, each group's scheme).
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
import torch

from edgedistill import atomic
from edgedistill.distill.quantized import (
    SCALES_FILE,
    QuantizedWeight,
    QuantSpec,
    Scheme,
    load_learned_scales,
    quantize_named,
)
from edgedistill.errors import UserError
from edgedistill.export import load_float_weights
from edgedistill.formats import TENSOR_GROUPS, tensor_group

BITS = {"onnx-int4": 4, "onnx-int8": 8}
INFO_FILE = "edgedistill_onnx.json"
MODEL_FILE = "model.onnx"
HF_CONFIG_FILES = ("config.json", "generation_config.json")  # copied from the student, for HF-style loaders
EMBED_PREFIX = "/model/embed_tokens/"
EMBED_GATHER = EMBED_PREFIX + "Gather"
EMBED_NAME, LM_HEAD_NAME = "model.embed_tokens.weight", "lm_head.weight"
# The builder's own codes are all replaced, so its block size only has to be one MLAS quantizes.
BUILDER_BLOCK = 32

# 4 = MatMulNBits quantizes the activations to int8 per block and multiplies int8 x int8, the
# builder's own CPU default. Measured on a SmolLM2-135M-shaped model, 2 threads, 128-token prompt:
# decode 74 vs 28 tok/s (int4) and 31 vs 1.7 tok/s (int8: no fp32 kernel, it dequantizes B on each
# call) against level 1, prefill ~1.6x faster. The price is activation rounding: mean KL to the
# weights-only fake-quant model ~4e-5 there (1e-13 with level 1). Verify compares weights exactly
# either way (dequantize_onnx_weights).
ACCURACY_LEVEL = 4
ACCURACY_LEVEL_WHY = {
    0: "unset: the kernel's float32 compute",
    1: "float32 activations: computes what the weights-only fake-quant model computes, slowest",
    2: "float16 activations",
    3: "bfloat16 activations",
    4: "int8 activations (per-block dynamic quantization of A): fastest CPU kernels",
}


def export_onnx(student_dir: Path, out_dir: Path, fmt: str, *, block_size: int = 32, symmetric: bool = True,
                int8_per_channel: bool = False, accuracy_level: int = ACCURACY_LEVEL,
                group_bits: dict | None = None) -> None:
    """Build the `fmt` ("onnx-int4" | "onnx-int8") folder for the HF Llama folder student_dir.

    block_size: weights per scale along the input dim (a power of two >= 16; PER_CHANNEL = 0 for
    one scale per output row). symmetric=False stores a zero point per block. int8_per_channel:
    the INT8 tensors (all of onnx-int8, or groups widened to 8 bits) get one scale per row.
    `group_bits`: wider formats per tensor group (e.g. {"embed": 8}: the embedding and lm_head as
    8-bit blocks in an INT4 folder), see edgedistill.formats.tensor_format.
    """
    if fmt not in BITS:
        raise UserError(f"not an ONNX format: {fmt!r}; known: {', '.join(BITS)}")
    if accuracy_level not in ACCURACY_LEVEL_WHY:
        raise UserError(f"accuracy_level must be one of {sorted(ACCURACY_LEVEL_WHY)}, got {accuracy_level}")
    schemes = group_schemes(fmt, block_size, symmetric, int8_per_channel, group_bits)
    student_dir, out_dir = Path(student_dir), Path(out_dir)
    cfg = json.loads((student_dir / "config.json").read_text())
    bits, tied = BITS[fmt], bool(cfg.get("tie_word_embeddings", False))

    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _run_builder(student_dir, partial, bits, accuracy_level, tied)
        _write_quantized(partial, student_dir, schemes, tied)
        # The builder writes no config.json; optimum's ORTModelForCausalLM reads the model type and
        # the KV-cache shape from it (and the generation defaults from generation_config.json).
        for name in HF_CONFIG_FILES:
            if (student_dir / name).is_file():
                shutil.copyfile(student_dir / name, partial / name)
        info = {
            "format": fmt, "bits": bits, "block_size": block_size, "symmetric": symmetric,
            "int8_per_channel": int8_per_channel,
            "accuracy_level": accuracy_level, "accuracy_level_means": ACCURACY_LEVEL_WHY[accuracy_level],
            "tied_embeddings": tied, "quantized": "every decoder linear, the token embedding and the lm_head",
            "group_bits": group_bits or {}, "bits_by_group": {g: BITS[s.fmt] for g, s in schemes.items()},
            "scheme_by_group": {g: {"format": s.fmt, "block_size": s.block_size, "symmetric": s.symmetric}
                                for g, s in schemes.items()},
            "learned_scales": (student_dir / SCALES_FILE).is_file(),
            "builder": _versions(),
        }
        (partial / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    atomic.replace_dir(partial, out_dir)


def group_schemes(fmt: str, block_size: int, symmetric: bool, int8_per_channel: bool,
                  group_bits: dict | None) -> dict[str, Scheme]:
    """The storage scheme of each tensor group; raises UserError for a setting the runtime lacks."""
    from edgedistill.distill.qat_onnx import block_for

    block_for(block_size, 1)  # rejects a block size MatMulNBits cannot take
    spec = QuantSpec(fmt, group_bits, block_size=block_size, symmetric=symmetric, int8_per_channel=int8_per_channel)
    out = {group: spec.group_scheme(group) for group in TENSOR_GROUPS}
    for group, scheme in out.items():
        if scheme.fmt not in BITS:
            raise UserError(f"tensor group {group!r}: {scheme.fmt} is not an ONNX format")
    return out


def _run_builder(student_dir: Path, out: Path, bits: int, accuracy_level: int, tied: bool) -> None:
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    opts = {
        "block_size": BUILDER_BLOCK, "accuracy_level": accuracy_level, "is_symmetric": "true",
        "algo_config": "default", "op_types_to_quantize": "MatMul/Gather", "shared_embeddings": str(tied).lower(),
    }
    if not tied:
        opts["nodes_to_exclude"] = EMBED_GATHER  # replaced by _write_embedding, no use quantizing it
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


def _save(model, model_path: Path) -> None:
    import onnx

    data = model_path.with_name(model_path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save(model, model_path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=data.name, size_threshold=1024)
    shutil.copymode(model_path, data)  # onnx creates it owner-only; match the builder's files


# ---- writing the quantized tensors ---------------------------------------------------------------

def _write_quantized(folder: Path, student_dir: Path, schemes: dict[str, Scheme], tied: bool) -> None:
    """Replace every quantized initializer of the builder's graph with `quantize_named`'s."""
    import onnx

    model_path = folder / MODEL_FILE
    model = onnx.load(model_path)
    graph = model.graph
    # torch tensors: quantize() works on them
    weights = {k: torch.from_numpy(v) for k, v in load_float_weights(student_dir).items()}
    learned = load_learned_scales(student_dir)
    if tied and LM_HEAD_NAME in learned:  # one matrix, known by the embedding's name
        learned.setdefault(EMBED_NAME, learned.pop(LM_HEAD_NAME))
    dims = _attention_dims(folder)
    lm_head = None
    for node in [n for n in graph.node if n.op_type == "MatMulNBits"]:
        rows = _hf_rows(node.name, _attrs(node)["N"], dims)
        if rows is None:
            raise ValueError(f"{node.name}: cannot tell which HF weights (and tensor group) it holds")
        names = [EMBED_NAME if tied and name == LM_HEAD_NAME else name for name, _ in rows]
        scheme = schemes[tensor_group(names[0])]
        q = _stack([quantize_named(name, weights[name], scheme, learned) for name in names])
        _set_matmul(graph, node, q, scheme)
        if names == [EMBED_NAME]:
            lm_head = node
    embed = quantize_named(EMBED_NAME, weights[EMBED_NAME], schemes["embed"], learned) if not tied else None
    _write_embedding(graph, lm_head if tied else None, embed, schemes["embed"])
    _drop_unused_initializers(graph)
    _save(model, model_path)


def _stack(parts: list[QuantizedWeight]) -> QuantizedWeight:
    if len(parts) == 1:
        return parts[0]
    return QuantizedWeight(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                           torch.cat([p.zero_point for p in parts]), parts[0].cols)


def pack(codes: torch.Tensor | np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., n] as the runtime stores them: 4 bits two per byte, low nibble first.

    An odd n gets a high nibble of 8 (what MLAS writes after a last zero point)."""
    q = np.asarray(codes, dtype=np.uint8)
    if bits == 8:
        return q
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.full(q.shape[:-1] + (1,), 8, np.uint8)], axis=-1)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The first n codes of each row [..., bytes] of `pack`'s layout."""
    if bits == 4:
        packed = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return packed[..., :n]


def _put(graph, name: str, array: np.ndarray) -> None:
    from onnx import numpy_helper

    tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
    for t in graph.initializer:
        if t.name == name:
            t.CopyFrom(tensor)
            return
    graph.initializer.append(tensor)


def _set_attr(node, name: str, value: int) -> None:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            a.i = value
            return
    node.attribute.append(helper.make_attribute(name, value))


def _set_input(node, index: int, name: str) -> None:
    """Input `index` of node set to name ("" = absent), trailing absent inputs dropped."""
    inputs = list(node.input) + [""] * (index + 1 - len(node.input))
    inputs[index] = name
    while inputs and not inputs[-1]:
        inputs.pop()
    del node.input[:]
    node.input.extend(inputs)


def _bits(scheme: Scheme) -> int:
    return BITS[scheme.fmt]


def _set_matmul(graph, node, q: QuantizedWeight, scheme: Scheme) -> None:
    a, bits = _attrs(node), _bits(scheme)
    if q.cols != a["K"] or q.codes.shape[0] != a["N"]:
        raise ValueError(f"{node.name}: quantized {tuple(q.codes.shape)} for K={a['K']}, N={a['N']}")
    _put(graph, node.input[1], pack(q.codes, bits))
    _put(graph, node.input[2], q.scale.numpy())
    zp_name = ""
    if not scheme.symmetric:
        zp_name = f"{node.input[1]}_zero_points"
        _put(graph, zp_name, pack(q.zero_point, bits))
    _set_input(node, 3, zp_name)
    _set_attr(node, "bits", bits)
    _set_attr(node, "block_size", q.block)


def _write_embedding(graph, lm_head, embed: QuantizedWeight | None, scheme: Scheme) -> None:
    """Replace the builder's embedding node with GatherBlockQuantized on the stored codes.

    Tied: the lm_head MatMulNBits' B [vocab, blocks, bytes] reshaped to [vocab, blocks * bytes],
    its scales and zero points (GatherBlockQuantized's layout for them is MatMulNBits'). Untied:
    `embed`'s codes in a table of its own, same layout. The table holds whole blocks; a Slice drops
    the padding columns where the block does not divide hidden.
    """
    from onnx import helper

    gather = next(n for n in graph.node if n.name.startswith(EMBED_PREFIX)
                  and n.op_type in ("Gather", "GatherBlockQuantized"))
    # the builder's tied INT4 table comes through a Reshape of the lm_head's codes
    old = [n for n in graph.node if n.op_type == "Reshape" and n.output[0] == gather.input[0]] + [gather]
    ids, out = gather.input[1], gather.output[0]
    if lm_head is not None:
        a = _attrs(lm_head)
        vocab, hidden, block, bits = a["N"], a["K"], a["block_size"], a["bits"]
        codes, scales = lm_head.input[1], lm_head.input[2]
        zps = lm_head.input[3] if len(lm_head.input) > 3 else ""
    else:
        vocab, hidden, block, bits = embed.codes.shape[0], embed.cols, embed.block, _bits(scheme)
        codes, scales = "model.embed_tokens.weight_codes", "model.embed_tokens.weight_scales"
        _put(graph, codes, pack(embed.codes, bits))
        _put(graph, scales, embed.scale.numpy())
        zps = ""
        if not scheme.symmetric:
            zps = "model.embed_tokens.weight_zero_points"
            _put(graph, zps, pack(embed.zero_point, bits))
    width = -(-hidden // block) * block
    flat, shape = f"{codes}/flat", f"{codes}/flat_shape"
    _put(graph, shape, np.array([vocab, width * bits // 8], np.int64))
    gathered = out if width == hidden else f"{EMBED_PREFIX}GatherBlockQuantized/padded"
    nodes = [
        helper.make_node("Reshape", [codes, shape], [flat], name=EMBED_PREFIX + "Reshape"),
        helper.make_node("GatherBlockQuantized", [flat, ids, scales] + ([zps] if zps else []), [gathered],
                         name=EMBED_PREFIX + "GatherBlockQuantized", domain="com.microsoft",
                         bits=bits, block_size=block, gather_axis=0, quantize_axis=1),
    ]
    if width != hidden:
        ends = f"{EMBED_PREFIX}Slice/ends"
        _put(graph, ends, np.array([hidden], np.int64))
        _put(graph, f"{EMBED_PREFIX}Slice/starts", np.array([0], np.int64))
        _put(graph, f"{EMBED_PREFIX}Slice/axes", np.array([-1], np.int64))
        nodes.append(helper.make_node("Slice", [gathered, f"{EMBED_PREFIX}Slice/starts", ends,
                                                f"{EMBED_PREFIX}Slice/axes"], [out], name=EMBED_PREFIX + "Slice"))
    # In place of the node(s) they replace, which keeps the node list topologically sorted.
    first = min(i for i, n in enumerate(graph.node) if n in old)
    kept = [n for n in graph.node if n not in old]
    del graph.node[:]
    graph.node.extend(kept[:first] + nodes + kept[first:])


def _drop_unused_initializers(graph) -> None:
    # The builder's float embedding table and its replaced codes would otherwise stay in the file.
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


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

    (code - zero point) * scale per block, with each node's own bits, block size and zero points
    (the implicit 8 / 128 where it stores none). MatMulNBits weights map to their HF linears (a
    fused qkv_proj is split back into q/k/v); the GatherBlockQuantized table is
    model.embed_tokens.weight; a tied lm_head, being that same matrix, is not repeated. A node that
    cannot be named keeps its ONNX initializer name.
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

    def zero_points(node) -> np.ndarray | None:
        return arr(node.input[3]) if len(node.input) > 3 and node.input[3] else None

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
        scales = arr(node.input[2])
        codes = arr(embed_source).reshape(scales.shape[0], -1)
        result[EMBED_NAME] = _dequant(codes, scales, zero_points(node), a["bits"], a["block_size"], dims["hidden"])

    for node in graph.node:
        if node.op_type != "MatMulNBits" or node.input[1] == embed_source:
            continue  # a tied lm_head was returned as the embedding
        a = _attrs(node)
        codes = arr(node.input[1]).reshape(a["N"], -1)
        w = _dequant(codes, arr(node.input[2]), zero_points(node), a["bits"], a["block_size"], a["K"])
        result.update(_hf_names(node.name, node.input[1], w, dims))
    return result


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _dequant(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
             block_size: int, cols: int) -> np.ndarray:
    """(code - zp) * scale in float32 [rows, cols] for packed codes [rows, bytes] and scales [rows * blocks].

    Computed as QuantizedWeight.dequantize does, so that equal stored values give equal arrays."""
    rows = codes.shape[0]
    scales = scales.reshape(rows, -1).astype(np.float32)
    blocks = scales.shape[1]
    q = unpack(codes, bits, blocks * block_size)
    if q.shape[1] < blocks * block_size:  # a table without its last block's padding
        q = np.pad(q, ((0, 0), (0, blocks * block_size - q.shape[1])))
    q = q.reshape(rows, blocks, block_size).astype(np.float32)
    if zero_points is None:
        zp = np.full((rows, blocks), 1 << (bits - 1), np.float32)
    else:
        zp = unpack(zero_points.reshape(rows, -1), bits, blocks).astype(np.float32)
    return ((q - zp[:, :, None]) * scales[:, :, None]).reshape(rows, -1)[:, :cols]


def _attention_dims(out_dir: Path) -> dict:
    dec = json.loads((out_dir / "genai_config.json").read_text())["model"]["decoder"]
    return {"q": dec["num_attention_heads"] * dec["head_size"], "kv": dec["num_key_value_heads"] * dec["head_size"],
            "hidden": dec["hidden_size"]}


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
