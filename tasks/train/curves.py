"""A run's training curves as one PNG beside its CSVs: loss (training and validation), the task's score
(top-1 accuracy or mIoU, raw and EMA) and the learning rate, against the optimizer step."""
from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

from .checkpoint import writing

CURVES = "curves.png"
SCORES = ("top1", "mIoU")           # the first one the evaluation reports is the task's score panel


def plot_curves(rows: dict[str, list[dict]], path: Path) -> Path | None:
    """Draw ``{"train": [rows], "eval": [rows]}`` (``MetricsLog``'s rows) into ``path``, atomically;
    None if there is nothing to draw yet."""
    train, evals = rows.get("train", []), rows.get("eval", [])
    if not train and not evals:
        return None
    score = next((k for k in SCORES if any(k in r for r in evals)), None)
    panels = ["loss"] + ([score] if score else []) + ["lr"]
    fig = Figure(figsize=(4.2 * len(panels), 3.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        if panel == "loss":
            _line(ax, train, "loss", "training loss", alpha=0.8)
            _line(ax, evals, "loss", "validation loss", marker="o")
            _line(ax, evals, "ema_loss", "validation loss (EMA)", marker="o")
            ax.set_ylabel("loss")
            if all(r["loss"] > 0 for r in train if r.get("loss") is not None):
                ax.set_yscale("log")
        elif panel == "lr":
            _line(ax, train, "lr", "learning rate")
            ax.set_ylabel("learning rate")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        else:
            name = "top-1" if panel == "top1" else panel
            _line(ax, evals, panel, name, marker="o")
            _line(ax, evals, f"ema_{panel}", f"{name} (EMA)", marker="o")
            ax.set_ylabel(f"{'top-1 accuracy' if panel == 'top1' else panel} (%)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    with writing(path):
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    return path


def _line(ax, rows: list[dict], key: str, label: str, **style) -> None:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if points:
        steps, values = zip(*points)
        ax.plot(steps, values, label=label, markersize=3, **style)
