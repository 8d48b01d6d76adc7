"""A study's YAML file (validated) and the layout of its directory: runs, their states, scores.

What the stages (``experiments.study``) and the report (``experiments.study_report``) both read,
kept apart so neither imports the other.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
STATE_FILE = "study_state.json"


class StudyError(ValueError):
    """A study that cannot run; the message names the file (and field)."""


# ---------------------------------------------------------------------------------- the study file


def repo_path(value: str | Path) -> Path:
    """A path as given if it exists from here, else relative to the repository root."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


def _check_assignments(items: list[str]) -> list[str]:
    bad = [item for item in items if "=" not in item or not item.split("=", 1)[0].strip()]
    if bad:
        raise ValueError(f"expected key=value, got {bad[0]!r}")
    return items


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ArmSpec(Strict):
    """One training arm: a pipeline config plus ``--set`` overrides."""

    config: Path
    set: list[str] = Field(default_factory=list, description="key=value overrides of this arm")
    paper_gain: str | None = Field(None, description="the gain its paper reports, for the report")

    @field_validator("config")
    @classmethod
    def _exists(cls, value: Path) -> Path:
        path = repo_path(value)
        if not path.is_file():
            raise ValueError(f"config file {value} does not exist")
        return path.resolve()

    _sets = field_validator("set")(_check_assignments)


class EvalSpec(Strict):
    """Tree-engine tau and speed-up (bench/compare_drafters.py) of every drafter, one process per
    temperature, the scorings one after another."""

    num_prompts: int = Field(20, ge=1)
    temperatures: list[float] = Field(default_factory=lambda: [0.0, 1.0], min_length=1)
    max_new_tokens: int = Field(256, ge=1)
    bench: str = "mt_bench,humaneval,gsm8k"
    chain_lengths: list[int] = Field(
        default_factory=list, description="also score with draft chains of these lengths (e.g. [7]), "
        "each in its own folder eval/NAME-T{t}-chain{n}; the tree scoring stays the report's")
    bench_dir: Path | None = None
    target: str | None = Field(None, description="default: the arms' target.model")

    @field_validator("bench_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return None if value is None else repo_path(value).resolve()


class VllmSpec(Strict):
    """vLLM's acceptance vs draftrl's (chain drafting) for the drafters of one seed."""

    seed: int = 1
    num_prompts: int = Field(5, ge=1, description="first-turn questions per bench")
    max_tokens: int = Field(64, ge=1)
    num_speculative_tokens: int = Field(3, ge=1)
    dtype: Literal["float32", "bfloat16"] = "float32"
    tolerance: float = Field(0.05, ge=0.0, description="largest |vLLM - draftrl| that counts as agreement")


class Study(Strict):
    name: str
    start_drafter: Path | None = Field(None, description="the SFT drafter every arm starts from")
    seeds: list[int] = Field(default_factory=lambda: [1], min_length=1)
    minutes_per_arm: float = Field(gt=0.0, description="training wall-clock per arm and seed")
    parallel: int = Field(1, ge=1, description="runs at once (host-bound runs share one GPU)")
    gpus: int = Field(
        1, ge=1, description="GPUs of the host: each run (and each eval process) is pinned to the "
        "GPU with the fewest live jobs through CUDA_VISIBLE_DEVICES; with parallel == gpus every "
        "run trains alone on its own GPU, and eval scores one temperature per GPU at once")
    overhead_minutes: float = Field(
        1.0, ge=0.0, description="per run, outside the training clock (loading, export): reserved "
        "inside a --minutes budget")
    min_run_minutes: float = Field(0.5, gt=0.0, description="shortest training slice worth starting")
    overrides: list[str] = Field(default_factory=list, description="key=value given to every arm")
    arms: dict[str, ArmSpec] = Field(min_length=1)
    eval: EvalSpec = EvalSpec()
    vllm: VllmSpec = VllmSpec()

    _overrides = field_validator("overrides")(_check_assignments)

    @field_validator("start_drafter")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        """Absolute: the runs' processes work in the repository root, not here."""
        return None if value is None else value.expanduser().resolve()

    @field_validator("arms")
    @classmethod
    def _arm_names(cls, arms: dict[str, ArmSpec]) -> dict[str, ArmSpec]:
        bad = [name for name in arms if not re.fullmatch(r"[A-Za-z0-9_]+", name) or name == "start"]
        if bad:
            raise ValueError(f"arm name {bad[0]!r}: letters, digits and _ only, and not 'start'")
        return arms

    @model_validator(mode="after")
    def _seeds(self) -> Study:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: repeated seed in {self.seeds}")
        if self.vllm.seed not in self.seeds:
            raise ValueError(f"vllm.seed: {self.vllm.seed} is not one of the seeds {self.seeds}")
        return self


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise StudyError(f"--set {dotted}: '{key}' is not a section")
    node[keys[-1]] = value


def load_study(path: str | Path, sets: Sequence[str] = (), start: str | Path | None = None) -> Study:
    """Read and validate a study YAML (``--set`` and ``--start`` applied); errors name file and field."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise StudyError(f"{path}: invalid YAML: {error}") from None
    if not isinstance(data, dict):
        raise StudyError(f"{path}: the top level must be a mapping")
    for item in sets:
        if "=" not in item:
            raise StudyError(f"--set {item!r}: expected field=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    if start is not None:
        data["start_drafter"] = str(start)
    try:
        return Study.model_validate(data)
    except ValidationError as error:
        lines = [f"  {'.'.join(str(p) for p in issue['loc']) or '(top level)'}: {issue['msg']} "
                 f"(got {issue.get('input')!r})" for issue in error.errors()]
        raise StudyError(f"{path}: invalid study\n" + "\n".join(lines)) from None


# ---------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Run:
    """One (arm, seed) training run of the study."""

    arm: str
    seed: int
    directory: Path

    @property
    def name(self) -> str:
        return f"{self.arm}-s{self.seed}"


def study_runs(study: Study, out: Path) -> list[Run]:
    """Seed-major order: with fewer slots than runs, every arm gets its first seed first."""
    return [Run(arm, seed, out / "runs" / f"{arm}-s{seed}") for seed in study.seeds for arm in study.arms]


def read_state(run: Run) -> dict[str, Any]:
    path = run.directory / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {"minutes": 0.0, "slots": []}


def write_json(path: Path, data: Any) -> None:
    """Write-then-rename: a killed stage never leaves half a file that later reads as finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def checkpoint_step(run: Run) -> int:
    """Step of the run's latest checkpoint (0 before the first)."""
    pointer = run.directory / "checkpoints" / "latest"
    if not pointer.is_file():
        return 0
    return int(pointer.read_text().strip().rsplit("_", 1)[1])


# ---------------------------------------------------------------------------------- scores


def temperature_key(value: float) -> str:
    return f"T{value:g}"


def eval_folder(out: Path, name: str, temperature: float, chain: int = 0) -> Path:
    """Where ``name``'s scoring at ``temperature`` lives: EAGLE-3's tree, or chains of ``chain``."""
    suffix = f"-chain{chain}" if chain > 0 else ""
    return out / "eval" / f"{name}-{temperature_key(temperature)}{suffix}"
