"""What a distilled student kept and lost: checkable tasks, generalization, calibration,
degeneration and speculative-decoding acceptance (the `evaluate` stage)."""
