"""Scalars to TensorBoard and to a JSONL file (the latter feeds plots and the closing notes)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class MetricsLog:
    def __init__(self, output_dir: Path):
        self.path = output_dir / "metrics.jsonl"
        self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(f"{split}/{name}", value, step)
        record = {"step": step, "split": split, "time": time.time(), **metrics}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.writer.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, out_png: Path, ttt_steps: int) -> Path:
    """Loss and per-step top-1 agreement against step, train and eval, in one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
        rows = [r for r in records if r["split"] == split]
        if not rows:
            continue
        # An update whose every batch was skipped (non-finite loss) logs no loss: a gap, not a crash.
        steps = [r["step"] for r in rows]
        ax_loss.plot(steps, [r.get("loss", float("nan")) for r in rows], style, label=split)
        for k in (1, 2, ttt_steps):
            key = f"top1/step{k}"
            if any(key in r for r in rows):
                ax_acc.plot(steps, [r.get(key, float("nan")) for r in rows], style, label=f"{split} step {k}")
    ax_loss.set(xlabel="step", ylabel="TTT loss (weighted KL)", title="loss")
    ax_acc.set(xlabel="step", ylabel="top-1 agreement with target", title="acceptance proxy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
