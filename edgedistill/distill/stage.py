"""Stage `distill`: train the initialised student against the teacher, with format-matched fake-quant."""

from __future__ import annotations

from edgedistill.data.teacher_answers import read_jsonl
from edgedistill.distill.trainer import TrainConfig, distill
from edgedistill.measure.quality import evaluate, teacher_targets
from edgedistill.progressive import split_steps


def load_student(folder):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def train_config(d, steps: int, qat_format: str | None, seed: int, qat_group_bits: dict | None = None) -> TrainConfig:
    """The trainer's settings from the build's `distill` section, for a run of `steps` steps."""
    return TrainConfig(
        steps=steps, batch_size=d.batch_size, seq_len=d.seq_len, lr=d.lr, warmup_steps=d.warmup_steps,
        temperature=d.temperature, alpha=d.alpha, qat_format=qat_format, qat_group_bits=qat_group_bits,
        qat_start_step=int(d.qat_start_fraction * steps), checkpoint_every=d.checkpoint_every, seed=seed,
        mixed_precision=d.mixed_precision,
    )


def run(ctx) -> dict:
    cfg, d = ctx.cfg, ctx.cfg.distill
    teacher, tok = ctx.session.teacher(ctx["teacher"])
    student = load_student(ctx["init"].path("student"))
    # A progressive init leaves its last intermediate student: the closest model to train against.
    # The earlier stages have spent their shares of the step budget; this stage gets the last share.
    chain = ctx["init"].summary["progressive"]
    trains_against = "assistant" if chain else "teacher"
    coach = load_student(ctx["init"].path("assistant")) if chain else teacher
    steps = split_steps(d.steps, len(chain) + 1)[-1]
    if chain:
        ctx.console.print(f"  progressive stage {len(chain) + 1} of {len(chain) + 1}: distill {steps} of {d.steps} "
                          f"steps against the assistant (intermediate {len(chain)})")
    train = read_jsonl(ctx["data"].path("train_tokens.jsonl"))
    heldout = read_jsonl(ctx["data"].path("heldout_tokens.jsonl"))[: cfg.eval.max_examples]
    qat_format = ctx["plan"].summary["student"]["qat_format"] if d.qat else None
    qat_group_bits = (ctx["plan"].summary["student"].get("group_bits") or None) if d.qat else None

    targets = teacher_targets(teacher, heldout)
    quality = {"teacher": evaluate(teacher, targets, heldout), "student_init": evaluate(student, targets, heldout)}
    result = distill(student, coach, train, train_config(d, steps, qat_format, cfg.seed, qat_group_bits), ctx.dir,
                     resume=ctx.session.resume, progress=ctx.session.progress)
    quality["student"] = evaluate(student, targets, heldout)
    student.save_pretrained(ctx.dir / "student")
    tok.save_pretrained(ctx.dir / "student")
    return {"train": result, "quality": quality, "qat_format": qat_format, "teacher_for_training": trains_against,
            "params": sum(p.numel() for p in student.parameters())}
