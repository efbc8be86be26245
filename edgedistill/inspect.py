"""`edgedistill inspect`: what an artifact is (architecture, parameters, format, size), from its own bytes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from edgedistill.errors import UserError


def _gguf(path: Path) -> dict:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file to the user
        raise UserError(f"{path} is not a readable GGUF file: {type(e).__name__}: {str(e)[:120]}") from None

    def field(name):
        f = reader.fields.get(name)
        if f is None:
            return None
        v = f.contents()
        return v if not isinstance(v, list) or len(v) < 16 else f"[{len(v)} items]"

    arch = field("general.architecture")
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return {
        "file": str(path), "container": "gguf", "bytes": path.stat().st_size, "architecture": arch,
        "name": field("general.name"), "params": int(sum(int(t.n_elements) for t in reader.tensors)),
        "tensors": len(reader.tensors), "tensor_types": dict(types),
        "layers": field(f"{arch}.block_count"), "hidden": field(f"{arch}.embedding_length"),
        "context_length": field(f"{arch}.context_length"),
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None,
        "chat_template": "tokenizer.chat_template" in reader.fields,
    }


def _onnx(folder: Path) -> dict:
    import onnx

    models = sorted(folder.glob("*.onnx"))
    if not models:
        raise UserError(f"{folder} holds no .onnx model")
    try:
        model = onnx.load(models[0], load_external_data=False)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{models[0]} is not a readable ONNX model: {type(e).__name__}") from None
    ops = Counter(n.op_type for n in model.graph.node)
    bits = sorted({a.i for n in model.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
                   for a in n.attribute if a.name == "bits"})
    genai = folder / "genai_config.json"
    cfg = json.loads(genai.read_text())["model"] if genai.is_file() else {}
    return {
        "file": str(folder), "container": "onnx", "bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
        "architecture": cfg.get("type"), "layers": cfg.get("decoder", {}).get("num_hidden_layers"),
        "hidden": cfg.get("decoder", {}).get("hidden_size"), "context_length": cfg.get("context_length"),
        "vocab_size": cfg.get("vocab_size"), "weight_bits": bits,
        "quantized_ops": {k: v for k, v in ops.items() if k in ("MatMulNBits", "GatherBlockQuantized", "MatMul", "Gather")},
        "kv_cache": any(i.name.startswith("past_key_values") for i in model.graph.input),
        "opset": [f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import],
    }


def describe_artifact(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"artifact not found: {path}")
    if path.is_dir():
        return _onnx(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path} is neither a GGUF file (bad magic bytes) nor an ONNX folder")
    return _gguf(path)
