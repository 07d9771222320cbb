"""Training metrics: ``logs/metrics.jsonl`` (one line per step) and a loss plot."""

from __future__ import annotations

import json
from pathlib import Path

from core.atomic import atomic_path, write_text_atomic


def _records(logs: Path) -> list[dict]:
    path = Path(logs) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def read_metrics(logs: Path) -> list[dict]:
    """One record per training step: step, epoch, loss, lr, seconds."""
    return [r for r in _records(logs) if "loss" in r]


def read_validation(logs: Path) -> list[dict]:
    """The validation figures: step, validation_loss, training_images_loss (:mod:`.validation`)."""
    return [r for r in _records(logs) if "training_images_loss" in r]


def keep_metrics_up_to(logs: Path, *, step: int) -> None:
    """Drop the lines a stopped or killed run wrote after the checkpoint it resumes from."""
    path = Path(logs) / "metrics.jsonl"
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if _step_of(line) <= step]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(line + "\n" for line in kept))


def _step_of(line: str) -> float:
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        step = None
    # A line cut by a crash goes with the lines after the checkpoint.
    return step if isinstance(step, int) else float("inf")


def write_loss_plot(logs: Path) -> Path | None:
    """``logs/loss.png``: loss per step, its moving average and the validation figures."""
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
    for key, label in (("validation_loss", "held-out images"), ("training_images_loss", "training images")):
        points = [(r["step"], r[key]) for r in read_validation(logs) if r.get(key) is not None]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", label=f"{label} (fixed noise)")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend(loc="upper right")
    figure.tight_layout()
    path = Path(logs) / "loss.png"
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path
