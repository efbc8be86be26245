"""Progressive compression: the init stage walks a chain of intermediate students, the distill stage
trains against the last of them, and the report shows every stage's quality."""

from __future__ import annotations

import random

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from edgedistill import progressive, report
from edgedistill.config import resolve
from edgedistill.data.teacher_answers import write_jsonl
from edgedistill.distill import stage as distill_stage
from edgedistill.errors import UserError
from edgedistill.measure.quality import evaluate, teacher_targets
from edgedistill.pipeline import Record, Session, Stage, run_stage
from edgedistill.progressive import split_steps
from edgedistill.prune import run as init_run
from edgedistill.targets import load_target

# The tiny teacher is 4 layers x 64 (inter 128, heads 4/2, head_dim 16). Two intermediates, then the plan.
CHAIN = [dict(layers=3, hidden=64, intermediate=96, heads=4, kv_heads=2),
         dict(layers=3, hidden=32, intermediate=64, heads=2, kv_heads=1)]
FINAL = dict(layers=2, hidden=32, intermediate=64, heads=2, kv_heads=1)
STEPS, BATCH, SEQ = 7, 2, 16  # 7 steps over 3 stages: 2, 2 and the remainder, 3, for the final distill

INIT = Stage("init", init_run, after={"teacher": None, "data": None, "plan": "student"})
DISTILL = Stage("distill", distill_stage.run, after={"teacher": None, "init": None, "data": None, "plan": "student"})


def _shape(s: dict, vocab: int) -> dict:
    return {**s, "head_dim": 16, "vocab": vocab, "tied": True}


def _examples(n: int, vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, answer = rng.randint(4, 10), rng.randint(6, 14)
        out.append({"input_ids": [rng.randrange(vocab) for _ in range(prompt + answer)],
                    "loss_mask": [0] * prompt + [1] * answer})
    return out


class Build:
    """The upstream records the init and distill stages read, for a tiny teacher and a given chain."""

    def __init__(self, root, teacher_dir, chain: list[dict], resume: bool = False):
        self.teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(teacher_dir)
        vocab = self.teacher.config.vocab_size
        data = root / "data"
        self.heldout = _examples(4, vocab, seed=2)
        write_jsonl(data / "train_tokens.jsonl", _examples(12, vocab, seed=1))
        write_jsonl(data / "heldout_tokens.jsonl", self.heldout)
        cfg = resolve({"out": str(root / "out"), "seed": 0, "plan": {"calibration_examples": 4},
                       "distill": {"steps": STEPS, "batch_size": BATCH, "seq_len": SEQ, "warmup_steps": 1,
                                   "checkpoint_every": 1},
                       "eval": {"max_examples": 4}})
        self.session = Session(cfg, Console(quiet=True), resume=resume, progress=False)
        self.session._teacher = (self.teacher, self.tok)
        self.target = load_target("phone-4gb")
        plan = {"student": {"shape": _shape(FINAL, vocab), "context": 64, "qat_format": None,
                            "progressive": [_shape(s, vocab) for s in chain]}}
        self.records = {"teacher": Record("teacher", "t", root, {}, "t"),
                        "data": Record("data", "d", data, {}, "d"),
                        "plan": Record("plan", "p", root, plan, "p")}

    def run(self, stage: Stage) -> Record:
        self.records[stage.name] = run_stage(stage, self.session, self.target, self.records)
        return self.records[stage.name]


def _spy(monkeypatch, module, calls: list):
    """Wrap `module.distill`, recording (the model trained against, its steps, the run's figures)."""
    real = module.distill

    def spy(student, teacher, examples, cfg, workdir, **kw):
        result = real(student, teacher, examples, cfg, workdir, **kw)
        calls.append((teacher.config, cfg.steps, result))
        return result
    monkeypatch.setattr(module, "distill", spy)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_teacher_dir):
    with pytest.MonkeyPatch.context() as mp:
        calls, scored_against = [], []
        _spy(mp, distill_stage, calls)
        real_targets = progressive.teacher_targets
        mp.setattr(progressive, "teacher_targets",
                   lambda model, ex: scored_against.append(model.config.num_hidden_layers) or real_targets(model, ex))
        b = Build(tmp_path_factory.mktemp("progressive"), tiny_teacher_dir, CHAIN)
        init, distilled = b.run(INIT), b.run(DISTILL)
    return b, init, distilled, calls, scored_against


def test_split_steps_keeps_the_total_and_needs_a_step_per_stage():
    assert split_steps(7, 3) == [2, 2, 3] and split_steps(60, 1) == [60] and sum(split_steps(61, 4)) == 61
    with pytest.raises(UserError, match="at least 3 distill steps"):
        split_steps(2, 3)


