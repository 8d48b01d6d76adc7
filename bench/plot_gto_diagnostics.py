"""Draw GTO's per-update diagnostics from one or more runs' ``metrics.jsonl`` (issue 18).

Panels (train records; every run one colour):
* debiased reward R = r(T) - r(T0): mean, with a +-1 std band (``gto/debiased_reward[_std]``);
* advantages: mean, std and mean |A| over the positions that drive the update;
* KL(current || reference), nats per path token, with the 0.05 line the issue asks runs to pass;
* the ratio s = exp(mean log-ratio per token): mean, min and max over each logged window;
* clip fraction;
* tree reward of the current and the reference trees.

Usage:
    python bench/plot_gto_diagnostics.py RUN_DIR_OR_METRICS [...] --out gto_diagnostics.png

Runs logged before issue 18 lack the std/min/max keys: those curves are skipped, not faked.
Log every update with ``--set training.log_every=1`` (the default config logs windows of 5).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

PANELS = (
    ("debiased reward R", [("gto/debiased_reward", "mean", "gto/debiased_reward_std")]),
    ("advantage A", [("gto/advantage_mean", "mean", None), ("gto/advantage_std", "std", None),
                     ("gto/advantage_abs", "|A|", None)]),
    ("KL to reference (nats/token)", [("gto/kl_reference", "KL", None)]),
    ("ratio", [("gto/ratio", "mean", None), ("gto/ratio_min", "min", None), ("gto/ratio_max", "max", None)]),
    ("clip fraction", [("gto/clip_fraction", "clipped", None)]),
    ("tree reward", [("gto/reward", "current", None), ("gto/reference_reward", "reference", None)]),
)
STYLES = {"mean": "-", "std": "--", "|A|": ":", "min": "--", "max": ":", "reference": "--"}
KL_TARGET = 0.05


def metrics_path(path: Path) -> Path:
    return path / "metrics.jsonl" if path.is_dir() else path


def train_rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in metrics_path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") == "train" and any(k.startswith("gto/") for k in r)]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    kept = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
    return [s for s, _ in kept], [v for _, v in kept]


def plot(runs: list[Path], out: Path, labels: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Write the figure; return each run's last logged values of the plotted keys (for tables)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    last: dict[str, dict[str, float]] = {}
    for i, run in enumerate(runs):
        rows = train_rows(run)
        name = labels[i] if labels else (run.name if run.is_dir() else run.parent.name)
        colour = colours[i % len(colours)]
        last[name] = {}
        for ax, (title, curves) in zip(axes.flat, PANELS):
            for key, label, band in curves:
                steps, values = series(rows, key)
                if not steps:
                    continue
                last[name][key] = values[-1]
                ax.plot(steps, values, STYLES.get(label, "-"), color=colour, label=f"{name} {label}")
                if band:
                    _, spread = series(rows, band)
                    if len(spread) == len(values):
                        ax.fill_between(steps, [v - s for v, s in zip(values, spread)],
                                        [v + s for v, s in zip(values, spread)], color=colour, alpha=0.15)
            ax.set_title(title)
    axes.flat[2].axhline(KL_TARGET, color="grey", linewidth=0.8, linestyle="--", label=f"{KL_TARGET} nats")
    for ax in axes.flat:
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return last


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories or metrics.jsonl files")
    parser.add_argument("--out", type=Path, default=Path("gto_diagnostics.png"))
    parser.add_argument("--labels", default=None, help="comma-separated names, one per run")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    last = plot(args.runs, args.out, labels)
    print(json.dumps({"figure": str(args.out), "last": last}, indent=1))


if __name__ == "__main__":
    main()
