"""The teacher logit cache (distill/logit_cache.py): built once, reused, keyed by what changes its
values, never trusted half-written, and training from it matches training with the online teacher."""

from __future__ import annotations

import json
import struct
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama
from edgedistill.distill import logit_cache
from edgedistill.distill.losses import LossSpec

SEQ_LEN = 24
TOP_K = 16


class CountingTeacher(torch.nn.Module):
    """The teacher as it is, counting its forward calls (what the cache is meant to save)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.calls = inner, inner.config, 0

    def forward(self, **kwargs):
        self.calls += 1
        return self.inner(**kwargs)


@pytest.fixture(scope="module")
def tiny_pair(tiny_teacher_dir, tokenizer_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    student_dir = make_tiny_llama(tmp_path_factory.mktemp("student"), tokenizer_dir, layers=2, hidden=32,
                                  intermediate=64, heads=2, kv_heads=1, seed=1)
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # noqa: E731
    teacher = load(tiny_teacher_dir)
    with torch.no_grad():  # sharper than a random init's near-uniform predictions
        teacher.model.norm.weight.mul_(8.0)
    return teacher, lambda: load(student_dir)


@pytest.fixture(scope="module")
def examples(tiny_pair):
    """A few examples of different lengths, so that the packed rows (and so the shards) differ."""
    teacher, _ = tiny_pair
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (11, 17, 29, 8, 23):
        ids = torch.randint(0, teacher.config.vocab_size, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "loss_mask": [0] * 3 + [1] * (n - 3)})
    return out


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(logit_cache, "SHARD_ROWS", 4)  # 12 rows -> 3 shards: batches cross shard edges


def run_cfg(**overrides):
    from edgedistill.distill.trainer import TrainConfig

    settings = dict(steps=6, batch_size=2, seq_len=SEQ_LEN, lr=1e-2, warmup_steps=1, alpha=0.7, checkpoint_every=100,
                    loss=LossSpec(top_k=TOP_K), logit_cache=True)
    return TrainConfig(**{**settings, **overrides})


def train(student, teacher, examples, workdir: Path, cache_dir: Path | None, **kwargs):
    from edgedistill.distill.trainer import distill

    cfg_overrides = {} if cache_dir is not None else {"logit_cache": False}
    resume_args = {k: kwargs.pop(k) for k in ("resume", "stop_after") if k in kwargs}
    return distill(student, teacher, examples, run_cfg(**cfg_overrides, **kwargs), workdir, progress=False,
                   cache_dir=cache_dir, **resume_args)


# ---------------------------------------------------------------- reuse and keys


def test_cache_is_written_once_and_reused_without_running_the_teacher(tiny_pair, examples, tmp_path, small_shards):
    teacher, new_student = tiny_pair
    counting = CountingTeacher(teacher)
    first = train(new_student(), counting, examples, tmp_path / "a", tmp_path / "cache")
    assert counting.calls == 6  # 12 rows in batches of 2, once each, and none during training
    figures = first["logit_cache"]
    assert (figures["shards"], figures["shards_built"], figures["shards_reused"]) == (3, 3, 0)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 3

    counting.calls = 0
    second = train(new_student(), counting, examples, tmp_path / "b", tmp_path / "cache")
    assert counting.calls == 0
    assert (second["logit_cache"]["shards_built"], second["logit_cache"]["shards_reused"]) == (0, 3)
    assert second["logit_cache"]["build_seconds"] == 0.0
    assert second["loss_curve"] == first["loss_curve"]


def fresh_cache(teacher, ids, root, positions=None, **overrides):
    settings = dict(k=4, temperature=2.0, precision="no", batch_size=2, autocast=nullcontext)
    if positions is None:  # each row one whole example
        positions = torch.arange(ids.shape[1]).expand_as(ids)
    return logit_cache.prepare(teacher, ids, positions, root, **{**settings, **overrides})


def test_key_changes_with_data_teacher_k_temperature_and_tokenizer(tiny_pair, tmp_path):
    teacher, _ = tiny_pair
    ids = torch.randint(0, teacher.config.vocab_size, (3, 8), generator=torch.Generator().manual_seed(1))
    base, stats = fresh_cache(teacher, ids, tmp_path)
    again, _ = fresh_cache(teacher, ids, tmp_path)
    assert again.paths == base.paths
    other_data = ids.clone()
    other_data[2, 5] = (other_data[2, 5] + 1) % teacher.config.vocab_size
    changed = {
        "data": fresh_cache(teacher, other_data, tmp_path)[0],
        # the same tokens packed differently: an example boundary inside the last row
        "boundaries": fresh_cache(teacher, ids, tmp_path, torch.tensor([list(range(8))] * 2 + [[0, 1, 2, 0, 1, 2, 3, 4]]))[0],
        "k": fresh_cache(teacher, ids, tmp_path, k=5)[0],
        "temperature": fresh_cache(teacher, ids, tmp_path, temperature=1.0)[0],
        "tokenizer": fresh_cache(teacher, ids, tmp_path, extra={"tokenizer": "another"})[0],
        "precision": fresh_cache(teacher, ids, tmp_path, precision="bf16")[0],
    }
    other_teacher = make_teacher_copy(teacher)
    with torch.no_grad():
        other_teacher.model.norm.weight[0] += 1e-3
    changed["teacher"] = fresh_cache(other_teacher, ids, tmp_path)[0]
    for what, cache in changed.items():
        assert cache.paths != base.paths, what
    # the settings key names the folder: only the data's changes stay in the same one
    rows_changed = ("data", "boundaries")
    assert all(changed[w].paths[0].parent == base.paths[0].parent for w in rows_changed)
    assert all(c.paths[0].parent != base.paths[0].parent for w, c in changed.items() if w not in rows_changed)


def make_teacher_copy(teacher):
    import copy

    return copy.deepcopy(teacher)


def test_a_longer_run_reuses_the_shards_of_a_shorter_one(tiny_pair, tmp_path):
    teacher, _ = tiny_pair
    ids = torch.randint(0, teacher.config.vocab_size, (10, 8), generator=torch.Generator().manual_seed(2))
    fresh_cache(teacher, ids[:8], tmp_path, shard_rows=4)
    _, stats = fresh_cache(teacher, ids, tmp_path, shard_rows=4)
    assert (stats["shards"], stats["shards_reused"], stats["shards_built"]) == (3, 2, 1)


# ---------------------------------------------------------------- killed writes


class FailingTeacher(CountingTeacher):
    def __init__(self, inner, fail_at: int):
        super().__init__(inner)
        self.fail_at = fail_at

    def forward(self, **kwargs):
        if self.calls + 1 == self.fail_at:
            raise KeyboardInterrupt("killed mid-shard")
        return super().forward(**kwargs)


def trusted_shards(root: Path) -> list[Path]:
    return [p for p in root.rglob(f"*{logit_cache.SUFFIX}") if not p.name.startswith(".")]


def test_a_run_killed_mid_shard_leaves_no_trusted_shard(tiny_pair, tmp_path):
    teacher, _ = tiny_pair
    ids = torch.randint(0, teacher.config.vocab_size, (4, 8), generator=torch.Generator().manual_seed(3))
    with pytest.raises(KeyboardInterrupt):  # the second of the shard's two teacher batches
        fresh_cache(FailingTeacher(teacher, fail_at=2), ids, tmp_path)
    assert trusted_shards(tmp_path) == []
    _, stats = fresh_cache(teacher, ids, tmp_path)
    assert stats["shards_built"] == 1


def test_a_write_killed_halfway_leaves_no_trusted_shard(tiny_pair, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    teacher, _ = tiny_pair
    ids = torch.randint(0, teacher.config.vocab_size, (4, 8), generator=torch.Generator().manual_seed(4))

    def half_then_die(tensors, path, metadata=None):
        save_file(tensors, path, metadata=metadata)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError("killed while writing")

    monkeypatch.setattr(logit_cache, "save_file", half_then_die)
    with pytest.raises(OSError, match="killed"):
        fresh_cache(teacher, ids, tmp_path)
    assert trusted_shards(tmp_path) == [] and list(tmp_path.rglob("*.partial")) == []
    monkeypatch.undo()
    cache, stats = fresh_cache(teacher, ids, tmp_path)
    assert stats["shards_built"] == 1 and cache.rows(torch.tensor([3]))[0].shape == (1, 8, 4)


# ---------------------------------------------------------------- figures by hand


class TableTeacher(torch.nn.Module):
    """Next-token logits looked up from the current token: a teacher whose outputs are known."""

    def __init__(self, probabilities: list[list[float]]):
        from transformers import PretrainedConfig

        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(probabilities).log())
        self.config = PretrainedConfig(vocab_size=len(probabilities[0]))

    def forward(self, input_ids, **_):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_bytes_per_token_and_mass_kept_by_hand(tmp_path):
    teacher = TableTeacher([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    ids = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 1]])  # 8 positions: five of token 0, three of token 1
    cache, stats = fresh_cache(teacher, ids, tmp_path, k=2, temperature=1.0)
    # top 2 of token 0's row keep 0.5 + 0.3, of token 1's 0.25 + 0.25
    assert stats["mass_kept"] == pytest.approx((5 * 0.8 + 3 * 0.5) / 8, abs=1e-6)
    # per position: 2 int32 ids + 2 float32 log-probs + 1 float32 tail = 20 bytes; plus the file's
    # header (8 bytes of length, then the JSON) shared by the 8 positions
    raw = cache.paths[0].read_bytes()
    header = 8 + struct.unpack("<Q", raw[:8])[0]
    assert logit_cache.payload_bytes_per_token(2) == 20 and len(raw) == header + 8 * 20
    assert stats["bytes_per_token"] == pytest.approx((header + 8 * 20) / 8, abs=0.01)
    top_ids, top, tail = cache.rows(torch.tensor([1]))
    assert top_ids[0, 0].tolist() == [0, 1] and top[0, 0].exp().tolist() == pytest.approx([0.5, 0.3])
    assert tail[0, 0].exp().item() == pytest.approx(0.2)


# ---------------------------------------------------------------- training from the cache


def test_training_from_the_cache_matches_online_top_k(tiny_pair, examples, tmp_path, small_shards):
    teacher, new_student = tiny_pair
    online_student, cached_student = new_student(), new_student()
    online = train(online_student, teacher, examples, tmp_path / "online", None)
    cached = train(cached_student, teacher, examples, tmp_path / "cached", tmp_path / "cache")
    assert "logit_cache" not in online
    assert cached["loss_curve"] == pytest.approx(online["loss_curve"], abs=2e-4)
    assert cached["loss_parts"]["soft"] == pytest.approx(online["loss_parts"]["soft"], rel=2e-3)
    a, b = online_student.state_dict(), cached_student.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_resume_with_the_cache_is_bit_identical(tiny_pair, examples, tmp_path, small_shards):
    teacher, new_student = tiny_pair
    straight = new_student()
    full = train(straight, teacher, examples, tmp_path / "a", tmp_path / "cache", checkpoint_every=3)
    first = train(new_student(), teacher, examples, tmp_path / "b", tmp_path / "cache", checkpoint_every=3,
                  stop_after=4)
    assert first["steps"] == 4
    resumed = new_student()
    second = train(resumed, teacher, examples, tmp_path / "b", tmp_path / "cache", checkpoint_every=3, resume=True)
    assert second["resumed_from"] == 3 and second["loss_curve"] == full["loss_curve"]
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- config


def test_cache_switch_leaves_the_default_config_hash_alone_and_needs_top_k(tiny_pair, examples, tmp_path):
    from edgedistill.config import dump_toml, resolve
    from edgedistill.distill.stage import train_config
    from edgedistill.errors import UserError

    default = resolve({})
    assert "logit_cache" not in default.model_dump(mode="json")["distill"] and "logit_cache" not in dump_toml(default)
    on = resolve({"distill": {"logit_cache": True, "loss": {"top_k": 32}}})
    assert on.section_hash("distill") != default.section_hash("distill")
    assert train_config(on.distill, 10, None, 0).logit_cache is True
    with pytest.raises(UserError, match="top_k"):
        resolve({"distill": {"logit_cache": True}})
    teacher, new_student = tiny_pair
    with pytest.raises(ValueError, match="top_k"):
        train(new_student(), teacher, examples, tmp_path, tmp_path / "cache", loss=LossSpec())


def test_schema_documents_every_cache_figure(tmp_path):
    """report.json's training section carries these figures, and every key must be documented."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "report-schema.md").read_text()
    _, stats = fresh_cache(TableTeacher([[0.5, 0.5]]), torch.zeros(1, 2, dtype=torch.long), tmp_path, k=1)
    assert [name for name in stats if f"`training.logit_cache.{name}`" not in doc] == []
    assert json.loads(json.dumps(stats)) == stats  # plain JSON values
