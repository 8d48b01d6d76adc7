"""Integration: train a drafter for the real SmolLM2-135M-Instruct target on real ShareGPT data."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_sft_on_smollm2_lowers_loss_and_raises_agreement(smollm2_sft_run):
    evals = [
        json.loads(line)
        for line in (smollm2_sft_run.output_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == "eval"
    ]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] == 36
    assert last["loss"] < 0.8 * first["loss"], (first["loss"], last["loss"])
    assert last["top1/step1"] > first["top1/step1"] + 0.05, (first["top1/step1"], last["top1/step1"])
    assert last["accept_length_proxy"] > first["accept_length_proxy"]
