"""The built-in hardware profiles, and the errors a bad profile or an unknown name gives."""

from __future__ import annotations

import re

import pytest

from edgedistill.errors import UserError
from edgedistill.formats import FORMATS
from edgedistill.targets import TARGETS_DIR, builtin_names, load_target, parse_target

NINE = ["browser-wasm", "iphone-8gb", "jetson-orin-nano-8gb", "laptop-16gb", "phone-12gb", "phone-4gb",
        "phone-8gb", "rpi5-8gb", "wearable-1gb"]

GOOD = """
name = "my-board"
context = 1024
formats = ["gguf-q4_0"]

[device]
ram_gb = 2.0
bandwidth_gb_s = 10.0
compute_gflops = 100.0
active_power_w = 3.0

[budget]
memory_gb = 0.5
artifact_gb = 0.3
min_decode_tok_s = 5.0
max_ttft_s = 2.0
prompt_tokens = 128
runtime_overhead_mb = 50.0
"""


def test_all_nine_profiles_load():
    assert builtin_names() == NINE
    for name in NINE:
        t = load_target(name)
        assert t.name == name
        assert t.formats and all(f in FORMATS for f in t.formats)
        assert t.budget.memory_gb < t.device.ram_gb
        assert t.context > 0 and t.budget.prompt_tokens < t.context


def test_preferred_formats():
    assert load_target("browser-wasm").formats == ["onnx-int4", "gguf-q4_0"]
    assert load_target("wearable-1gb").formats == ["gguf-q4_0", "onnx-int4"]
    for name in set(NINE) - {"browser-wasm", "wearable-1gb"}:
        assert sorted(load_target(name).formats) == sorted(FORMATS)


def test_mains_profiles_have_no_battery_and_battery_profiles_do():
    for name in ("rpi5-8gb", "jetson-orin-nano-8gb", "browser-wasm"):
        assert load_target(name).device.battery_wh is None
    for name in ("phone-4gb", "phone-8gb", "phone-12gb", "iphone-8gb", "laptop-16gb", "wearable-1gb"):
        assert load_target(name).device.battery_wh > 0
    assert load_target("browser-wasm").budget.max_energy_j_per_100_tok is None


def test_every_number_has_a_source_or_says_assumption():
    number = re.compile(r"^\s*[A-Za-z_]+\s*=\s*[-+]?\d")
    for path in sorted(TARGETS_DIR.glob("*.toml")):
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if number.match(line):
                assert "#" in line, f"{path.name}:{i}: number without a source comment: {line.strip()}"
                comment = line.split("#", 1)[1].strip()
                assert len(comment) > 8, f"{path.name}:{i}: comment too short to be a source"


def test_user_profile_file_loads(tmp_path):
    p = tmp_path / "my-board.toml"
    p.write_text(GOOD, encoding="utf-8")
    t = load_target(str(p))
    assert t.name == "my-board" and t.device.sustained == 1.0 and t.device.battery_wh is None


def test_malformed_toml_is_a_user_error(tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text(GOOD.replace('context = 1024', 'context = = 1024'), encoding="utf-8")
    with pytest.raises(UserError, match="not valid TOML"):
        load_target(str(p))


def test_unknown_field_is_named():
    with pytest.raises(UserError, match=r"unknown field 'device\.ram_gbs'; did you mean 'ram_gb'"):
        parse_target(GOOD.replace("ram_gb = 2.0", "ram_gbs = 2.0"))
    with pytest.raises(UserError, match=r"unknown field 'budget\.colour'; known here: memory_gb"):
        parse_target(GOOD + '\ncolour = "red"\n')  # lands in the last table, [budget]
    with pytest.raises(UserError, match=r"unknown field 'budgets'; did you mean 'budget'"):
        parse_target(GOOD.replace("[budget]", "[budgets]"))


def test_bad_value_is_named():
    with pytest.raises(UserError, match=r"budget\.memory_gb"):
        parse_target(GOOD.replace("memory_gb = 0.5", "memory_gb = -1"))
    with pytest.raises(UserError, match="unknown format"):
        parse_target(GOOD.replace('["gguf-q4_0"]', '["gguf-q3_k"]'))
    with pytest.raises(UserError, match="battery_wh"):
        parse_target(GOOD.replace("runtime_overhead_mb = 50.0",
                                  "runtime_overhead_mb = 50.0\nmax_battery_pct_per_hour = 2.0"))


def test_unknown_target_suggests_close_names():
    with pytest.raises(UserError) as e:
        load_target("phone-4g")
    assert "phone-4gb" in str(e.value) and "did you mean" in str(e.value)
    with pytest.raises(UserError, match="rpi5-8gb"):
        load_target("rpi5")
    with pytest.raises(UserError, match="known:"):
        load_target("zzzzzzzz")


def test_missing_profile_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_target(str(tmp_path / "nope.toml"))
