"""Teacher sources and low-memory (bitsandbytes) loading, on the tiny teacher."""

import pytest
import torch
from transformers import AutoConfig

from edgedistill import teacher as T
from edgedistill.errors import UserError
from edgedistill.plan import student_config
from edgedistill.prune import build_student


def test_alias_resolves_to_the_bundled_gguf():
    src = T.resolve("smollm2-135m-instruct")
    assert src.kind == "gguf" and src.gguf_path.is_file()


def test_sources_are_told_apart(tiny_teacher_dir, tmp_path):
    assert T.resolve(str(tiny_teacher_dir)).kind == "hf_dir"
    assert T.resolve("org/name").kind == "hub"
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(UserError, match="not a GGUF"):
        T.resolve(str(bad))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no model weights"):
        T.resolve(str(tmp_path / "empty"))


def test_teacher_larger_than_memory_is_refused_before_loading():
    with pytest.raises(UserError, match="teacher-bits"):
        T.check_memory(10**13, None)


@pytest.mark.parametrize("bits", [8, 4])
def test_low_bit_teacher_loads_and_seeds_a_student(tiny_teacher_dir, bits):
    pytest.importorskip("bitsandbytes")
    src = T.resolve(str(tiny_teacher_dir))
    full, _ = T.load(src)
    low, tok = T.load(src, bits=bits)
    ids = torch.randint(0, full.config.vocab_size, (1, 12))
    with torch.no_grad():
        a, b = full(ids).logits, low(ids).logits
    assert (a - b).abs().max() < 1.0 and torch.isfinite(b).all()
    # full shape: every slice is the identity, so the student holds the dequantized teacher weights
    c = full.config
    shape = dict(layers=c.num_hidden_layers, hidden=c.hidden_size, intermediate=c.intermediate_size,
                 heads=c.num_attention_heads, kv_heads=c.num_key_value_heads, head_dim=c.head_dim)
    cfg = AutoConfig.for_model(**student_config(full.config.to_dict(), shape, 128))
    s_low, _ = build_student(low, cfg)
    w_full = full.model.layers[0].mlp.down_proj.weight
    w_low = s_low.model.layers[0].mlp.down_proj.weight
    # dequantized, not raw codes (which are 100x off): int8 within 2%, NF4 (blocks of 64) within 30% on average
    rel = ((w_full - w_low).abs().mean() / w_full.abs().mean()).item()
    assert 0 < rel < (0.02 if bits == 8 else 0.3), rel
