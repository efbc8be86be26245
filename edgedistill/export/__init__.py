"""Exporters: write a trained student as on-device artifacts (GGUF, ONNX)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgedistill.errors import UserError


def load_float_weights(student_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF model folder's *.safetensors files, as float32 numpy arrays by name."""
    # torch reads bf16/fp16 checkpoints that numpy cannot; quantization works on float32
    from safetensors import safe_open

    from edgedistill.distill.quantized import SCALES_FILE

    # the learned-scale file sits beside the weights under the same HF names: it is not a weight
    files = sorted(p for p in Path(student_dir).glob("*.safetensors") if p.name != SCALES_FILE)
    if not files:
        raise UserError(f"{student_dir}: no *.safetensors weights (save the student with save_pretrained)")
    weights = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                weights[k] = st.get_tensor(k).float().numpy()
    return weights
