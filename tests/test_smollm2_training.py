"""Integration: train a drafter for the real SmolLM2-135M-Instruct target on real ShareGPT data."""

from __future__ import annotations

import json

import pytest

from pipeline.config import load_config
from pipeline.trainer import Trainer


@pytest.mark.slow
def test_sft_on_smollm2_lowers_loss_and_raises_agreement(tmp_path):
    config = load_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            "target.model=smollm2",
            "data.source=sharegpt",
            "data.max_records=160",
            "data.max_length=96",
            "data.eval_fraction=0.1",
            "data.on_error=skip",
            "drafter.draft_vocab_size=4096",
            "training.ttt_steps=3",
            "training.batch_size=4",
            "training.lr=2e-3",
            "training.warmup_steps=5",
            "training.max_steps=36",
            "training.log_every=6",
            "training.eval_every=36",
            "training.eval_batches=3",
            "training.save_every=36",
            "training.device=cpu",
        ],
    )
    result = Trainer(config).run()
    evals = [
        json.loads(line)
        for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == "eval"
    ]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] == 36
    assert last["loss"] < 0.8 * first["loss"], (first["loss"], last["loss"])
    assert last["top1/step1"] > first["top1/step1"] + 0.05, (first["top1/step1"], last["top1/step1"])
    assert last["accept_length_proxy"] > first["accept_length_proxy"]
