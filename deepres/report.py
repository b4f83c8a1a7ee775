"""Plots and Markdown pages from runs: training curves in the style of Fig. 6."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METRICS = "metrics.jsonl"


def read_metrics(run: Path) -> list[dict]:
    """The records of a run's metrics.jsonl, in order."""
    path = Path(run) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(ax, metrics: list[dict], label: str, color=None) -> None:
    """Training error dashed, evaluation error solid, error % against iterations (Fig. 6)."""
    its = [m["iteration"] for m in metrics]
    (line,) = ax.plot(its, [m["train_error"] for m in metrics], "--", color=color, lw=1)
    for key in ("test_error", "val_error"):
        points = [(m["iteration"], m[key]) for m in metrics if key in m]
        if points:
            x, y = zip(*points, strict=True)
            ax.plot(x, y, "-", color=line.get_color(), lw=2, label=label)
            return
    line.set_label(label)


def style_axes(ax, title: str = "") -> None:
    """The paper's axes: iterations on x, error % on y."""
    ax.set_xlabel("iter.")
    ax.set_ylabel("error (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_run(run: Path) -> Path:
    """Write RUN/curves.png: one run's training (dashed) and evaluation (solid) error."""
    run = Path(run)
    fig, ax = plt.subplots(figsize=(6, 4))
    metrics = read_metrics(run)
    name = json.loads((run / "config.json").read_text())["model"]
    if metrics:
        plot_curves(ax, metrics, name)
    style_axes(ax, f"{name}: training (dashed) and evaluation (solid) error")
    path = run / "curves.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
