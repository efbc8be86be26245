"""The typed build config: presets, CLI overrides, and TOML/YAML load and dump for replay."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, Optional

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from edgedistill.errors import UserError
from edgedistill.settings_files import check_numbers, parse_toml, parse_yaml, read_settings_text, settings_error

DEFAULT_TEACHER = "smollm2-135m-instruct"


class _Section(BaseModel):
    # no inf or NaN: the written build-config.toml must replay, and a config file refuses them too
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StudentShape(_Section):
    layers: int = Field(gt=0)
    hidden: int = Field(gt=0)
    intermediate: int = Field(gt=0)
    heads: int = Field(gt=0)
    kv_heads: int = Field(gt=0)


class PlanConfig(_Section):
    compression: float = Field(4.0, ge=1.0, description="teacher params / student params")
    student: Optional[StudentShape] = None
    context: Optional[int] = Field(None, gt=0, description="overrides the target's context")
    calibration_examples: int = Field(32, ge=0, description="training examples the init stage measures importance on; 0: weight norms")
    progressive: bool = Field(False, description="compress in stages, each intermediate student teaching the next")
    progressive_ratio: float = Field(2.0, gt=1.0, description="compression per progressive stage")


class DataConfig(_Section):
    prompts: list[str] = Field(default_factory=list, description="extra prompt/text files (JSONL or .txt)")
    max_prompts: Optional[int] = Field(None, gt=0, description="cap on bundled + user prompts used")
    heldout_fraction: float = Field(0.15, gt=0, lt=1)
    max_new_tokens: int = Field(96, gt=0)
    gen_batch_size: int = Field(16, gt=0)
    max_len: int = Field(320, gt=16)
    # More and cleaner data (data/augment.py), all off by default. Left out of the dumped config at their
    # defaults, so builds made before these settings keep their config hash and cached data.
    self_instruct: int = Field(0, ge=0, description="requests to the teacher for new instructions, each showing "
                               "train prompts of one category; near-duplicates of what it writes are dropped")
    self_instruct_examples: int = Field(3, gt=0, description="train prompts of one category shown per request")
    dedup_threshold: float = Field(0.7, gt=0, le=1, description="MinHash Jaccard similarity (character 5-grams) "
                                   "at which a new instruction is a near-duplicate of a prompt or another new one")
    chain_of_thought: bool = Field(False, description="add a step-by-step variant of each train prompt in "
                                                      "cot_categories, answered by the teacher")
    cot_categories: list[str] = Field(default_factory=lambda: ["math", "reasoning"], min_length=1)
    multi_turn: int = Field(0, ge=0, description="train chats given a follow-up question the teacher answers "
                                                 "with its first answer in context")
    answer_filters: list[Literal["empty", "truncated", "too_short", "too_long", "repetitive"]] = Field(
        default_factory=list, description="quality filters that drop train answers: empty, truncated (hit "
        "max_new_tokens), too_short (min_answer_words), too_long (cut by max_len), repetitive (max_repetition)")
    min_answer_words: int = Field(2, gt=0, description="too_short filter: fewest words in an answer")
    max_repetition: float = Field(0.5, gt=0, le=1, description="repetitive filter: largest share of an "
                                                               "answer's word 3-grams repeating an earlier one")
    balance: Literal["none", "cap", "oversample"] = Field(
        "none", description="topic balancing of train after filtering: cap categories at the median "
                            "category size, or repeat examples up to the largest")

    @model_validator(mode="after")
    def _no_silent_settings(self):
        idle = [("self_instruct_examples", self.self_instruct == 0, "self_instruct > 0"),
                ("dedup_threshold", self.self_instruct == 0, "self_instruct > 0"),
                ("cot_categories", not self.chain_of_thought, "chain_of_thought = true"),
                ("min_answer_words", "too_short" not in self.answer_filters, 'answer_filters with "too_short"'),
                ("max_repetition", "repetitive" not in self.answer_filters, 'answer_filters with "repetitive"')]
        for name, off, needs in idle:
            if name in self.model_fields_set and off:
                raise ValueError(f"{name} only applies with {needs}; set that too, or leave {name} out")
        if len(set(self.answer_filters)) < len(self.answer_filters):
            raise ValueError("answer_filters names a filter twice")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        return _without_defaults(self, handler(self), _DATA_AUGMENT_FIELDS)


_DATA_AUGMENT_FIELDS = ("self_instruct", "self_instruct_examples", "dedup_threshold", "chain_of_thought",
                        "cot_categories", "multi_turn", "answer_filters", "min_answer_words", "max_repetition",
                        "balance")


def _without_defaults(model: BaseModel, data: dict, names) -> dict:
    """`data` (the model's dump) less the named fields that hold their defaults: a setting added
    after builds were made, left at its default, leaves their dumped config (so the config hash and
    the cached stages) as it was."""
    fields = type(model).model_fields
    return {k: v for k, v in data.items()
            if k not in names or getattr(model, k) != fields[k].get_default(call_default_factory=True)}


class LossConfig(_Section):
    """distill.loss: the training objective's terms (distill/losses.py defines each one).

    Temperature and alpha (the soft-target weight, where an alpha schedule starts) stay in distill.
    Settings at their defaults are left out of the dumped config, so a build that does not use this
    section keeps the config hash and the cached stages it had before the section existed.
    """

    objective: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="soft-target divergence: KL(teacher||student), KL(student||teacher), or JSD(beta)")
    jsd_beta: float = Field(0.5, ge=0, le=1, description="JSD mixture weight: 0 is forward KL, 1 reverse KL")
    alpha_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="anneal alpha from distill.alpha at the first step to alpha_end at the last")
    alpha_end: float = Field(0.0, ge=0, le=1,
                             description="alpha at the last step (below distill.alpha: toward hard labels)")
    hidden_weight: float = Field(0.0, ge=0, description="weight of the hidden-state MSE through learned projections")
    attention_weight: float = Field(0.0, ge=0, description="weight of the attention-map transfer")
    attention_kind: Literal["mse", "kl"] = Field("kl", description="attention-map distance")
    confidence_weighting: bool = Field(False, description="weight positions by the teacher's top-token probability")
    top_k: int = Field(0, ge=0, description="0: full vocabulary; k: teacher's top-k tokens plus one tail bucket")

    @model_validator(mode="after")
    def _no_silent_settings(self):
        # a setting that the rest of the section switches off would change nothing but the config
        # hash (so the cached stages): refuse it rather than retrain for nothing
        idle = [("jsd_beta", self.objective != "jsd", 'objective = "jsd"'),
                ("alpha_end", self.alpha_schedule == "constant", 'alpha_schedule "linear" or "cosine"'),
                ("attention_kind", self.attention_weight == 0, "attention_weight > 0")]
        for name, off, needs in idle:
            if name in self.model_fields_set and off:
                raise ValueError(f"{name} only applies with {needs}; set that too, or leave {name} out")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        return _without_defaults(self, handler(self), type(self).model_fields)


class DistillConfig(_Section):
    steps: int = Field(60, gt=0)
    batch_size: int = Field(8, gt=0)
    seq_len: int = Field(256, gt=8)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(6, ge=0)
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1)
    qat: bool = True
    qat_start_fraction: float = Field(0.5, ge=0, le=1, description="fake-quant switches on after this share of steps")
    qat_activations: bool = Field(True, description="QAT also models the runtime's int8 rounding of matmul inputs")
    qat_learn_scales: bool = Field(False, description="LSQ: learn each block's scale; exporters write the learned ones")
    checkpoint_every: int = Field(20, gt=0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    loss: LossConfig = Field(default_factory=LossConfig)
    logit_cache: bool = Field(False, description="read the teacher's top-k (loss.top_k) from a logit cache in "
                                                 "OUT/.cache/teacher-logits, built once, instead of running it each step")
    # Modes (distill/modes.py). Left out of the dumped config at their defaults, so builds made before
    # them keep their config hash and cached stages.
    mode: Literal["white_box", "black_box", "self"] = Field(
        "white_box", description="white_box: the teacher's logits; black_box: its text alone (cross-entropy on "
                                 "the answers); self: an EMA of the student itself as the teacher")
    teachers: list[str] = Field(default_factory=list, description="more teachers (folder, .gguf, hub id, alias): "
                                "the target is the mean of their and the build teacher's distributions; all "
                                "must share the build teacher's tokenizer")
    on_policy_fraction: float = Field(0.0, ge=0, le=1, description="GKD's lambda: the share of steps trained on "
                                      "the student's own samples of training prompts, scored by the teacher")
    on_policy_max_new_tokens: int = Field(64, gt=0, description="tokens the student samples per on-policy prompt")
    ema_momentum: float = Field(0.996, ge=0, le=1, description="self mode: EMA momentum at the first step")
    ema_momentum_end: float = Field(1.0, ge=0, le=1, description="self mode: EMA momentum at the last step (cosine)")
    # Refinement (distill/refine.py): rounds of evaluate -> more teacher data for the weakest categories,
    # oversampled -> distill again. Left out of the dumped config at their defaults, like the modes.
    refine_rounds: int = Field(0, ge=0, description="rounds of evaluate, more teacher data for the weakest "
                               "categories and distill again (--refine N)")
    refine_categories: int = Field(2, gt=0, description="weakest categories (lowest retention) a round adds data for")
    refine_steps: Optional[int] = Field(None, gt=0, description="training steps per round (default: half of steps)")
    refine_samples: int = Field(2, gt=0, description="new sampled teacher answers per train prompt of a weak category")
    refine_oversample: int = Field(2, gt=0, description="times a weak category's examples are repeated in a round")
    refine_temperature: float = Field(0.8, gt=0, description="sampling temperature of the new teacher answers")

    @model_validator(mode="after")
    def _cache_needs_top_k(self):
        if self.logit_cache and self.loss.top_k == 0:  # the cache holds top-k tokens; refuse rather than ignore
            raise ValueError("logit_cache holds the teacher's top-k tokens: set loss.top_k > 0 too")
        return self

    @model_validator(mode="after")
    def _modes_that_mean_something(self):
        # settings a mode would ignore are refused, like the loss section's idle settings
        if self.mode == "black_box":
            used = [name for name, on in (("on_policy_fraction", self.on_policy_fraction > 0),
                                          ("teachers", bool(self.teachers)), ("logit_cache", self.logit_cache),
                                          ("loss", self.loss != LossConfig())) if on]
            if used:
                raise ValueError(f"mode black_box trains on the teacher's text alone (no teacher logits): "
                                 f"{', '.join(used)} would do nothing; leave {'them' if len(used) > 1 else 'it'} out")
        if self.mode == "self":
            used = [name for name, on in (("teachers", bool(self.teachers)), ("logit_cache", self.logit_cache),
                                          ("loss.hidden_weight", self.loss.hidden_weight > 0),
                                          ("loss.attention_weight", self.loss.attention_weight > 0)) if on]
            if used:
                raise ValueError(f"mode self learns from the student's own moving average, not a teacher: "
                                 f"{', '.join(used)} cannot apply; leave {'them' if len(used) > 1 else 'it'} out")
        idle = [("on_policy_max_new_tokens", self.on_policy_fraction == 0, "on_policy_fraction > 0"),
                ("ema_momentum", self.mode != "self", 'mode = "self"'),
                ("ema_momentum_end", self.mode != "self", 'mode = "self"')]
        for name, off, needs in idle:
            if name in self.model_fields_set and off:
                raise ValueError(f"{name} only applies with {needs}; set that too, or leave {name} out")
        if self.ema_momentum > self.ema_momentum_end:
            raise ValueError(f"ema_momentum ({self.ema_momentum}) must not exceed ema_momentum_end "
                             f"({self.ema_momentum_end}): the mean teacher settles, it does not speed up")
        if self.on_policy_fraction > 0 and self.on_policy_max_new_tokens >= self.seq_len:
            raise ValueError(f"on_policy_max_new_tokens ({self.on_policy_max_new_tokens}) must leave room for a "
                             f"prompt in seq_len ({self.seq_len})")
        if self.teachers and self.loss.confidence_weighting:
            raise ValueError("loss.confidence_weighting reads one teacher's own confidence; it is not defined "
                             "for an ensemble of teachers")
        if any(not t.strip() for t in self.teachers) or len(set(self.teachers)) < len(self.teachers):
            raise ValueError("teachers must name each extra teacher once")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        # all loss settings at their defaults, the cache off and the default mode: as if none existed
        return _without_defaults(self, handler(self), ("loss", "logit_cache", *_MODE_FIELDS))


_MODE_FIELDS = ("mode", "teachers", "on_policy_fraction", "on_policy_max_new_tokens", "ema_momentum",
                "ema_momentum_end", "refine_rounds", "refine_categories", "refine_steps", "refine_samples",
                "refine_oversample", "refine_temperature")


class ExportConfig(_Section):
    onnx_block_size: Literal[16, 32, 64, 128] = Field(32, description="ONNX weights per scale")
    onnx_symmetric: bool = Field(True, description="ONNX: False stores a zero point per block")
    onnx_int8_per_channel: bool = Field(False, description="ONNX INT8: one scale per output channel")
    onnx_accuracy_level: Literal[1, 4] = Field(4, description="MatMulNBits: 4 int8 activations (fast), 1 float32")


class EvalConfig(_Section):
    max_examples: int = Field(48, gt=0, description="held-out examples for quality and parity")
    verify_tokens: int = Field(1024, gt=8, description="held-out tokens fed to each runtime for parity")
    parity_top1: float = Field(0.99, ge=0, le=1, description="gate: least next-token top-1 agreement with the fake-quant student")
    parity_kl: float = Field(1e-3, ge=0, description="gate: largest mean KL(fake-quant student || artifact)")
    profile_new_tokens: int = Field(32, gt=1)
    profile_repeats: int = Field(3, gt=0)
    # The evaluate stage (evaluate/stage.py): what the student kept, per capability
    tasks_per_family: int = Field(8, gt=0, description="checkable tasks per family (evaluate/tasks.py)")
    task_max_new_tokens: int = Field(32, gt=0, description="tokens generated for a direct answer")
    task_step_by_step_tokens: int = Field(128, gt=0, description="tokens generated for a step-by-step answer")
    generalization_examples: int = Field(16, gt=0, description="sequences of the generalization corpus scored")
    calibration_bins: int = Field(15, gt=1, description="bins of the reliability diagram and ECE")
    speculative_k: int = Field(4, gt=0, description="draft tokens per step when the student drafts for the teacher")
    speculative_prompts: int = Field(4, gt=0, description="held-out prompts timed for the speculative speed-up")
    speculative_new_tokens: int = Field(32, gt=1, description="tokens generated per speculative prompt")
    # failure-mode flags: each is a check in the budget verdict
    collapse_ratio: float = Field(0.4, ge=0, le=1, description="flag a category whose retention (top-1 agreement "
                                  "with the teacher) is below this share of the mean retention over categories")
    reasoning_drop: float = Field(0.15, ge=0, le=1, description="flag when the student loses this much more "
                                  "step-by-step accuracy than direct accuracy (teacher minus student), and its "
                                  "step-by-step loss is beyond the paired 95% interval")
    max_loop_fraction: float = Field(0.25, ge=0, le=1, description="flag when the share of the student's answers "
                                     "holding a repeated n-gram loop exceeds the teacher's by more than this")
    min_distinct_2_ratio: float = Field(0.5, ge=0, le=1, description="flag when the student's distinct-2 (unique "
                                        "bigrams / bigrams) falls below this share of the teacher's")


class BuildConfig(_Section):
    teacher: str = DEFAULT_TEACHER
    targets: list[str] = Field(default_factory=lambda: ["phone-4gb"], min_length=1)
    out: str = "build"
    preset: Literal["quick", "standard", "full"] = "quick"
    seed: int = 0
    teacher_bits: Optional[Literal[4, 8]] = None
    trust_remote_code: bool = False
    # --strict: a budget figure projected with a model that misses this host's own measurements by
    # more than measure.project.TRUST_BOUND_PCT fails the build, however comfortable its margin
    strict: bool = False
    plan: PlanConfig = Field(default_factory=PlanConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _ensemble_without_progressive(self):
        # refused here, before any stage runs, not when the distill stage would find the chain
        if self.plan.progressive and self.distill.teachers:
            raise ValueError("distill.teachers with plan.progressive: a progressive build's last stage trains "
                             "against the intermediate student, not the teachers; use one or the other")
        return self

    def section_hash(self, *fields: str) -> str:
        """Hash of the named config fields (dotted paths), for stage cache keys."""
        dumped = self.model_dump(mode="json")
        picked = {}
        for f in fields:
            v = dumped
            for part in f.split("."):
                v = v[part]
            picked[f] = v
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()


# Presets set the amount of work; everything else keeps its default. "quick" is sized to finish a
# build of the default teacher in about 20 minutes on a 2-core CPU (see benchmarks/).
PRESETS: dict[str, dict] = {
    "quick": {"data": {"max_prompts": 240, "max_new_tokens": 96}, "distill": {"steps": 60}},
    "standard": {"data": {"max_new_tokens": 160}, "distill": {"steps": 400, "batch_size": 16}},
    "full": {"data": {"max_new_tokens": 256}, "distill": {"steps": 2000, "batch_size": 16, "seq_len": 512},
             "eval": {"max_examples": 200}},
}


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve(overrides: dict, base: Optional[dict] = None) -> BuildConfig:
    """Preset values, then the base config (a replayed file), then explicit overrides, validated."""
    if base and overrides.get("preset") in PRESETS and overrides["preset"] != base.get("preset"):
        # --preset on a replayed config: the new preset's values win over the file's old ones
        base = _deep_merge(base, PRESETS[overrides["preset"]])
    merged = _deep_merge(base or {}, overrides)
    preset = merged.get("preset", "quick")
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    # A replayed full config already holds every preset value, so this only fills what a partial file leaves out.
    merged = _deep_merge(PRESETS[preset], merged)
    try:
        return BuildConfig.model_validate(merged)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        if not field:  # a check across sections: its message names the settings
            raise UserError(f"invalid options: {err['msg'].removeprefix('Value error, ')}") from None
        raise UserError(f"invalid option {field}: {err['msg']} (got {err.get('input')!r})") from None


def load_file(path: Path) -> dict:
    """A config file (TOML, or YAML for .yaml/.yml) as a dict, checked against BuildConfig so that a
    bad setting is reported with its file and line, not later without either."""
    text = read_settings_text(path, "config file")
    yaml_file = path.suffix in (".yaml", ".yml")
    data = parse_yaml(text, str(path)) if yaml_file else parse_toml(text, str(path))
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must hold a table of settings")
    try:
        checked = BuildConfig.model_validate(data)
    except ValidationError as e:
        raise settings_error(e, BuildConfig, str(path), text, yaml_file) from None
    check_numbers(checked.model_dump(), str(path), text, yaml_file)
    return data


def dump_toml(cfg: BuildConfig) -> str:
    data = cfg.model_dump(mode="json", exclude_none=True)
    return "# edgedistill build config; replay with: edgedistill build --config THIS_FILE\n" + tomli_w.dumps(data)
