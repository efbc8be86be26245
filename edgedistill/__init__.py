"""edgedistill: teacher LLM in, on-device student artifacts out, with a budget verdict per target."""

__version__ = "0.1.0"
