"""One build on several processes, as `accelerate launch` (or torchrun) starts it.

The distill stage trains on every process (DDP, or FSDP under `accelerate launch --use_fsdp`;
trainer.py). Every other stage runs on the main
process alone while the others wait at a barrier and then read its result from the stage cache, as
a re-run would; only the main process publishes and prints. A build started without a launcher
(WORLD_SIZE unset or 1) takes none of these paths.
"""

from __future__ import annotations

import functools
import os
from datetime import timedelta

# The other processes wait at a barrier while the main one runs the teacher over the prompts (the
# data stage), which takes hours for a large teacher on a small machine: far beyond torch's
# default 30-minute collective timeout.
BARRIER_TIMEOUT = timedelta(hours=48)


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def fsdp_requested() -> bool:
    """Whether the launch asked for FSDP (`accelerate launch --use_fsdp`, or a config file with
    distributed_type FSDP: the launcher turns both into this variable). Read from the environment
    because accelerate's own state ignores the request on CPU processes (MULTI_CPU), where the
    trainer still shards the student itself."""
    return launched() and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


@functools.cache
def state():
    """accelerate's process state, made as the trainer's Accelerator makes it (cpu=True where torch
    sees no accelerator: DDP over gloo), with the long barrier timeout."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.accelerator.is_available(), timeout=BARRIER_TIMEOUT)


def is_main() -> bool:
    return not launched() or state().is_main_process


def wait() -> None:
    """A barrier across the build's processes; nothing alone."""
    if launched():
        state().wait_for_everyone()


def finish() -> None:
    """Tear the process group down before exit: left to interpreter shutdown, gloo's threads can
    abort a process whose work is done ("terminate called without an active exception")."""
    import torch

    if launched() and torch.distributed.is_initialized():
        state().wait_for_everyone()
        torch.distributed.destroy_process_group()
