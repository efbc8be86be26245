"""Property-based tests: the profile and config loaders and `edgedistill inspect`, fed mutated files, give
a UserError (one line, naming the file) or a valid result; never another exception, never a hang."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgedistill.config import BuildConfig, dump_toml, load_file, resolve
from edgedistill.errors import UserError
from edgedistill.inspect import describe_artifact
from edgedistill.targets import TARGETS_DIR, TargetProfile, builtin_names, load_target

# derandomize: CI sees the same examples every run; deadline off: the alarm below is the time limit, and
# it also stops a loader that never returns, which hypothesis' deadline cannot.
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LIMIT_S = 5.0  # each example; a loader that needs longer on a 16 KB file is looping
pytestmark = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="the time limit needs SIGALRM (POSIX)")


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float = LIMIT_S):
    """Fail a block that runs longer than `seconds`, even one whose code turns every exception into another."""
    fired = []

    def stop(signum, frame):
        fired.append(signum)
        raise Hang(f"no answer within {seconds:g} s")

    old = signal.signal(signal.SIGALRM, stop)
    # Repeats: an exception raised while a gc callback runs is printed and dropped, not propagated.
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.5)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if fired:  # also when a broad `except` turned the Hang into a UserError
            raise Hang(f"no answer within {seconds:g} s")


def clear_or_result(load, path: Path):
    """The property: `load(path)` returns, or raises a one-line UserError naming the file."""
    with time_limit():
        try:
            return load(path)
        except UserError as e:
            msg = str(e)
            assert msg and "\n" not in msg, f"not one line: {msg!r}"
            assert path.name in msg, f"does not name the file: {msg!r}"
            assert len(msg) < 600, f"too long for one line: {msg[:200]!r}..."
            return None


def all_finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(all_finite(v) for v in value)
    return True


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Module scope: hypothesis runs many examples per test call, so they share one folder."""
    return tmp_path_factory.mktemp("fuzz")


# ---- text mutations (TOML and YAML) --------------------------------------------------------------

ODD_VALUES = [
    "nan", "inf", "-inf", "+inf", ".nan", ".inf", "-.inf", "1e400", "-1e400", "-1", "0", "-0.0", "1e-400",
    str(2**64), str(-2**63 - 1), "9" * 5000, '""', "''", "[]", "{}", "true", "null", "~",
    "[" * 3000 + "]" * 3000, "{a = " * 300 + "1" + "}" * 300, "2001-02-30", "1979-05-27T07:32:00Z", "07:32:00",
    "!!binary '!!!'", "!!float 'x'", "!!int 'x'", "!!timestamp 'x'", "!!set {a, b}", "&a [*a]", "*nope",
    "!!python/name:os.system", '"inf"', '"nan"', '"1e400"', '"99999999999999999999"', '"\\u0000"', '"\\uD800"',
    "'''", '"""', "[1, 'a', [2]]", "{ x = 1 }",
]


def _value(draw) -> bytes:
    kind = draw(st.sampled_from(["odd", "odd", "odd", "int", "float", "text"]))
    if kind == "odd":
        return draw(st.sampled_from(ODD_VALUES)).encode()
    if kind == "int":
        return str(draw(st.integers(-2**70, 2**70))).encode()
    if kind == "float":
        return repr(draw(st.floats(allow_nan=True, allow_infinity=True))).encode()
    return draw(st.text(max_size=24)).encode("utf-8", "surrogatepass")


