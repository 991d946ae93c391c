"""Training curves: train and validation loss and the learning rate per step, from logs/metrics.jsonl (what train's
callback writes at each logging step and evaluation), as one picture beside eval's metrics.png. The same numbers are in
TensorBoard (`tensorboard --logdir runs/<run_id>/logs/tensorboard`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

FILE_NAME = "training_curves.png"


def read_curves(metrics_jsonl: Path) -> dict[str, list[tuple[int, float]]]:
    """{"loss" | "eval_loss" | "learning_rate": [(step, value), ...]}; lines that do not parse are skipped (a kill can
    cut the last one short), and a step logged again after a resume keeps its latest value."""
    curves: dict[str, dict[int, float]] = {"loss": {}, "eval_loss": {}, "learning_rate": {}}
    if not metrics_jsonl.is_file():
        return {name: [] for name in curves}
    for line in metrics_jsonl.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int):
            continue
        for name, points in curves.items():
            value = record.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                points[step] = float(value)
    return {name: sorted(points.items()) for name, points in curves.items()}


def plot_training_curves(metrics_jsonl: Path, path: Path, title: str) -> bool:
    """Writes the picture to `path`; False (and nothing written) when the run logged no loss."""
    curves = read_curves(metrics_jsonl)
    if not curves["loss"] and not curves["eval_loss"]:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, lr_ax) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=(2, 1))
    for name, label, style in (("loss", "train loss", "-"), ("eval_loss", "validation loss", "o-")):
        if curves[name]:
            steps, values = zip(*curves[name])
            loss_ax.plot(steps, values, style, label=label, markersize=4)
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    loss_ax.set_title(title)
    if curves["learning_rate"]:
        steps, values = zip(*curves["learning_rate"])
        lr_ax.plot(steps, values, color="tab:green")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    lr_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
