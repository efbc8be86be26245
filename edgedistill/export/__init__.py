"""Exporters: write a trained student as on-device artifacts (GGUF, ONNX)."""
