"""Progressive compression: reach a large ratio through intermediate students, each teaching the next.

One cut from the teacher straight to a much smaller student throws away more than a short
distillation wins back. Cutting in steps (2x each, say: the 175B -> 30B -> 7B -> 1B pattern scaled
down) keeps every cut small, and each intermediate is distilled against the model it was cut from
before it is cut again. The plan chooses the chain of shapes; this module walks it for the init
stage. The whole build spends the same distillation steps as a one-cut build: they are shared
evenly by the intermediates and the final distill stage.
"""

from __future__ import annotations

from pathlib import Path

from edgedistill.distill.trainer import distill
from edgedistill.errors import UserError
from edgedistill.measure.quality import evaluate, teacher_targets
from edgedistill.plan import describe
from edgedistill.prune import Lineage, cut


def split_steps(total: int, stages: int) -> list[int]:
    """`total` distillation steps shared evenly by `stages` stages; the last stages take the remainder."""
    if total < stages:
        raise UserError(f"a progressive build of {stages} stages needs at least {stages} distill steps, "
                        f"one per stage (got {total})")
    share, extra = divmod(total, stages)
    return [share + (i >= stages - extra) for i in range(stages)]


def run_chain(teacher, chain: list[dict], *, cfg, calib: list[list[int]], train: list[dict], heldout: list[dict],
              context: int, workdir: Path, resume: bool = False, progress: bool = True, say=print):
    """Prune and distill through the intermediate shapes of `chain`, largest first.

    `cfg` is the build config (its distill section and seed). Returns the last intermediate
    student (the final stage's teacher), its Lineage (the original-teacher layer, heads and
    channels each of its units comes from), and per-stage figures. Every stage is scored against
    the original teacher, so the figures of all stages compare with each other and with the final
    student's.
    """
    from edgedistill.distill.stage import train_config  # that module imports this one

    targets = teacher_targets(teacher, heldout)
    shares = split_steps(cfg.distill.steps, len(chain) + 1)
    current, lineage, stages = teacher, Lineage.of_teacher(teacher.config), []
    for i, (shape, steps) in enumerate(zip(chain, shares), 1):
        say(f"  progressive stage {i} of {len(chain) + 1}: prune to {describe(shape)}, distill {steps} steps")
        student, info = cut(current, shape, context, calib)
        # No fake-quant: intermediates are never shipped. A seed per stage gives each stage its own
        # shuffle of the data rather than the same first rows again. The folder name starts with
        # "ckpt" so the pipeline keeps it for --resume and drops it once the stage is done. The cut's
        # maps speak of `current`, the model this stage trains against: its layers, heads, channels.
        run_cfg = train_config(cfg.distill, steps, None, cfg.seed + i, info["layer_map"],
                               head_map=info["head_map"], hidden_channels=info["hidden_channels"])
        result = distill(student, current, train, run_cfg, Path(workdir) / f"ckpt-progressive-{i}",
                         resume=resume, progress=progress)
        lineage = lineage.through(info)
        quality = evaluate(student, targets, heldout)
        stages.append({"shape": shape, "params": sum(p.numel() for p in student.parameters()),
                       "steps": result["steps"], "tokens": result["tokens"], "quality": quality,
                       **lineage.record()})
        if quality["tokens"]:
            say(f"    vs the teacher: top-1 agreement {quality['top1_agreement']:.1%}, "
                f"KL {quality['kl']:.3g}, perplexity {quality['perplexity']:.3g}")
        current = student
    return current, lineage, stages