@st.composite
def mutated_text(draw, original: bytes, sep: bytes) -> bytes:
    """One to three edits of the kinds a person or a broken disk makes: lines lost, repeated, values
    replaced by anything, bytes flipped or inserted, the file cut short, bytes that are not UTF-8."""
    data = original
    for _ in range(draw(st.integers(1, 3))):
        lines = data.split(b"\n")
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["value"] * 6 + ["delete", "duplicate", "flip", "insert", "truncate", "not_utf8"]))
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(draw(st.integers(0, len(lines))), lines[i])
        elif op == "value":
            keyed = [j for j, line in enumerate(lines) if sep in line and not line.lstrip().startswith(b"#")]
            j = draw(st.sampled_from(keyed)) if keyed else i
            key = lines[j].split(sep, 1)[0]
            lines[j] = key + sep + b" " + _value(draw)
        data = b"\n".join(lines)
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip":
            data = data[:pos] + bytes([data[pos] ^ draw(st.integers(1, 255))]) + data[pos + 1:] if data else data
        elif op == "insert":
            data = data[:pos] + draw(st.binary(min_size=1, max_size=8)) + data[pos:]
        elif op == "truncate":
            data = data[:pos]
        elif op == "not_utf8":
            bad = draw(st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\x00", b"\xe2\x82"]))
            data = data[:pos] + bad + data[pos:]
    return data


# ---- 1. target profiles ----------------------------------------------------------------------------

@settings(FUZZ, max_examples=1500)
@given(name=st.sampled_from(builtin_names()), data=st.data())
def test_mutated_profiles_give_a_clear_error_or_a_valid_profile(work, name, data):
    original = (TARGETS_DIR / f"{name}.toml").read_bytes()
    path = work / "profile.toml"
    path.write_bytes(data.draw(mutated_text(original, b"=")))
    profile = clear_or_result(lambda p: load_target(str(p)), path)
    if profile is not None:
        assert isinstance(profile, TargetProfile)
        assert all_finite(profile.model_dump()), profile


from test_targets import GOOD as _GOOD  # noqa: E402 - the one valid small profile of the tests

GOOD = _GOOD.lstrip("\n")  # the line numbers below count from its first line


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def profile_error(tmp_path: Path, text: str) -> str:
    p = tmp_path / "board.toml"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_target(str(p))
    msg = str(e.value)
    assert str(p) in msg and "\n" not in msg
    return msg


def test_profile_missing_field_is_named(tmp_path):
    msg = profile_error(tmp_path, GOOD.replace("memory_gb = 0.5\n", ""))
    assert "budget.memory_gb" in msg and "missing" in msg


def test_profile_bad_value_names_field_and_line(tmp_path):
    text = GOOD.replace("memory_gb = 0.5", "memory_gb = -1")
    msg = profile_error(tmp_path, text)
    assert "budget.memory_gb" in msg and f"line {line_of(text, 'memory_gb')}" in msg and "-1" in msg
    text = GOOD.replace("bandwidth_gb_s = 10.0", "bandwidth_gb_s = inf")
    msg = profile_error(tmp_path, text)
    assert "device.bandwidth_gb_s" in msg and f"line {line_of(text, 'bandwidth_gb_s')}" in msg
    text = GOOD.replace('formats = ["gguf-q4_0"]', 'formats = ["gguf-q4_0", "gguf-q3_k"]')
    msg = profile_error(tmp_path, text)
    assert "formats" in msg and "line 3" in msg and "unknown format" in msg


def test_profile_unknown_field_names_its_line(tmp_path):
    text = GOOD.replace("ram_gb = 2.0", "ram_gbs = 2.0")
    msg = profile_error(tmp_path, text)
    assert "'device.ram_gbs'" in msg and "did you mean 'ram_gb'" in msg and f"line {line_of(text, 'ram_gbs')}" in msg


def test_profile_malformed_toml_names_the_line(tmp_path):
    msg = profile_error(tmp_path, GOOD.replace("context = 1024", "context = = 1024"))
    assert "not valid TOML" in msg and "line 2" in msg
    msg = profile_error(tmp_path, GOOD.replace("[budget]", "[budget"))
    assert "not valid TOML" in msg and f"line {line_of(GOOD, '[budget]')}" in msg


def test_profile_not_utf8_and_deep_nesting(tmp_path):
    p = tmp_path / "board.toml"
    p.write_bytes(GOOD.encode().replace(b"my-board", b"my-\xff-board"))
    with pytest.raises(UserError, match=r"board\.toml.*line 1.*UTF-8"):
        load_target(str(p))
    msg = profile_error(tmp_path, GOOD.replace("context = 1024", "context = " + "[" * 5000 + "]" * 5000))
    assert "line 2" in msg


# ---- 2. build config files ---------------------------------------------------------------------------

def default_config_text(suffix: str) -> bytes:
    cfg = resolve({}, None)
    if suffix == ".toml":
        return dump_toml(cfg).encode()
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True), sort_keys=False).encode()


