"""The build, as data: each stage, the module that runs it, what it reads and what it comes after."""

from __future__ import annotations

from pathlib import Path

from edgedistill import budget, plan, prune, report, teacher, verify
from edgedistill.data import stage as data_stage
from edgedistill.distill import stage as distill_stage
from edgedistill.evaluate import stage as evaluate_stage
from edgedistill.export import stage as export_stage
from edgedistill.measure import stage as profile_stage
from edgedistill.pipeline import Stage


def _teacher_identity(cfg) -> str:
    return teacher.fingerprint(teacher.resolve(cfg.teacher))


def _extra_teachers_identity(cfg) -> str | None:
    """An ensemble's other teachers, by their contents as the build's teacher is (None without any)."""
    if not cfg.distill.teachers:
        return None
    return ",".join(teacher.fingerprint(teacher.resolve(t)) for t in cfg.distill.teachers)


def _refine_identity(cfg) -> str:
    """--refine reads more than the distill section (the collapse threshold, the data settings its new
    teacher answers are made with); without it they must not retrain the student."""
    import json

    if not cfg.distill.refine_rounds:
        return ""
    return json.dumps(cfg.model_dump(mode="json", include={"eval": {"collapse_ratio"},
                                                           "data": {"max_new_tokens", "max_len", "gen_batch_size",
                                                                    "answer_filters", "min_answer_words",
                                                                    "max_repetition"}}), sort_keys=True)


def _distill_identity(cfg) -> str | None:
    parts = [_extra_teachers_identity(cfg), _refine_identity(cfg) or None]
    # unchanged for a build without refinement, so its cached students stay valid
    return ";".join(filter(None, parts)) or None


# the eval fields the evaluate stage reads (the others are the verify and profile stages')
EVALUATE_FIELDS = ("tasks_per_family", "task_max_new_tokens", "task_step_by_step_tokens", "generalization_examples",
                   "calibration_bins", "speculative_k", "speculative_prompts", "speculative_new_tokens",
                   "collapse_ratio", "reasoning_drop", "max_loop_fraction", "min_distinct_2_ratio")


def _progressive_identity(cfg) -> str:
    """A progressive init trains its intermediates, so it then depends on the training settings too."""
    import json

    if not cfg.plan.progressive:
        return ""
    return json.dumps(cfg.model_dump(mode="json", include={"distill", "seed", "eval"}), sort_keys=True)


def _prompt_files_identity(cfg) -> str:
    """Users edit their prompt files in place: the key follows their bytes, not their names."""
    from edgedistill.pipeline import file_sha256

    return ",".join(file_sha256(Path(f)) for f in cfg.data.prompts)


STAGES: list[Stage] = [
    Stage("teacher", teacher.run, after={}, reads=("teacher", "teacher_bits", "trust_remote_code"),
          extra=_teacher_identity),
    Stage("plan", plan.run, after={"teacher": "config"}, reads=("plan", "target"), version=2),
    Stage("data", data_stage.run, after={"teacher": None}, reads=("data", "seed"), extra=_prompt_files_identity),
    Stage("init", prune.run, after={"teacher": None, "data": None, "plan": "student"},
          reads=("plan.calibration_examples",), extra=_progressive_identity, version=4),
    Stage("distill", distill_stage.run, after={"teacher": None, "init": None, "data": None, "plan": "student"},
          reads=("distill", "export", "seed", "eval.max_examples"), version=5, every_process=True,
          extra=_distill_identity),
    Stage("export", export_stage.run, after={"teacher": None, "distill": None, "plan": "export"},
          reads=("export",), version=4),
    Stage("verify", verify.run, after={"teacher": None, "distill": None, "data": None, "export": None,
                                       "plan": "student"},
          reads=("eval.verify_tokens", "eval.parity_top1", "eval.parity_kl", "export"), version=7),
    Stage("profile", profile_stage.run, after={"teacher": None, "data": None, "export": None, "plan": "student"},
          reads=("eval.profile_new_tokens", "eval.profile_repeats", "eval.max_examples", "target.budget.prompt_tokens"),
          version=3),
    Stage("evaluate", evaluate_stage.run, after={"teacher": None, "data": None, "init": None, "distill": None},
          reads=("seed", "data.max_len", "data.max_new_tokens", "data.gen_batch_size", "eval.max_examples",
                 *(f"eval.{name}" for name in EVALUATE_FIELDS)), version=1),
    Stage("budget", budget.run, after={"plan": None, "export": None, "profile": None, "distill": "quality",
                                       "evaluate": None},
          reads=("target", "strict", "eval.collapse_ratio"), version=3),
    Stage("report", report.run, after={"teacher": None, "plan": None, "data": None, "init": None, "distill": None,
                                       "export": None, "verify": None, "profile": None, "evaluate": None,
                                       "budget": None},
          reads=("target",), version=6),
]
