"""What a sweep found: the trials table, parameter importance and a parallel-coordinates picture.

Everything is read from the study's storage, so any worker, page or command shows the same.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from modules.lora_training.sweep_study import Study

PLOT_SIZE = (900, 420)
_MARGIN = (70, 40, 90, 50)  # left, top, right, bottom


def trials_table(study: Study) -> list[dict]:
    """One row per trial: number, state, parameters, objective, the last objective reported (a running trial's
    figure so far), the step a pruned trial stopped at, worker, error."""
    rows = []
    for trial in study.optuna_study.get_trials(deepcopy=False):
        steps = sorted(trial.intermediate_values)
        rows.append(
            {
                "number": trial.number,
                "state": trial.state.name.lower(),
                "params": dict(trial.params or trial.system_attrs.get("fixed_params", {})),  # waiting: its queued ones
                "value": trial.value,
                "last_value": trial.intermediate_values[steps[-1]] if steps else None,
                "pruned_at_step": trial.user_attrs.get("pruned_at_step", steps[-1] if steps else None)
                if trial.state.name == "PRUNED"
                else None,
                "last_step": steps[-1] if steps else None,
                "worker": trial.user_attrs.get("worker", ""),
                "error": trial.user_attrs.get("error", ""),
            }
        )
    return rows


def importance(study: Study) -> dict[str, float]:
    """Each swept parameter's share of the objective's variation (Optuna's default evaluator, PED-ANOVA);
    {} until two trials are complete."""
    import optuna
    from optuna.trial import TrialState

    if len(study.optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = optuna.importance.get_param_importances(study.optuna_study)
    except (RuntimeError, ValueError, ZeroDivisionError):
        return {}  # all complete trials alike: nothing to attribute
    return {name: float(value) for name, value in found.items() if math.isfinite(value)}


def best_trial(study: Study) -> dict | None:
    complete = [row for row in trials_table(study) if row["state"] == "complete" and row["value"] is not None]
    return min(complete, key=lambda row: (study.rank_key(row["value"]), row["number"])) if complete else None


def summary(study: Study, *, with_importance: bool = True) -> dict:
    """The study in one dict: budget, counts by state, the trials table, importance ({} without
    ``with_importance``) and the best trial."""
    rows = trials_table(study)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    return {
        "study": study.name,
        "project": study.project,
        "budget": study.budget,
        "counts": counts,
        "trials": rows,
        "importance": importance(study) if with_importance else {},
        "best": best_trial(study),
    }


def _axis_position(parameter, value) -> float | None:
    """0..1 along a parameter's axis (log scale for log ranges); None for a value off the axis."""
    if parameter.choices:
        index = list(parameter.choices).index(value) if value in parameter.choices else None
        return None if index is None else (index + 0.5) / len(parameter.choices)
    if parameter.log:
        return (math.log(value) - math.log(parameter.low)) / (math.log(parameter.high) - math.log(parameter.low))
    return (value - parameter.low) / (parameter.high - parameter.low)


def _colour(share: float) -> tuple[int, int, int]:
    """Blue for the best objective, through purple, to red for the worst."""
    return (int(40 + 200 * share), 60, int(220 - 180 * share))


def _axis_labels(parameter) -> list[tuple[float, str]]:
    if parameter.choices:
        return [((i + 0.5) / len(parameter.choices), str(c)) for i, c in enumerate(parameter.choices)]
    return [(0.0, f"{parameter.low:g}"), (1.0, f"{parameter.high:g}")]


def _label(draw, where: tuple[float, float], text: str, *, font) -> None:
    """An axis label on a white box, readable over the lines."""
    box = draw.textbbox(where, text, font=font, anchor="lm")
    draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill="white")
    draw.text(where, text, fill="dimgray", font=font, anchor="lm")


def parallel_coordinates(study: Study, path: Path) -> Path | None:
    """A PNG with one vertical axis per swept parameter and one for the objective; each complete trial is a
    line across them, blue for the best objective and red for the worst (the best at the top of its axis). None before any trial completes."""
    rows = [row for row in trials_table(study) if row["state"] == "complete" and row["value"] is not None]
    if not rows:
        return None
    from PIL import Image, ImageDraw, ImageFont

    from core.atomic import atomic_path

    parameters = study.space.parameters
    width, height = PLOT_SIZE
    left, top, right, bottom = _MARGIN
    image = Image.new("RGB", PLOT_SIZE, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    xs = [left + i * (width - left - right) / len(parameters) for i in range(len(parameters) + 1)]
    best, worst = (
        min((study.rank_key(r["value"]), r["value"]) for r in rows),
        max((study.rank_key(r["value"]), r["value"]) for r in rows),
    )
    spread = (worst[0] - best[0]) or 1.0

    def y_of(share: float) -> float:
        return top + (1 - share) * (height - top - bottom)

    for row in sorted(rows, key=lambda r: -study.rank_key(r["value"])):  # the best drawn last, on top
        share = (study.rank_key(row["value"]) - best[0]) / spread  # 0 for the best, 1 for the worst
        points = [_axis_position(p, row["params"].get(p.name)) for p in parameters] + [1 - share]
        if None in points:
            continue
        draw.line([(x, y_of(s)) for x, s in zip(xs, points, strict=True)], fill=_colour(share), width=2)
    for x, parameter in zip(xs, parameters, strict=False):
        draw.line([(x, top), (x, height - bottom)], fill="black")
        draw.text((x, height - bottom + 8), parameter.name, fill="black", font=font, anchor="ma")
        for share, label in _axis_labels(parameter):
            _label(draw, (x + 4, y_of(share)), label, font=font)
    draw.line([(xs[-1], top), (xs[-1], height - bottom)], fill="black")
    draw.text(
        (xs[-1], height - bottom + 8), study.space.objective.replace("_", " "), fill="black", font=font, anchor="ma"
    )
    _label(draw, (xs[-1] + 4, y_of(1.0)), f"{best[1]:.4g}", font=font)
    _label(draw, (xs[-1] + 4, y_of(0.0)), f"{worst[1]:.4g}", font=font)
    draw.text((left, 12), f"{study.name}: {len(rows)} complete trial(s)", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