def test_each_intermediate_is_distilled_and_scored_against_the_original_teacher(built):
    b, init, _, _, scored_against = built
    stages = init.summary["progressive"]
    assert [s["shape"]["layers"] for s in stages] == [3, 3] and [s["shape"]["hidden"] for s in stages] == [64, 32]
    assert [s["steps"] for s in stages] == [2, 2] and all(s["tokens"] == 2 * BATCH * SEQ for s in stages)
    assert stages[0]["params"] > stages[1]["params"] > init.summary["params"]
    # every stage is scored against the original teacher, not against the intermediate it learned from
    assert scored_against == [4]
    assistant = distill_stage.load_student(init.path("assistant"))
    again = evaluate(assistant, teacher_targets(b.teacher, b.heldout), b.heldout)
    assert stages[-1]["quality"] == pytest.approx(again, rel=1e-3, abs=1e-6)


def test_final_student_has_the_planned_shape_and_maps_to_original_teacher_layers(built):
    _, init, _, _, _ = built
    student = AutoModelForCausalLM.from_pretrained(init.path("student"))
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
            c.num_key_value_heads) == tuple(FINAL.values())
    assistant = AutoModelForCausalLM.from_pretrained(init.path("assistant")).config
    assert (assistant.num_hidden_layers, assistant.hidden_size, assistant.num_attention_heads) == (3, 32, 2)
    first = init.summary["progressive"][0]["layer_map"]
    assert len(first) == 3 and first[0] == 0 and first[-1] == 3
    # the student keeps the assistant's first and last layers, i.e. teacher layers 0 and 3 (not 0 and 2)
    assert init.summary["layer_map"] == [0, 3]
    assert not list(init.dir.glob("ckpt*")), "stage checkpoints are dropped once init is complete"


def test_distill_trains_against_the_assistant_for_the_last_share(built):
    _, _, distilled, calls, _ = built
    assert distilled.summary["teacher_for_training"] == "assistant"
    (trained_against, steps, _), = calls
    assert (trained_against.num_hidden_layers, trained_against.hidden_size) == (3, 32) and steps == 3
    assert distilled.summary["train"]["steps"] == 3
    # quality is still measured against the original teacher: it agrees with itself everywhere
    assert distilled.summary["quality"]["teacher"]["top1_agreement"] == 1.0


def test_report_has_a_per_stage_table_only_when_progressive(built, tmp_path):
    b, init, distilled, _, _ = built
    teacher = {"params": sum(p.numel() for p in b.teacher.parameters()), "config": b.teacher.config.to_dict()}
    plan = {"shape": b.records["plan"].summary["student"]["shape"]}
    stages = report.progressive_stages(teacher, init.summary, distilled.summary, plan)
    assert [s["stage"] for s in stages] == ["teacher", "intermediate 1", "intermediate 2", "student"]
    assert [s["steps"] for s in stages] == [None, 2, 2, 3] and stages[0]["shape"]["layers"] == 4
    assert stages[-1]["quality"] == distilled.summary["quality"]["student"]
    report.write_reports({"target": "phone-4gb", "progressive": stages}, tmp_path / "p")
    md, page = (tmp_path / "p" / "report.md").read_text(), (tmp_path / "p" / "report.html").read_text()
    assert "## Progressive compression" in md and "| intermediate 2 |" in md
    assert "<h2>Progressive compression</h2>" in page and "<td>intermediate 1</td>" in page

    assert report.progressive_stages(teacher, {**init.summary, "progressive": []}, distilled.summary, plan) == []
    report.write_reports({"target": "phone-4gb", "progressive": []}, tmp_path / "one")
    assert "Progressive" not in (tmp_path / "one" / "report.md").read_text()
    assert "Progressive" not in (tmp_path / "one" / "report.html").read_text()


def test_without_a_chain_init_cuts_from_the_teacher_and_distill_gets_every_step(tmp_path, tiny_teacher_dir,
                                                                                 monkeypatch):
    calls = []
    _spy(monkeypatch, progressive, calls)
    b = Build(tmp_path, tiny_teacher_dir, [])
    init = b.run(INIT)
    assert init.summary["progressive"] == [] and calls == [] and not init.path("assistant").exists()
    assert init.summary["layer_map"] == [0, 3]
    distilled = b.run(DISTILL)
    assert distilled.summary["teacher_for_training"] == "teacher" and distilled.summary["train"]["steps"] == STEPS


class Crash(Exception):
    pass


