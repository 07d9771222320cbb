"""Training metrics: ``logs/metrics.jsonl`` (one line per step) and a loss plot."""

from __future__ import annotations

import json
from pathlib import Path

from core.atomic import atomic_path


def read_metrics(logs: Path) -> list[dict]:
    path = Path(logs) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash
    return records


def write_loss_plot(logs: Path) -> Path | None:
    """``logs/loss.png``: loss per step and its moving average."""
    records = read_metrics(logs)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    figure = Figure(figsize=(6, 3), dpi=100)
    axes = figure.add_subplot()
    axes.plot(steps, losses, alpha=0.35, label="loss")
    axes.plot(steps, smooth, label=f"average of {window}")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend(loc="upper right")
    figure.tight_layout()
    path = Path(logs) / "loss.png"
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path
