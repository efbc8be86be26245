"""Data stage: bundled prompt sets, user prompt files, teacher answers and their tokenization."""