def test_resume_restores_finished_stages_instead_of_training_them_again(tmp_path, tiny_teacher_dir, monkeypatch):
    real = progressive.distill

    def crash_in_stage_2(student, teacher, examples, cfg, workdir, **kw):
        if workdir.name.endswith("-2"):
            raise Crash
        return real(student, teacher, examples, cfg, workdir, **kw)
    monkeypatch.setattr(progressive, "distill", crash_in_stage_2)
    with pytest.raises(Crash):
        Build(tmp_path, tiny_teacher_dir, CHAIN).run(INIT)

    monkeypatch.setattr(progressive, "distill", real)
    calls = []
    _spy(monkeypatch, progressive, calls)
    init = Build(tmp_path, tiny_teacher_dir, CHAIN, resume=True).run(INIT)
    assert [c[2]["resumed_from"] for c in calls] == [2, 0]  # stage 1 came back from its checkpoint
    assert [s["steps"] for s in init.summary["progressive"]] == [2, 2]


def test_cli_flag_and_config_fields(monkeypatch):
    from edgedistill import cli

    seen = []
    monkeypatch.setattr("edgedistill.build.build", lambda cfg, **kw: seen.append(cfg) or 0)
    for args in (["--progressive"], ["--no-progressive"], [], ["--progressive", "--progressive-ratio", "3"]):
        res = CliRunner().invoke(cli.app, ["build", *args])
        assert res.exit_code == 0, res.output
    assert [c.plan.progressive for c in seen] == [True, False, False, True]
    assert seen[0].plan.progressive_ratio == 2.0 and seen[3].plan.progressive_ratio == 3.0
    with pytest.raises(UserError, match="progressive_ratio"):
        resolve({"plan": {"progressive_ratio": 1.0}})


def test_each_intermediate_trains_with_the_maps_of_its_own_cut(tmp_path, tiny_teacher_dir, monkeypatch):
    """An intermediate is compared with the model it was cut from at the layers, heads and channels it
    was cut from, not at evenly spaced layers; the stage records compose them into teacher units."""
    cuts, configs = [], []
    real_cut = progressive.cut

    def cut(*args):
        student, info = real_cut(*args)
        cuts.append(info)
        return student, info

    def distill(student, teacher, examples, cfg, workdir, **kw):  # what it was asked to do, no training
        configs.append(cfg)
        return {"steps": cfg.steps, "tokens": 0}
    monkeypatch.setattr(progressive, "cut", cut)
    monkeypatch.setattr(progressive, "distill", distill)
    init = Build(tmp_path, tiny_teacher_dir, CHAIN).run(INIT)
    assert len(configs) == len(cuts) == 2
    for cfg, info in zip(configs, cuts):
        assert cfg.layer_map == info["layer_map"] and cfg.head_map == info["head_map"]
        assert cfg.hidden_channels == info["hidden_channels"]
    first, second = init.summary["progressive"]
    assert first["head_map"] == cuts[0]["head_map"] and first["hidden_channels"] == cuts[0]["hidden_channels"]
    assert second["layer_map"] == [cuts[0]["layer_map"][j] for j in cuts[1]["layer_map"]]
    assert second["head_map"] == [[cuts[0]["head_map"][j][h] for h in heads]
                                  for j, heads in zip(cuts[1]["layer_map"], cuts[1]["head_map"])]
    assert second["hidden_channels"] == [cuts[0]["hidden_channels"][c] for c in cuts[1]["hidden_channels"]]


def test_distill_maps_are_the_final_cut_in_the_assistants_units(built):
    """coach_maps undoes the init stage's composition into teacher units: the student's weights are
    exactly the assistant's at the mapped layers, heads and channels."""
    _, init, _, _, _ = built
    maps = distill_stage.coach_maps(init.summary)
    assert maps["layer_map"] == distill_stage.coach_layer_map(init.summary)
    student = distill_stage.load_student(init.path("student"))
    assistant = distill_stage.load_student(init.path("assistant"))
    hd, hid = 16, maps["hidden_channels"]
    for i, j in enumerate(maps["layer_map"]):
        s_q, a_q = student.model.layers[i].self_attn.q_proj.weight, assistant.model.layers[j].self_attn.q_proj.weight
        for h, a in enumerate(maps["head_map"][i]):
            assert torch.equal(s_q[h * hd:(h + 1) * hd], a_q[a * hd:(a + 1) * hd][:, hid])
    # a record from before head and channel maps existed still trains, with the fallbacks
    old = {k: v for k, v in init.summary.items() if k not in ("head_map", "hidden_channels")}
    assert distill_stage.coach_maps(old) == {"layer_map": maps["layer_map"], "head_map": None,
                                             "hidden_channels": None}
