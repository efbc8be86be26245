"""Measurement: output quality against the teacher, host profiling, and projection to targets."""