def replay(path: Path) -> BuildConfig:
    """What `edgedistill build --config PATH` does with the file before it plans anything."""
    return resolve({}, load_file(path))


@settings(FUZZ, max_examples=1500)
@given(suffix=st.sampled_from([".toml", ".yaml"]), data=st.data())
def test_mutated_configs_give_a_clear_error_or_a_valid_config(work, suffix, data):
    path = work / f"config{suffix}"
    path.write_bytes(data.draw(mutated_text(default_config_text(suffix), b"=" if suffix == ".toml" else b":")))
    cfg = clear_or_result(replay, path)
    if cfg is not None:
        assert isinstance(cfg, BuildConfig)
        assert all_finite(cfg.model_dump()), cfg


def config_error(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as e:
        replay(p)
    msg = str(e.value)
    assert str(p) in msg and "\n" not in msg
    return msg


def test_config_bad_value_names_field_and_line(tmp_path):
    text = default_config_text(".toml").decode().replace("steps = 60", "steps = -5")
    msg = config_error(tmp_path, "c.toml", text)
    assert "distill.steps" in msg and f"line {line_of(text, 'steps = -5')}" in msg
    text = default_config_text(".yaml").decode().replace("steps: 60", "steps: -5")
    msg = config_error(tmp_path, "c.yaml", text)
    assert "distill.steps" in msg and f"line {line_of(text, 'steps: -5')}" in msg
    text = default_config_text(".toml").decode().replace("lr = 0.001", "lr = nan")
    msg = config_error(tmp_path, "c.toml", text)
    assert "distill.lr" in msg and f"line {line_of(text, 'lr = nan')}" in msg
    text = default_config_text(".toml").decode().replace('preset = "quick"', "preset = []")
    msg = config_error(tmp_path, "c.toml", text)
    assert "preset" in msg and f"line {line_of(text, 'preset = []')}" in msg


def test_config_unknown_field_and_syntax_error_name_the_line(tmp_path):
    text = default_config_text(".yaml").decode().replace("  steps: 60", "  stepz: 60")
    msg = config_error(tmp_path, "c.yaml", text)
    assert "distill.stepz" in msg and f"line {line_of(text, 'stepz')}" in msg
    msg = config_error(tmp_path, "c.toml", "seed = 1\nout = = 2\n")
    assert "line 2" in msg
    msg = config_error(tmp_path, "c.yaml", "seed: 1\nout: [\n")
    assert "line" in msg


def test_yaml_config_is_never_executed(tmp_path):
    marker = tmp_path / "X"
    p = tmp_path / "evil.yaml"
    p.write_text(f'teacher: !!python/object/apply:os.system ["touch {marker}"]\n', encoding="utf-8")
    with pytest.raises(UserError, match="evil.yaml"):
        load_file(p)
    assert not marker.exists()


# ---- 3. inspect on GGUF files -----------------------------------------------------------------------

def write_small_gguf(path: Path) -> None:
    """Every kind of metadata value, float and quantized tensors: 16 KB, so mutations often hit the header."""
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("fuzz")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_bool("fuzz.flag", True)
    w.add_uint64("fuzz.big", 2**40)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(40)])
    w.add_token_types([1] * 40)
    w.add_array("fuzz.numbers", [1.5, 2.5, 3.5])
    w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((40, 64), dtype=np.float32))
    q = gguf.quants.quantize(rng.standard_normal((64, 64), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class GGUFTemplate:
    def __init__(self, data: bytes, slots: list, array_lengths: list, data_offset: int):
        self.data = data
        self.slots = slots  # (offset, size) of every count, length, type and offset field
        self.array_lengths = array_lengths  # offsets of the metadata arrays' lengths
        self.data_offset = data_offset  # where tensor data starts

    def __repr__(self):  # short: hypothesis prints the fixtures of a failing example
        return f"<GGUF template, {len(self.data)} bytes>"

    def with_value(self, at: int, value: int) -> bytes:
        size = dict(self.slots)[at]
        return self.data[:at] + (value % 2 ** (8 * size)).to_bytes(size, "little") + self.data[at + size:]


def gguf_template(path: Path) -> GGUFTemplate:
    import gguf

    reader = gguf.GGUFReader(path)
    base = reader.data.ctypes.data
    slots = set()
    for field in list(reader.fields.values()) + [t.field for t in reader.tensors]:
        for part in field.parts:
            if part.dtype.kind == "u" and part.size == 1 and part.itemsize in (4, 8):
                slots.add((part.ctypes.data - base, part.itemsize))
    arrays = [f.parts[4].ctypes.data - base for f in reader.fields.values()
              if f.types and f.types[0] == gguf.GGUFValueType.ARRAY]
    return GGUFTemplate(path.read_bytes(), sorted(slots), arrays, reader.data_offset)


@pytest.fixture(scope="module")
def small_gguf(work) -> GGUFTemplate:
    path = work / "template.gguf"
    write_small_gguf(path)
    assert describe_artifact(path)["tensors"] == 3  # the template itself is fine
    return gguf_template(path)


HUGE = [2**60, 2**64 - 1, 2**63, 2**32 - 1, 2**31, 0, 1, 3, 2**20]


class Mutated:
    """Mutated bytes that print as the edits made: a failing example then reads `[('count', 956, 2**60)]`."""

    def __init__(self, data: bytes, edits: list):
        self.data, self.edits = data, edits

    def __repr__(self):
        return f"Mutated({self.edits})"


@st.composite
def mutated_gguf(draw, t: GGUFTemplate) -> Mutated:
    data, edits = bytearray(t.data), []
    counts = [(at, 8) for at in [8, 16] + t.array_lengths]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["count", "slot", "slot", "overwrite", "overwrite", "truncate", "append"]))
        if op in ("count", "slot"):  # a count, length, type or offset that claims more (or less) than is there
            at, size = draw(st.sampled_from(counts if op == "count" else t.slots))
            value = draw(st.sampled_from(HUGE + [len(data), len(data) - at]))
            data[at:at + size] = (value % 2 ** (8 * size)).to_bytes(size, "little")
            edits.append((op, at, value))
        elif op == "overwrite":  # mostly the header and metadata: that is what the parser walks
            end = draw(st.sampled_from([64, t.data_offset, len(data)]))
            at = draw(st.integers(0, min(end, len(data)) - 1))
            new = draw(st.binary(min_size=1, max_size=8))
            data[at:at + len(new)] = new
            edits.append((op, at, new))
        elif op == "truncate":
            end = draw(st.sampled_from([64, t.data_offset, len(data)]))
            at = draw(st.integers(0, min(end, len(data))))
            del data[at:]
            edits.append((op, at))
        else:
            junk = draw(st.binary(min_size=1, max_size=64))
            data += junk
            edits.append((op, junk))
        if len(data) < 8:
            break
    return Mutated(bytes(data), edits)


