"""Distillation: knowledge-distillation losses, format-exact fake-quant (QAT) and the training loop."""
