"""The stage runner on toy stages: cache keys, reuse, invalidation, partial folders, resume."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from edgedistill.config import resolve
from edgedistill.pipeline import Session, Stage, run_stage, run_target
from edgedistill.targets import load_target

CALLS: list[str] = []


def _write(name):
    def run(ctx):
        CALLS.append(name)
        up = {n: r.summary for n, r in ctx.upstream.items()}
        (ctx.dir / f"{name}.txt").write_text(json.dumps({"steps": ctx.cfg.distill.steps, "up": up}))
        return {"value": ctx.cfg.distill.steps if name == "b" else 1}
    return run


A = Stage("a", _write("a"), after={}, reads=("seed",))
B = Stage("b", _write("b"), after={"a": None}, reads=("distill.steps",))
C = Stage("c", _write("c"), after={"b": "value"}, reads=())


@pytest.fixture
def session(tmp_path):
    CALLS.clear()
    return lambda **over: Session(resolve({"out": str(tmp_path), **over}), Console(quiet=True))


def test_second_run_is_cached_and_a_changed_field_reruns_only_what_reads_it(session):
    target = load_target("phone-4gb")
    run_target([A, B, C], session(), target)
    assert CALLS == ["a", "b", "c"]
    CALLS.clear()
    run_target([A, B, C], session(), target)
    assert CALLS == []
    run_target([A, B, C], session(distill={"steps": 7}), target)
    assert CALLS == ["b", "c"]  # a does not read distill.steps; c depends on b's changed summary


def test_a_missing_output_makes_the_stage_run_again(session, tmp_path):
    target = load_target("phone-4gb")
    recs = run_target([A, B], session(), target)
    (recs["b"].dir / "b.txt").unlink()
    CALLS.clear()
    again = run_target([A, B], session(), target)
    assert CALLS == ["b"] and (again["b"].dir / "b.txt").is_file()


def test_partial_folders_are_discarded_without_resume_and_kept_with_it(session, tmp_path):
    target = load_target("phone-4gb")

    def crash(ctx):
        (ctx.dir / "ckpt").mkdir(exist_ok=True)
        (ctx.dir / "ckpt" / "state").write_text("step 3")
        raise KeyboardInterrupt

    def finish(ctx):
        seen = (ctx.dir / "ckpt" / "state").read_text() if (ctx.dir / "ckpt" / "state").exists() else None
        (ctx.dir / "out.txt").write_text("done")
        return {"resumed_from": seen}

    s = session()
    with pytest.raises(KeyboardInterrupt):
        run_stage(Stage("t", crash, after={}), s, target, {})
    assert list(tmp_path.glob(".stages/t-*.partial"))
    resumed = session()
    resumed.resume = True
    rec = run_stage(Stage("t", finish, after={}), resumed, target, {})
    assert rec.summary["resumed_from"] == "step 3"
    assert not list(tmp_path.glob(".stages/*.partial"))
    assert not (rec.dir / "ckpt").exists(), "checkpoints are dropped once the stage is complete"


def test_user_prompt_file_contents_are_part_of_the_data_key(tmp_path):
    from edgedistill.stages import _prompt_files_identity

    f = tmp_path / "mine.jsonl"
    f.write_text('{"prompt": "one"}\n')
    cfg = resolve({"data": {"prompts": [str(f)]}})
    before = _prompt_files_identity(cfg)
    f.write_text('{"prompt": "two"}\n')
    assert _prompt_files_identity(cfg) != before


def test_a_new_preset_on_a_replayed_config_takes_effect():
    quick = resolve({"preset": "quick"}).model_dump(mode="json")
    full = resolve({"preset": "full"}, base=quick)
    assert full.preset == "full" and full.distill.steps == resolve({"preset": "full"}).distill.steps
    same = resolve({}, base=quick)
    assert same.distill.steps == resolve({"preset": "quick"}).distill.steps