@settings(FUZZ, max_examples=2000)
@given(data=st.data())
def test_mutated_gguf_gives_a_clear_error_or_a_description(work, small_gguf, data):
    path = work / "mutated.gguf"
    path.write_bytes(data.draw(mutated_gguf(small_gguf)).data)
    info = clear_or_result(describe_artifact, path)
    if info is not None:
        assert info["container"] == "gguf"
        json.dumps(info, allow_nan=False)  # the CLI prints it as JSON


def test_gguf_counts_beyond_the_file_are_refused_quickly(work, small_gguf):
    path = work / "counts.gguf"
    for at in (8, 16):  # tensor count, metadata count
        path.write_bytes(small_gguf.with_value(at, 2**60))
        with time_limit(), pytest.raises(UserError, match=r"counts\.gguf: corrupt GGUF: the (tensor|metadata) count"):
            describe_artifact(path)
    # gguf-py reads the items of an array past the end of the file as empty values, advancing 0 bytes each
    assert len(small_gguf.array_lengths) == 3
    for at in small_gguf.array_lengths:
        path.write_bytes(small_gguf.with_value(at, 2**60))
        with time_limit(), pytest.raises(UserError, match="claims 1152921504606846976 items"):
            describe_artifact(path)


# ---- 4. inspect on ONNX folders ----------------------------------------------------------------------

