"""Scalars to TensorBoard and to a JSONL file (the latter feeds plots and the closing notes), and
to W&B or MLflow when the ``tracking`` section asks for them (neither is a dependency)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter


class WandbTracker:
    def __init__(self, tracking: Any, run_name: str, output_dir: Path, params: dict[str, Any]):
        import wandb

        self.run = wandb.init(project=tracking.project, name=run_name, dir=str(output_dir),
                              mode=tracking.wandb_mode, config=params, resume="allow")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, tracking: Any, run_name: str, output_dir: Path, params: dict[str, Any]):
        import mlflow

        uri = tracking.mlflow_tracking_uri
        if uri is None:  # the run's own folder; MLflow 3 wants an opt-in for its file store
            import os

            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (output_dir / "mlruns").resolve().as_uri()
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(tracking.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(tracking.project)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        for key, value in _flatten(params).items():  # MLflow caps a param value at a few kB
            self.client.log_param(self.run_id, key, str(value)[:500])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        timestamp = int(time.time() * 1000)
        from mlflow.entities import Metric

        metrics = [Metric(key.replace("@", "_"), float(value), timestamp, step) for key, value in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


TRACKERS = {"wandb": WandbTracker, "mlflow": MlflowTracker}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class MetricsLog:
    def __init__(self, output_dir: Path, tracking: Any = None, run_name: str = "draftrl",
                 params: dict[str, Any] | None = None):
        self.path = output_dir / "metrics.jsonl"
        self.writer = SummaryWriter(str(output_dir / "tensorboard"))
        backends = list(getattr(tracking, "backends", []) or [])
        name = getattr(tracking, "run_name", None) or run_name
        self.trackers = [TRACKERS[b](tracking, name, output_dir, params or {}) for b in backends]

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(f"{split}/{name}", value, step)
        record = {"step": step, "split": split, "time": time.time(), **metrics}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.log(step, {f"{split}/{name}": value for name, value in metrics.items()})

    def close(self) -> None:
        self.writer.close()
        for tracker in self.trackers:
            tracker.close()


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
