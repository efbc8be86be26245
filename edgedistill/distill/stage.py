"""Stage `distill`: train the initialised student against the teacher, with format-matched fake-quant."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from edgedistill.data.teacher_answers import read_jsonl
from edgedistill.distill.qat import QuantSpec, learned_scales
from edgedistill.distill.quantized import save_learned_scales
from edgedistill.distill.losses import LossSpec
from edgedistill.distill.trainer import TrainConfig, distill
from edgedistill.errors import UserError
from edgedistill import processes
from edgedistill.formats import FORMATS
from edgedistill.measure.quality import evaluate, heldout_examples
from edgedistill.progressive import split_steps
from edgedistill.prune import Lineage


def load_student(folder):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def runtime_quantizes_activations(fmt: str, export_cfg) -> bool:
    """llama.cpp's CPU Q4_0/Q8_0 kernels always do; MatMulNBits does at accuracy_level 4."""
    return FORMATS[fmt].runtime == "llamacpp" or export_cfg.onnx_accuracy_level == 4


def quant_spec(cfg, fmt: str, group_bits: dict | None, *, act: bool, learn_scales: bool = False) -> QuantSpec:
    """How the build's artifact of `fmt` stores its weights (the export section), as QAT and verify
    model it; act=True models the activation rounding where the artifact's runtime does it."""
    e = cfg.export
    return QuantSpec(fmt, group_bits or None, block_size=e.onnx_block_size, symmetric=e.onnx_symmetric,
                     int8_per_channel=e.onnx_int8_per_channel, act=act and runtime_quantizes_activations(fmt, e),
                     learn_scales=learn_scales)


def qat_spec(cfg, plan_student: dict) -> QuantSpec | None:
    """What the distill stage trains against: the plan's QAT format, activations modelled when asked."""
    fmt = plan_student["qat_format"]
    if not cfg.distill.qat or fmt is None:
        return None
    return quant_spec(cfg, fmt, plan_student.get("group_bits"), act=cfg.distill.qat_activations,
                      learn_scales=cfg.distill.qat_learn_scales)


def train_config(d, steps: int, qat: QuantSpec | None, seed: int, layer_map: list[int] | None = None, *,
                 head_map: list[list[int]] | None = None, hidden_channels: list[int] | None = None) -> TrainConfig:
    """The trainer's settings from the build's `distill` section, for a run of `steps` steps;
    layer_map: student layer -> layer of the model it trains against (None: evenly spaced);
    head_map: per student layer, student head -> head of that model (None: heads grouped);
    hidden_channels: student channel -> channel of that model (None: projections start random)."""
    return TrainConfig(
        steps=steps, batch_size=d.batch_size, seq_len=d.seq_len, lr=d.lr, warmup_steps=d.warmup_steps,
        temperature=d.temperature, alpha=d.alpha, loss=LossSpec(**dict(d.loss)), layer_map=layer_map,
        head_map=head_map, hidden_channels=hidden_channels, qat=qat,
        qat_start_step=int(d.qat_start_fraction * steps), checkpoint_every=d.checkpoint_every, seed=seed,
        mixed_precision=d.mixed_precision, logit_cache=d.logit_cache, mode=d.mode,
        on_policy_fraction=d.on_policy_fraction, on_policy_max_new_tokens=d.on_policy_max_new_tokens,
        ema_momentum=d.ema_momentum, ema_momentum_end=d.ema_momentum_end,
    )


def coach_layer_map(init_summary: dict) -> list[int] | None:
    """Student layer -> layer of the model the distill stage trains against, from the init stage's
    record: the teacher's layers, or, after a progressive init, the assistant's (the init stage
    records layers of the original teacher, and the assistant's own map to them)."""
    to_teacher = init_summary.get("layer_map")
    chain = init_summary["progressive"]
    if to_teacher is None or not chain:
        return to_teacher
    assistant_to_teacher = chain[-1]["layer_map"]
    return [assistant_to_teacher.index(t) for t in to_teacher]


_MAPS = ("layer_map", "head_map", "hidden_channels")


