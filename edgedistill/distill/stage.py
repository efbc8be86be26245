"""Stage `distill`: train the initialised student against the teacher, with format-matched fake-quant."""

from __future__ import annotations

from edgedistill.data.teacher_answers import read_jsonl
from edgedistill.distill.trainer import TrainConfig, distill
from edgedistill.measure.quality import evaluate, teacher_targets


def load_student(folder):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def run(ctx) -> dict:
    cfg, d = ctx.cfg, ctx.cfg.distill
    teacher, tok = ctx.session.teacher(ctx["teacher"])
    student = load_student(ctx["init"].path("student"))
    train = read_jsonl(ctx["data"].path("train_tokens.jsonl"))
    heldout = read_jsonl(ctx["data"].path("heldout_tokens.jsonl"))[: cfg.eval.max_examples]
    qat_format = ctx["plan"].summary["student"]["qat_format"] if d.qat else None

    targets = teacher_targets(teacher, heldout)
    quality = {"teacher": evaluate(teacher, targets, heldout), "student_init": evaluate(student, targets, heldout)}
    train_cfg = TrainConfig(
        steps=d.steps, batch_size=d.batch_size, seq_len=d.seq_len, lr=d.lr, warmup_steps=d.warmup_steps,
        temperature=d.temperature, alpha=d.alpha, qat_format=qat_format,
        qat_start_step=int(d.qat_start_fraction * d.steps), checkpoint_every=d.checkpoint_every, seed=cfg.seed,
        mixed_precision=d.mixed_precision,
    )
    result = distill(student, teacher, train, train_cfg, ctx.dir, resume=ctx.session.resume,
                     progress=ctx.session.progress)
    quality["student"] = evaluate(student, targets, heldout)
    student.save_pretrained(ctx.dir / "student")
    tok.save_pretrained(ctx.dir / "student")
    return {"train": result, "quality": quality, "qat_format": qat_format,
            "params": sum(p.numel() for p in student.parameters())}
