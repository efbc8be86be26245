"""Hardware target profiles: the schema, and loading from targets/*.toml or a user's own file."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgedistill.settings_files import check_numbers, parse_toml, read_settings_text, settings_error
from edgedistill.errors import UserError
from edgedistill.formats import FORMATS

TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"
GB = 1e9  # profiles state decimal gigabytes, as device makers and app stores do


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Device(_Strict):
    ram_gb: float = Field(gt=0)
    bandwidth_gb_s: float = Field(gt=0, description="peak DRAM bandwidth")
    compute_gflops: float = Field(gt=0, description="peak matrix throughput the runtime can use (int8/fp16 dot products)")
    decode_efficiency: float = Field(0.5, gt=0, le=1, description="share of bandwidth a decode step achieves")
    prefill_efficiency: float = Field(0.3, gt=0, le=1, description="share of compute a prefill achieves")
    sustained: float = Field(1.0, gt=0, le=1, description="throughput kept under sustained (thermal) load")
    active_power_w: float = Field(gt=0, description="whole-device power while generating")
    battery_wh: Optional[float] = Field(None, gt=0, description="None: mains powered")
    threads: int = Field(4, ge=1)
    # Bottom-up energy cross-check (measure.project.energy); None leaves it out.
    dram_pj_per_byte: Optional[float] = Field(
        None, gt=0, description="energy to bring one byte from DRAM to the cores (DRAM, interface, on-chip fabric)")
    pj_per_op: Optional[float] = Field(
        None, gt=0, description="energy per arithmetic operation of the CPU's SIMD pipeline (a multiply-add is 2 ops), "
                                "instruction and register overheads included")


class Budget(_Strict):
    memory_gb: float = Field(gt=0, description="weights + KV cache at the context + runtime overhead")
    artifact_gb: float = Field(gt=0, description="artifact storage / download size")
    min_decode_tok_s: float = Field(gt=0)
    max_ttft_s: float = Field(gt=0, description="time to first token for prompt_tokens of prompt")
    prompt_tokens: int = Field(gt=0)
    max_energy_j_per_100_tok: Optional[float] = Field(None, gt=0)
    max_battery_pct_per_hour: Optional[float] = Field(
        None, gt=0, description="battery % per hour of chat (measure.project's stated usage); needs battery_wh")
    runtime_overhead_mb: float = Field(ge=0, description="runtime code, buffers and activations besides weights and KV")


class TargetProfile(_Strict):
    name: str
    description: str = ""
    context: int = Field(gt=0, description="context length the student is planned and budgeted for")
    formats: list[str] = Field(min_length=1, description="artifact formats to build; the first is trained for (QAT)")
    device: Device
    budget: Budget

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, v: list[str]) -> list[str]:
        bad = [f for f in v if f not in FORMATS]
        if bad:
            raise ValueError(f"unknown format(s) {bad}; known: {sorted(FORMATS)}")
        return v

    @model_validator(mode="after")
    def _battery_budget_needs_battery(self) -> "TargetProfile":
        if self.budget.max_battery_pct_per_hour is not None and self.device.battery_wh is None:
            raise ValueError("budget.max_battery_pct_per_hour is set but device.battery_wh is not (mains powered)")
        return self

    @property
    def primary_format(self) -> str:
        return self.formats[0]


def builtin_names() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def load_target(name_or_path: str) -> TargetProfile:
    """A built-in profile by name, or a user's profile file (path ending in .toml)."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.exists():
        if not path.is_file():
            raise UserError(f"target profile file not found: {name_or_path}")
    else:
        path = TARGETS_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            close = difflib.get_close_matches(name_or_path, builtin_names(), n=3, cutoff=0.4)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(builtin_names())}"
            raise UserError(f"unknown target {name_or_path!r}{hint}")
    return parse_target(read_settings_text(path, "target profile file"), source=str(path))


def parse_target(text: str, source: str = "<profile>") -> TargetProfile:
    """A profile from TOML text; every problem is one UserError naming `source`, the field and its line."""
    data = parse_toml(text, source)
    try:
        profile = TargetProfile.model_validate(data)
    except ValidationError as e:
        raise settings_error(e, TargetProfile, source, text, yaml_file=False) from None
    check_numbers(profile.model_dump(), source, text, yaml_file=False)
    return profile