def coach_maps(init_summary: dict) -> dict:
    """The init stage's cut (layer, head and channel maps) in units of the model the distill stage
    trains against: the teacher's as recorded, or, after a progressive init, the assistant's.
    A record without head and channel maps (an init from before they were recorded) gives None
    for them, and the losses fall back to grouped heads and random projections."""
    chain = init_summary["progressive"]
    coach = chain[-1] if chain else None
    if not all(record.get(k) is not None for record in [init_summary, *chain[-1:]] for k in _MAPS):
        return {"layer_map": coach_layer_map(init_summary), "head_map": None, "hidden_channels": None}
    if coach is None:
        return {k: init_summary[k] for k in _MAPS}
    return Lineage(*(init_summary[k] for k in _MAPS)).relative_to(Lineage(*(coach[k] for k in _MAPS)))


def logit_cache_dir(cfg) -> Path:
    """Outside the stage folders (OUT/.stages/<stage>-<key>), which a changed config replaces: the
    teacher's logits outlive any one build of OUT, for every later build, target and student that
    trains on the same rows with the same teacher. Shards are keyed by content, so sharing is safe."""
    return Path(cfg.out) / ".cache" / "teacher-logits"


def tokenizer_fingerprint(tok) -> str:
    """What the token ids mean: the vocabulary and its special tokens (a key part of the logit cache)."""
    vocab = sorted(tok.get_vocab().items())
    special = sorted(map(str, tok.all_special_tokens))
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()


def extra_teachers(cfg, tok, vocab_size: int) -> list:
    """The ensemble's other teachers (distill.teachers), resolved, checked and loaded like the
    build's own teacher (float32, or cfg.teacher_bits); refused unless each shares `tok`, the build
    teacher's tokenizer, and its logits' width `vocab_size`."""
    from edgedistill import teacher as teacher_mod
    from edgedistill.distill.modes import check_shared_tokenizer

    models = []
    for spec in cfg.distill.teachers:
        src = teacher_mod.resolve(spec)
        teacher_mod.check_files(src)
        teacher_mod.check_memory(teacher_mod.describe(src, cfg.trust_remote_code)["params"], cfg.teacher_bits)
        model, own = teacher_mod.load(src, bits=cfg.teacher_bits, trust_remote_code=cfg.trust_remote_code)
        check_shared_tokenizer([(cfg.teacher, tok), (spec, own)])
        if model.config.vocab_size != vocab_size:
            raise UserError(f"teachers {cfg.teacher!r} and {spec!r} share a tokenizer but not a vocabulary width "
                            f"({vocab_size} and {model.config.vocab_size} logits): their distributions cannot be averaged")
        models.append(model)
    return models


