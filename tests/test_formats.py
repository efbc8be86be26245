"""Per-tensor-group formats: which group an HF tensor is in, and which format a group gets."""

from __future__ import annotations

import pytest

from edgedistill.errors import UserError
from edgedistill.formats import TENSOR_GROUPS, tensor_format, tensor_group


def test_tensor_group_of_parameter_and_module_names():
    assert TENSOR_GROUPS == ("embed", "attn", "mlp")
    groups = {
        "model.embed_tokens.weight": "embed", "lm_head.weight": "embed", "lm_head": "embed",
        "model.layers.3.self_attn.q_proj.weight": "attn", "model.layers.0.self_attn.o_proj": "attn",
        "model.layers.0.self_attn.k_proj.weight": "attn", "model.layers.1.self_attn.v_proj.weight": "attn",
        "model.layers.2.mlp.gate_proj.weight": "mlp", "model.layers.2.mlp.up_proj": "mlp",
        "model.layers.2.mlp.down_proj.weight": "mlp",
        # not quantized: norms, biases, the rotary buffer
        "model.norm.weight": None, "model.layers.0.input_layernorm.weight": None,
        "model.layers.0.post_attention_layernorm.weight": None, "model.layers.0.self_attn.q_proj.bias": None,
        "model.rotary_emb.inv_freq": None,
    }
    assert {name: tensor_group(name) for name in groups} == groups


@pytest.mark.parametrize("fmt, group, group_bits, want", [
    ("gguf-q4_0", "embed", {"embed": 8}, "gguf-q8_0"),
    ("gguf-q4_0", "attn", {"embed": 8}, "gguf-q4_0"),
    ("gguf-q4_0", None, {"embed": 8}, "gguf-q4_0"),
    ("onnx-int4", "embed", {"embed": 8}, "onnx-int8"),
    ("onnx-int4", "mlp", {"attn": 8, "mlp": 8}, "onnx-int8"),
    ("gguf-q8_0", "embed", {"embed": 4}, "gguf-q8_0"),  # never below the artifact's own bits
    ("onnx-int8", "embed", {"embed": 8}, "onnx-int8"),
    ("gguf-q4_0", "embed", None, "gguf-q4_0"),
    ("gguf-q4_0", "embed", {}, "gguf-q4_0"),
])
def test_tensor_format(fmt, group, group_bits, want):
    assert tensor_format(fmt, group, group_bits) == want


def test_tensor_format_refuses_what_no_format_stores():
    with pytest.raises(UserError, match="no llamacpp format has 6-bit"):
        tensor_format("gguf-q4_0", "embed", {"embed": 6})
    with pytest.raises(UserError, match="no ort format has 16-bit"):
        tensor_format("onnx-int4", "attn", {"attn": 16})
    with pytest.raises(UserError, match="unknown tensor group"):
        tensor_format("gguf-q4_0", "embed", {"embeddings": 8})
    with pytest.raises(UserError, match="unknown format"):
        tensor_format("gguf-q3_k", "embed", {"embed": 8})
