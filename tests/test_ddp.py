"""The distill loop under `accelerate launch` on 2 CPU processes (DDP, or FSDP, over gloo) against 1 process.

Both train the same tiny student on the same global batches (2 rows per process vs 4 in one), with
unequal numbers of supervised tokens on the two processes (trainer.token_share evens that out); the
loss trajectory and the final weights must agree up to float reduction order.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "ddp_distill.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def run(out: Path, processes: int, *flags: str, launch: str = "--multi_gpu") -> dict:
    out.parent.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes == 1:
        cmd = [sys.executable, str(SCRIPT)]
    else:
        accelerate = Path(sys.executable).with_name("accelerate")
        cmd = [str(accelerate) if accelerate.is_file() else shutil.which("accelerate"), "launch", launch,
               "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(SCRIPT)]
    done = subprocess.run([*cmd, str(out), "--global-batch", "4", *flags], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    return {**json.loads(out.read_text()), "weights": load_file(str(out.with_suffix(".safetensors")))}


@pytest.mark.parametrize("flags", [(), ("--logit-cache",), ("--confidence",), ("--logit-cache", "--confidence")],
                         ids=["teacher-online", "logit-cache", "confidence-weighted", "logit-cache-confidence-weighted"])
def test_two_processes_follow_one_process(tmp_path, flags):
    one = run(tmp_path / "one" / "run.json", 1, *flags)
    two = run(tmp_path / "two" / "run.json", 2, *flags)
    assert two["processes"] == 2 and one["processes"] == 1
    assert one["tokens"] == two["tokens"]  # the same global batches
    assert len(one["loss_curve"]) == len(two["loss_curve"]) == 6
    assert one["loss_curve"][-1] < one["loss_curve"][0]
    for a, b in zip(one["loss_curve"], two["loss_curve"]):
        assert b == pytest.approx(a, abs=2e-4)  # the curve keeps 4 decimals
    for name, w in one["weights"].items():
        assert relative_distance(two["weights"][name], w) < 1e-4, name
    if "--logit-cache" in flags:
        # the teacher's pass for the cache is split: each process built every other shard
        assert one["shards_built_by_process"] == [6]
        assert two["shards_built_by_process"] == [3, 3]
        assert two["logit_cache"]["key"] == one["logit_cache"]["key"]


@pytest.mark.parametrize("flags", [("--meta-elsewhere", "--resume-at", "3"), ("--logit-cache",)],
                         ids=["loaded-on-main-resumed", "logit-cache"])
def test_fsdp_two_processes_follow_one_process(tmp_path, flags):
    # `accelerate launch --use_fsdp`: accelerate itself refuses FSDP on CPU processes, the trainer
    # shards the student with torch's fully_shard instead, the same way it does on GPUs.
    one = run(tmp_path / "one" / "run.json", 1, *[f for f in flags if f == "--logit-cache"])
    two = run(tmp_path / "two" / "run.json", 2, *flags, launch="--use_fsdp")
    assert two["processes"] == 2 and one["tokens"] == two["tokens"]
    assert len(one["loss_curve"]) == len(two["loss_curve"]) == 6
    for a, b in zip(one["loss_curve"], two["loss_curve"]):
        assert b == pytest.approx(a, abs=2e-4)
    for name, w in one["weights"].items():
        assert relative_distance(two["weights"][name], w) < 1e-4, name
    # each process held half of the student's parameter values while training; the student the
    # caller passed in holds all of them, as plain tensors, afterwards
    sharded = two["fsdp"]
    assert sum(sharded["held_by_process"]) == sharded["parameters"] == sharded["student_parameters"]
    assert all(0 < held <= sharded["parameters"] // 2 + 64 for held in sharded["held_by_process"])
    assert sharded["student_is_plain"]
    if "--resume-at" in flags:  # stopped after step 3, resumed from the sharded checkpoint on fresh models
        assert two["resumed_from"] == 3
    else:
        assert two["shards_built_by_process"] == [3, 3]


def test_fsdp_qat_follows_one_process(tmp_path):
    # QAT (weights and activations, gguf-q4_0) switches on at step 2; the FSDP run checkpoints at
    # steps 2 and 4 with fake-quant on, stops after step 4 and resumes on fresh models. Under FSDP
    # the fake-quant runs in the modules' forwards, in one process as parametrizations: the same values.
    qat = ("--qat", "gguf-q4_0", "--act", "--qat-start", "2")
    one = run(tmp_path / "one" / "run.json", 1, *qat)
    two = run(tmp_path / "two" / "run.json", 2, *qat, "--checkpoint-every", "2", "--resume-at", "4", launch="--use_fsdp")
    plain = run(tmp_path / "plain" / "run.json", 1)
    assert one["qat_ran"] and two["qat_ran"] and two["resumed_from"] == 4
    for a, b in zip(one["loss_curve"], two["loss_curve"], strict=True):
        assert b == pytest.approx(a, abs=2e-4)
    for name, w in one["weights"].items():
        assert relative_distance(two["weights"][name], w) < 1e-4, name
    # the fake-quant changed what was learned, by far more than the tolerance: the FSDP run did it too
    assert max(relative_distance(plain["weights"][n], w) for n, w in one["weights"].items()) > 1e-3


@pytest.mark.parametrize("setting", [{"qat": "learn_scales"}, {"mode": "self"}, {"on_policy_fraction": 0.5},
                                     {"mixed_precision": "fp16"}])
def test_fsdp_refuses_what_it_cannot_shard(setting):
    from edgedistill.distill.qat import QuantSpec
    from edgedistill.distill.trainer import TrainConfig, _refuse_under_fsdp
    from edgedistill.errors import UserError

    if "qat" in setting:
        setting = {"qat": QuantSpec("gguf-q4_0", learn_scales=True)}
    with pytest.raises(UserError, match="FSDP"):
        _refuse_under_fsdp(TrainConfig(steps=1, batch_size=1, seq_len=8, **setting))
    _refuse_under_fsdp(TrainConfig(steps=1, batch_size=1, seq_len=8))  # the plain run goes ahead
    _refuse_under_fsdp(TrainConfig(steps=1, batch_size=1, seq_len=8, qat=QuantSpec("gguf-q4_0", act=True)))


def test_tolerance_catches_a_process_training_alone(tmp_path):
    # Without DDP each process would train on its own half batch: its run then leaves the
    # one-process trajectory by far more than the tolerance above, so that check can fail.
    one = run(tmp_path / "one" / "run.json", 1)
    half = run(tmp_path / "half" / "run.json", 1, "--global-batch", "2")  # the later flag wins
    far = max(abs(a - b) for a, b in zip(one["loss_curve"], half["loss_curve"]))
    weights_far = max(relative_distance(half["weights"][n], w) for n, w in one["weights"].items())
    assert far > 2e-4 and weights_far > 1e-4


def test_a_whole_build_under_accelerate_launch(tmp_path, tiny_teacher_dir, small_prompts):
    # The README's multi-process command: every process trains (DDP), the main one alone runs the other
    # stages and publishes; the result is one ordinary build folder.
    from conftest import fast_config

    out = tmp_path / "out"
    cfg = fast_config(tmp_path, out, tiny_teacher_dir, small_prompts)
    accelerate = Path(sys.executable).with_name("accelerate")
    done = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                           str(free_port()), "-m", "edgedistill.cli", "build", "--config", str(cfg), "--no-progress"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert done.stderr.count("PASS phone-4gb") == 1  # printed once, by the main process
    stages = sorted(p.name.split("-")[0] for p in (out / ".stages").iterdir())
    assert stages == sorted(set(stages)) and not any(p.suffix == ".partial" for p in (out / ".stages").iterdir())
    distilled = json.loads(next((out / ".stages").glob("distill-*/stage.json")).read_text())["summary"]
    steps, batch, seq_len = 4, 2, 64  # fast_config's distill section
    assert distilled["train"]["tokens"] == 2 * steps * batch * seq_len  # both processes trained
    assert (out / "phone-4gb" / "report.json").is_file()