def run(ctx) -> dict:
    cfg, d = ctx.cfg, ctx.cfg.distill
    teacher, tok = ctx.session.teacher(ctx["teacher"])
    student = load_student(ctx["init"].path("student"))
    # A progressive init leaves its last intermediate student: the closest model to train against.
    # The earlier stages have spent their shares of the step budget; this stage gets the last share.
    chain = ctx["init"].summary["progressive"]
    trains_against = "assistant" if chain else "teacher"
    coach = load_student(ctx["init"].path("assistant")) if chain else teacher
    if d.teachers:  # never with a progressive chain: the config refuses the two together
        coach, trains_against = [teacher, *extra_teachers(cfg, tok, teacher.config.vocab_size)], "ensemble"
    if d.mode != "white_box":  # no teacher runs in training: the answers' text, or the student's own EMA
        coach, trains_against = None, {"black_box": "teacher's text", "self": "student's EMA"}[d.mode]
    steps = split_steps(d.steps, len(chain) + 1)[-1]
    if chain:
        ctx.console.print(f"  progressive stage {len(chain) + 1} of {len(chain) + 1}: distill {steps} of {d.steps} "
                          f"steps against the assistant (intermediate {len(chain)})")
    train = read_jsonl(ctx["data"].path("train_tokens.jsonl"))
    heldout = heldout_examples(read_jsonl(ctx["data"].path("heldout_tokens.jsonl")), cfg.eval.max_examples)
    qat = qat_spec(cfg, ctx["plan"].summary["student"])

    # under a multi-process launch every process trains (DDP) and the main one alone measures and writes
    main = processes.is_main()
    if main:
        targets = ctx.session.teacher_targets(ctx["teacher"], heldout)
        quality = {"teacher": evaluate(teacher, targets, heldout, by_category=True),
                   "student_init": evaluate(student, targets, heldout, by_category=True)}
    maps = coach_maps(ctx["init"].summary)
    run_cfg = train_config(d, steps, qat, cfg.seed, maps.pop("layer_map"), **maps)
    result = distill(student, coach, train, run_cfg, ctx.dir, resume=ctx.session.resume,
                     progress=ctx.session.progress, cache_dir=logit_cache_dir(cfg),
                     cache_extra={"tokenizer": tokenizer_fingerprint(tok)} if d.logit_cache else None)
    if not main:
        return {}
    rounds = None
    if d.refine_rounds:  # one process only: the build refuses --refine under a multi-process launch
        quality["student"], rounds = refine_student(ctx, student, coach, teacher, tok, train, heldout, run_cfg,
                                                    quality, targets)
    else:
        quality["student"] = evaluate(student, targets, heldout, by_category=True)
    learned = learned_scales(student, remove=True)
    student.save_pretrained(ctx.dir / "student")
    tok.save_pretrained(ctx.dir / "student")
    if learned and result["qat_ran"]:  # scales that never trained would not fit the final weights
        save_learned_scales(ctx.dir / "student", learned)
    mode = {"mode": d.mode} | ({"teachers": [cfg.teacher, *d.teachers]} if d.teachers else {})
    if rounds is not None:
        mode["refine"] = rounds
    return {"train": result, "quality": quality, "qat": qat.to_dict() if qat else None, "teacher_for_training": trains_against,
            "params": sum(p.numel() for p in student.parameters()), **mode}


def refine_student(ctx, student, coach, teacher, tok, train: list[dict], heldout: list[dict], run_cfg: TrainConfig,
                   quality: dict, targets: list) -> tuple[dict, dict]:
    """--refine N (distill/refine.py) on the trained student: (its final quality, the rounds' record)."""
    import dataclasses

    from edgedistill.distill import refine

    cfg, d = ctx.cfg, ctx.cfg.distill
    first = evaluate(student, targets, heldout, by_category=True)
    steps = d.refine_steps or max(1, d.steps // 2)
    train_records = read_jsonl(ctx["data"].path("train.jsonl"))

    def prepare(r: int, weak: list[str]) -> refine.RoundData:
        return refine.round_data(teacher, tok, d, cfg.data, round_=r, seed=cfg.seed, weak=weak,
                                 train_records=train_records, train_tokens=train, folder=ctx.dir / f"refine-{r}",
                                 batch_size=cfg.data.gen_batch_size)

    def train_round(r: int, examples: list[dict]) -> dict:
        # fake-quant from the first step: the student has finished its QAT; a new seed packs new rows
        round_cfg = dataclasses.replace(run_cfg, steps=steps, qat_start_step=0, seed=cfg.seed + r,
                                        warmup_steps=min(run_cfg.warmup_steps, steps))
        return distill(student, coach, examples, round_cfg, ctx.dir / f"refine-{r}", resume=ctx.session.resume,
                       progress=ctx.session.progress, cache_dir=logit_cache_dir(cfg),
                       cache_extra={"tokenizer": tokenizer_fingerprint(tok)} if d.logit_cache else None)

    final, records = refine.run_rounds(
        student, first=first, teacher_quality=quality["teacher"], rounds=d.refine_rounds,
        collapse_ratio=cfg.eval.collapse_ratio, n_weak=d.refine_categories, prepare=prepare, train=train_round,
        measure=lambda: evaluate(student, targets, heldout, by_category=True),
        eligible=refine.answerable(train_records), console=ctx.console)
    for r in range(1, d.refine_rounds + 1):  # the rounds' training checkpoints are done with
        for ckpt in (ctx.dir / f"refine-{r}").glob("ckpt*"):
            shutil.rmtree(ckpt, ignore_errors=True)
    return final, {"rounds": records, "steps_per_round": steps,
                   "table": refine.summary_table(first, quality["teacher"], records)}
