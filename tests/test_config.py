"""Configs are validated before anything starts, and errors name the file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.cli import main
from speculative.config import ConfigError, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    config = load_config(path)
    objective = path.stem.removesuffix("_smollm2")  # gto_smollm2.yaml trains objective gto
    assert config.training.objective == (objective if objective in {"gto", "opd", "gto_opd"} else "sft")
    if config.training.objective != "sft":  # RL objectives start from a trained SFT drafter
        assert config.drafter.init_from


def test_overrides_are_parsed_as_yaml(tmp_path):
    config = load_config(
        CONFIGS[0], ["training.lr=3e-4", "target.aux_layer_ids=[1, 2, 3]", "data.max_records=7"]
    )
    assert config.training.lr == pytest.approx(3e-4)
    assert config.target.aux_layer_ids == (1, 2, 3)
    assert config.data.max_records == 7


def test_unknown_key_names_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  learnin_rate: 0.1\n")  # (learning_rate is SpecForge's alias of lr)
    with pytest.raises(ConfigError, match=r"bad\.yaml.*\n.*training\.learnin_rate"):
        load_config(path)


def test_wrong_type_names_the_field_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"training\.batch_size.*'four'"):
        load_config(None, ["training.batch_size=four"])
    with pytest.raises(ConfigError, match=r"data\.eval_fraction"):
        load_config(None, ["data.eval_fraction=1.5"])


def test_broken_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("training:\n  lr: 0.1\n   batch_size: [\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml line \d+: invalid YAML"):
        load_config(path)


def test_cli_refuses_bad_config_before_loading_anything(capsys):
    assert main(["train", "--set", "training.ttt_steps=0"]) == 2
    assert "training.ttt_steps" in capsys.readouterr().err
    assert main(["config", "--set", "training.lr=0.5"]) == 0
    assert "lr: 0.5" in capsys.readouterr().out