GENAI = {"model": {"type": "llama", "context_length": 256, "vocab_size": 64,
                   "decoder": {"num_hidden_layers": 2, "hidden_size": 64}}}


def write_small_onnx(folder: Path) -> None:
    """A MatMulNBits decoder-shaped graph with its weights in model.onnx.data, as the exporter writes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.integers(0, 255, (64, 2, 16), dtype=np.uint8), "qw"),
             numpy_helper.from_array(np.ones((64, 2), dtype=np.float32), "scales")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("MatMulNBits", ["y", "qw", "scales"], ["z"], domain="com.microsoft",
                              K=64, N=64, bits=4, block_size=32)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64]),
              helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, [1, 1, 0, 32])]
    outputs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 64])]
    graph = helper.make_graph(nodes, "fuzz", inputs, outputs, initializer=inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    (folder / "genai_config.json").write_text(json.dumps(GENAI))


@pytest.fixture(scope="module")
def small_onnx(work) -> Path:
    folder = work / "template-onnx"
    write_small_onnx(folder)
    info = describe_artifact(folder)
    assert info["kv_cache"] is True and info["weight_bits"] == [4] and info["layers"] == 2
    return folder


ODD_JSON = [None, True, -1, 2**70, 1e308, "x", [], [1, 2], {}, {"a": 1}]
ODD_LOCATIONS = ["../outside.data", "/etc/passwd", "missing.data", "", ".", "sub/../../x.data",
                 "model.onnx.data\x00", "genai_config.json", "model.onnx"]


def _external_edit(draw, model_bytes: bytes) -> bytes:
    """Point one initializer's external data somewhere else, or at a range the file does not hold."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    tensor = draw(st.sampled_from(list(model.graph.initializer)))
    key = draw(st.sampled_from(["location", "offset", "length"]))
    if key == "location":
        value = draw(st.one_of(st.sampled_from(ODD_LOCATIONS), st.text(max_size=12)))
    else:
        value = draw(st.sampled_from(["-1", "x", str(2**63), str(2**70), "1e3", "", "0"]))
    entries = {e.key: e for e in tensor.external_data}
    if key in entries:
        entries[key].value = value
    else:
        tensor.external_data.add(key=key, value=value)
    return model.SerializeToString()


def _genai_edit(draw, folder: Path) -> None:
    path = folder / "genai_config.json"
    kind = draw(st.sampled_from(["truncate", "type", "type", "bytes", "nesting", "delete"]))
    text = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(text[:draw(st.integers(0, max(len(text) - 1, 0)))])
    elif kind == "type":  # one value of the good config replaced by one of another JSON type
        cfg = json.loads(json.dumps(GENAI))
        where = draw(st.sampled_from([(), ("model",), ("model", "decoder")]))
        if not where:
            cfg = draw(st.sampled_from(ODD_JSON))
        else:
            table = cfg["model"] if where == ("model",) else cfg["model"]["decoder"]
            table[draw(st.sampled_from(sorted(table)))] = draw(st.sampled_from(ODD_JSON))
        path.write_text(json.dumps(cfg))
    elif kind == "bytes":
        at = draw(st.integers(0, max(len(text) - 1, 0)))
        path.write_bytes(text[:at] + draw(st.sampled_from([b"\xff", b"\xc3(", b"1" * 4400])) + text[at:])
    elif kind == "nesting":
        path.write_text('{"model": ' + "[" * 100000 + "]" * 100000 + "}")
    else:
        path.unlink()


