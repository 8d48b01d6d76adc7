"""Coming from SpecForge or speculators: their setting names, trackers, and the whole way in and out.

The last test is the issue's definition of done: a SpecForge-style config file (their names), their
data and drafter and vocabulary mapping start a draftrl run unedited, and the run hands the drafter
back in both tools' layouts.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
import yaml

from speculative.config import ALIASES, ConfigError, load_config
from pipeline.metrics_log import MetricsLog

SPECFORGE_YAML = {
    "target": {"target_model_path": "org/target", "aux_hidden_state_layer_ids": [1, 14, 26]},
    "data": {"train_data_path": "data.jsonl", "build_dataset_num_proc": 4, "max_length": 512},
    "drafter": {"draft_checkpoint_path": "ckpt", "vocab_mapping_path": "vocab.pt"},
    "training": {"learning_rate": 3e-4, "max_grad_norm": 1.0, "ttt_length": 5},
    "tracking": {"report_to": "none"},
}
SPECULATORS_YAML = {
    "target": {"verifier_name_or_path": "org/target", "target_layer_ids": [2, 15, 27]},
    "data": {"data_path": "prepared", "num_preprocessing_workers": 2, "seq_length": 1024},
    "drafter": {"from_pretrained": "ckpt", "d2t_path": "d2t.npy", "t2d_path": "t2d.npy"},
    "training": {"lr": 2e-4, "ttt_steps": 3, "ttt_step_loss_decay": 0.9},
}


def _load(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def test_specforge_and_speculators_names(tmp_path):
    config = _load(tmp_path, SPECFORGE_YAML)
    assert config.target.model == "org/target"
    assert config.target.aux_layer_ids == (2, 15, 27)  # their output-numbered ids, as layer inputs
    assert (config.data.source, config.data.num_proc, config.data.max_length) == ("data.jsonl", 4, 512)
    assert (config.drafter.init_from, config.drafter.vocab_mapping) == ("ckpt", "vocab.pt")
    assert (config.training.lr, config.training.grad_clip, config.training.ttt_steps) == (3e-4, 1.0, 5)
    assert config.tracking.backends == []
    config = _load(tmp_path, SPECULATORS_YAML)
    assert config.target.model == "org/target" and config.target.aux_layer_ids == (2, 15, 27)
    assert (config.data.source, config.data.num_proc, config.data.max_length) == ("prepared", 2, 1024)
    assert (config.drafter.init_from, config.drafter.vocab_mapping, config.drafter.t2d_mapping) == (
        "ckpt", "d2t.npy", "t2d.npy")
    assert (config.training.lr, config.training.ttt_steps, config.training.step_weight_decay) == (2e-4, 3, 0.9)
    # every alias resolves to its field (through --set, like the YAML)
    for section, fields in ALIASES.items():
        for field, aliases in fields.items():
            assert all(isinstance(tool, str) and tool in ("SpecForge", "speculators") for tool in aliases.values())


@pytest.mark.parametrize("key,alias,value", [
    ("training.lr", "training.learning_rate", "1e-3"),
    ("target.model", "target.verifier_name_or_path", "x"),
    ("drafter.init_from", "drafter.draft_checkpoint_path", "x"),
    ("target.aux_layer_ids", "target.aux_hidden_state_layer_ids", "[1,2,3]"),
])
def test_an_alias_and_its_field_together_is_an_error(key, alias, value):
    with pytest.raises(ConfigError, match=f"'{key.split('.')[1]}'.*'{alias.split('.')[1]}'|'{alias.split('.')[1]}'.*"):
        load_config(None, [f"{key}={value}", f"{alias}={value}"])


def test_the_dumped_config_uses_draftrl_names(tmp_path):
    from speculative.config import dump_config

    text = dump_config(_load(tmp_path, SPECFORGE_YAML))
    assert "learning_rate" not in text and "lr: 0.0003" in text and "ttt_steps: 5" in text


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_tracker_that_is_not_installed_is_named():
    with pytest.raises(ConfigError, match="tracking backend 'wandb' is not installed: pip install wandb"):
        load_config(None, ["tracking.backends=[wandb]"])


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_mlflow_tracker_with_a_local_file_store(tmp_path):
    import mlflow

    config = load_config(None, ["tracking.logger=mlflow", "tracking.project=eco", f"output_dir={tmp_path}"])
    log = MetricsLog(tmp_path, config.tracking, "run-a", {"training": {"lr": 1e-4}})
    log.log(1, "train", {"loss": 2.5, "top1/step1": 0.25})
    log.log(2, "train", {"loss": 2.0, "top1/step1": 0.5})
    log.close()
    client = mlflow.MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    run = client.search_runs([client.get_experiment_by_name("eco").experiment_id])[0]
    assert run.info.run_name == "run-a" and run.data.params["training.lr"] == "0.0001"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.5), (2, 2.0)]
    assert (tmp_path / "metrics.jsonl").is_file()  # beside, not instead of, the JSONL and TensorBoard


def test_cli_export(tmp_path, tiny_target, capsys):
    from tools.cli import main
    from speculative.checkpoint import save_drafter
    from speculative.vocab import DraftVocab
    from tests.conftest import tiny_drafter

    drafter = tiny_drafter(tiny_target, DraftVocab(torch.arange(0, 80, 2), tiny_target.vocab_size))
    native = save_drafter(drafter, tmp_path / "d", metadata={"target": "smollm2"})  # recorded by alias only
    assert main(["export", "--drafter", str(native), "--out", str(tmp_path / "s"), "--format", "speculators"]) == 0
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["speculators_config"]["verifier"]["name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert main(["export", "--drafter", str(tmp_path / "s"), "--out", str(tmp_path / "g"), "--format", "sglang"]) == 0
    assert json.loads((tmp_path / "g" / "config.json").read_text())["architectures"] == ["LlamaForCausalLMEagle3"]
    assert main(["export", "--drafter", str(tmp_path / "nope"), "--out", str(tmp_path / "x"), "--format", "vllm"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_start_from_specforge_files_and_hand_back(tmp_path, tiny_target_dir):
    """SpecForge's config names, data, drafter and vocab mapping in; speculators + SpecForge out."""
    from pipeline.trainer import Trainer
    from speculative.checkpoint import load_drafter
    from speculative.target import TargetModel
    from speculative.vocab import DraftVocab
    from tests.test_checkpoint_formats import make_specforge_dir
    from tests.test_data_ecosystem import OTHER, specforge_row
    from tests.test_data import TWO_TURNS

    target = TargetModel.load(str(tiny_target_dir), None, torch.float32, torch.device("cpu"))
    vocab = DraftVocab(torch.arange(0, 2 * 64, 2), target.vocab_size)
    ckpt, _ = make_specforge_dir(tmp_path / "specforge_drafter", target, vocab=vocab)
    torch.save({"d2t": vocab.d2t, "t2d": vocab.t2d}, tmp_path / "vocab_mapping.pt")
    data = tmp_path / "sharegpt_train.jsonl"
    data.write_text("".join(json.dumps(specforge_row(i, [TWO_TURNS, OTHER][i % 2])) + "\n" for i in range(8)))
    config = {
        "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"),
        "target": {"target_model_path": str(tiny_target_dir)},
        "data": {"train_data_path": str(data), "max_length": 64, "eval_fraction": 0.25},
        "drafter": {"draft_checkpoint_path": str(ckpt), "vocab_mapping_path": str(tmp_path / "vocab_mapping.pt"),
                    "export_formats": ["speculators", "specforge"]},
        "training": {"learning_rate": 1e-3, "max_grad_norm": 0.5, "ttt_length": 2, "batch_size": 2,
                     "max_steps": 1, "warmup_steps": 0, "eval_batches": 1, "device": "cpu"},
    }
    (tmp_path / "specforge.yaml").write_text(yaml.safe_dump(config))
    with pytest.warns(UserWarning, match="number layer outputs"):
        result = Trainer(load_config(tmp_path / "specforge.yaml")).run()
    assert result.final_step == 1
    out = tmp_path / "run"
    spec = json.loads((out / "drafter_speculators" / "config.json").read_text())
    assert spec["speculators_config"]["verifier"]["name_or_path"] == str(tiny_target_dir)
    assert spec["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5] and spec["fc_norm"] is True
    forge = json.loads((out / "drafter_specforge" / "config.json").read_text())
    assert forge["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]
    trained = load_drafter(out / "drafter", target.embed_tokens.weight.float())
    for layout in ("drafter_speculators", "drafter_specforge"):
        again = load_drafter(out / layout, target.embed_tokens.weight.float())
        assert torch.equal(again.draft_to_target, vocab.draft_to_target)
        for name, tensor in trained.state_dict().items():
            assert torch.equal(again.state_dict()[name].float(), tensor.float()), (layout, name)