@settings(FUZZ, max_examples=1000)
@given(data=st.data())
def test_mutated_onnx_gives_a_clear_error_or_a_description(work, small_onnx, data):
    folder = work / "mutated-onnx"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(small_onnx, folder)
    model = folder / "model.onnx"
    for _ in range(data.draw(st.integers(1, 2))):
        op = data.draw(st.sampled_from(["overwrite", "truncate", "append", "external", "external",
                                        "no_data", "genai", "genai", "no_model"]))
        raw = model.read_bytes() if model.exists() else b""
        if op == "overwrite" and raw:
            at = data.draw(st.integers(0, len(raw) - 1))
            model.write_bytes(raw[:at] + data.draw(st.binary(min_size=1, max_size=8)) + raw[at + 8:])
        elif op == "truncate" and raw:
            model.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1))])
        elif op == "append":
            model.write_bytes(raw + data.draw(st.binary(min_size=1, max_size=64)))
        elif op == "external" and raw:
            with contextlib.suppress(Exception):  # the model may already be unreadable from an earlier edit
                model.write_bytes(_external_edit(data.draw, raw))
        elif op == "no_data":
            (folder / "model.onnx.data").unlink(missing_ok=True)
        elif op == "genai" and (folder / "genai_config.json").exists():
            _genai_edit(data.draw, folder)
        elif op == "no_model":
            model.unlink(missing_ok=True)
    info = clear_or_result(describe_artifact, folder)
    if info is not None:
        assert info["container"] == "onnx"
        json.dumps(info, allow_nan=False)


def test_onnx_external_data_outside_the_folder_is_refused(work, small_onnx):
    import onnx

    folder = work / "escape-onnx"
    for location in ("../../outside.data", "/etc/passwd"):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(small_onnx, folder)
        model = onnx.load(folder / "model.onnx", load_external_data=False)
        for e in model.graph.initializer[0].external_data:
            if e.key == "location":
                e.value = location
        (folder / "model.onnx").write_bytes(model.SerializeToString())
        with pytest.raises(UserError, match="outside"):
            describe_artifact(folder)
    shutil.rmtree(folder)
    shutil.copytree(small_onnx, folder)
    (folder / "model.onnx.data").unlink()
    with pytest.raises(UserError, match=r"model\.onnx\.data"):
        describe_artifact(folder)


# ---- 5. the CLI: exit 2, one line ----------------------------------------------------------------------

def test_cli_inspect_on_broken_artifacts_is_one_line_and_exit_2(work, small_gguf, small_onnx):
    cases = work / "cli"
    cases.mkdir(exist_ok=True)
    (cases / "truncated.gguf").write_bytes(small_gguf.data[:100])
    (cases / "many-tensors.gguf").write_bytes(small_gguf.with_value(8, 2**60))
    corrupt = cases / "corrupt-onnx"
    shutil.copytree(small_onnx, corrupt, dirs_exist_ok=True)
    raw = (corrupt / "model.onnx").read_bytes()
    (corrupt / "model.onnx").write_bytes(raw[:40] + b"\xff" * 16 + raw[56:])
    for artifact in (cases / "truncated.gguf", cases / "many-tensors.gguf", corrupt):
        with time_limit(60):
            res = cli("inspect", artifact)
        assert res.returncode == 2, (artifact.name, res.returncode, res.stderr)
        assert "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert artifact.name in res.stderr
