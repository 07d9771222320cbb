"""A sweep's search space, read from JSON and checked strictly before any trial runs.

```json
{
  "parameters": {
    "learning_rate": {"low": 1e-5, "high": 1e-3, "log": true},
    "rank": [4, 8, 16],
    "alpha": [4, 8, 16],
    "optimizer": ["adamw", "lion"]
  },
  "fixed": {"batch_size": 1},
  "trial_steps": 100,
  "reports": 4,
  "pruner": {"type": "median", "startup_trials": 2, "warmup_steps": 0},
  "sampler": {"type": "tpe", "seed": 0},
  "enqueue": [{"learning_rate": 1e-4, "rank": 16}]
}
```

A list is a set of choices; ``{"low", "high"}`` a range (``"log": true`` for log-uniform, ``"step"`` for a grid)
of a numeric option. Only options of :class:`.config.TrainConfig` that change what a LoRA learns can be swept;
``fixed`` sets other options for every trial and for the full run "Train with the best settings" starts.
Each trial trains ``trial_steps`` steps (the ``steps`` parameter when it is swept) and measures the held-out
validation loss ``reports`` times on the way, which is what the pruner judges.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass, field

from core.errors import UserError
from modules.lora_training.config import MAX_STEPS, TrainConfig, config_from_dict

MAX_SPACE_BYTES = 64 * 1024
MAX_TRIALS = 500
MAX_PARAMETERS = 16
MAX_CHOICES = 32
MAX_RANGE_STEPS = 1_000_000  # (high - low) / step of a range: beyond, Optuna's decimal arithmetic fails
MAX_REPORTS = 20
DEFAULT_TRIAL_STEPS = 100
DEFAULT_REPORTS = 4
PRUNERS = ("median", "percentile", "hyperband", "none")
SAMPLERS = ("tpe", "random")
OBJECTIVES = ("validation_loss", "subject_similarity")  # the second needs a CLIP model (:mod:`.sweep_clip`)
# Options that name things, place files or only change speed or memory: sweeping them tells nothing.
NOT_SWEPT = frozenset(
    {
        "project",
        "base_model",
        "name",
        "family",
        "epochs",
        "save_every_steps",
        "keep_checkpoints",
        "sample_every_steps",
        "sample_prompts",
        "sample_steps",
        "sample_seed",
        "overwrite",
        "also_save_webui",
        "device",
        "cache_latents",
        "cache_text_embeddings",
        "validation_share",
        "gradient_checkpointing",
        "reg_images_dir",  # a folder to read: set in "fixed", where it is checked against IMAGE_ROOTS
    }
)
# Options each trial sets itself: a fixed value for them would be overwritten.
TRIAL_OWNED = frozenset({"project", "name", "save_every_steps", "sample_every_steps", "overwrite", "also_save_webui"})
_TOP_KEYS = ("parameters", "fixed", "trial_steps", "reports", "pruner", "sampler", "enqueue", "objective")
_PLACEHOLDER = {"project": "sweep", "base_model": "sweep"}


def sweepable() -> tuple[str, ...]:
    return tuple(name for name in typing.get_type_hints(TrainConfig) if name not in NOT_SWEPT)


@dataclass(frozen=True)
class Parameter:
    name: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    def suggest(self, trial):
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def distribution(self):
        """Optuna's distribution of a range (building it checks what Optuna checks)."""
        from optuna.distributions import FloatDistribution, IntDistribution

        if self.integer:
            return IntDistribution(int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return FloatDistribution(self.low, self.high, step=self.step, log=self.log)

    def contains(self, value) -> bool:
        if self.choices:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, int | float) or not self.low <= value <= self.high:
            return False
        return (not self.integer or float(value).is_integer()) and self.distribution()._contains(value)

    def describe(self) -> str:
        if self.choices:
            return f"{self.name} in {list(self.choices)}"
        scale = " (log)" if self.log else ""
        return f"{self.name} from {self.low:g} to {self.high:g}{scale}"


@dataclass(frozen=True)
class SweepSpace:
    parameters: tuple[Parameter, ...]
    fixed: dict = field(default_factory=dict)
    trial_steps: int = DEFAULT_TRIAL_STEPS
    reports: int = DEFAULT_REPORTS
    pruner: dict = field(default_factory=lambda: {"type": "median"})
    sampler: dict = field(default_factory=lambda: {"type": "tpe"})
    enqueue: tuple[dict, ...] = ()
    objective: str = "validation_loss"

    def suggest(self, trial) -> dict:
        return {parameter.name: parameter.suggest(trial) for parameter in self.parameters}

    def names(self) -> tuple[str, ...]:
        return tuple(parameter.name for parameter in self.parameters)


def _check_value(name: str, value) -> None:
    """A value the option accepts (type and range), with the config's own message when it does not."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"Sweep parameter {name}: {value!r} is not a finite number.")
    config_from_dict(TrainConfig, {**_PLACEHOLDER, name: value})


def _choices(name: str, values: list) -> Parameter:
    if not values:
        raise UserError(f"Sweep parameter {name} has an empty list of choices: give at least one value.")
    if len(values) > MAX_CHOICES:
        raise UserError(f"Sweep parameter {name} has {len(values)} choices; use at most {MAX_CHOICES}.")
    for value in values:
        if isinstance(value, dict | list) or value is None:
            raise UserError(f"Sweep parameter {name}: each choice must be a number, a text or true/false.")
        _check_value(name, value)
    if len({json.dumps(v) for v in values}) != len(values):
        raise UserError(f"Sweep parameter {name} lists the same choice twice.")
    return Parameter(name, choices=tuple(values))


def _number(name: str, spec: dict, key: str):
    value = spec.get(key)
    if value is None and key in ("low", "high"):
        raise UserError(f'Sweep parameter {name} needs both "low" and "high" (or a list of choices).')
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise UserError(f'Sweep parameter {name}: "{key}" must be a number; got {value!r}.')
    if value is not None and not math.isfinite(value):
        raise UserError(f'Sweep parameter {name}: "{key}" is not a finite number ({value!r}).')
    return value


def _range(name: str, spec: dict) -> Parameter:
    unknown = sorted(set(spec) - {"low", "high", "log", "step"})
    if unknown:
        raise UserError(f"Sweep parameter {name}: unknown key(s) {', '.join(unknown)}; use low, high, log and step.")
    kind = typing.get_type_hints(TrainConfig)[name]
    integer = kind in (int, int | None)
    if kind not in (int, float, int | None, float | None):
        raise UserError(f"Sweep parameter {name} is not a number: give a list of choices instead of a range.")
    low, high, step = _number(name, spec, "low"), _number(name, spec, "high"), _number(name, spec, "step")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f'Sweep parameter {name}: "log" must be true or false.')
    if not low < high:
        raise UserError(f"Sweep parameter {name}: low ({low:g}) must be below high ({high:g}).")
    _check_value(name, int(low) if integer else low)
    _check_value(name, int(high) if integer else high)
    if integer and (low != int(low) or high != int(high) or (step is not None and step != int(step))):
        raise UserError(f"Sweep parameter {name} takes whole numbers: low, high and step must be whole.")
    if log and low <= 0:
        raise UserError(f"Sweep parameter {name}: a log range needs low above 0; got {low:g}.")
    if step is not None and (step <= 0 or step > high - low or (log and not integer)):
        raise UserError(
            f"Sweep parameter {name}: step must be above 0 and at most high - low, and a float log range has no step."
        )
    if log and integer and step not in (None, 1):
        raise UserError(f"Sweep parameter {name}: a log range of whole numbers takes no step.")
    if step is not None and (high - low) / step > MAX_RANGE_STEPS:
        raise UserError(f"Sweep parameter {name}: step {step:g} is too small; use at most {MAX_RANGE_STEPS} steps.")
    parameter = Parameter(name, low=low, high=high, log=log, step=step, integer=integer)
    try:
        parameter.distribution()
    except (ArithmeticError, ValueError) as exc:
        raise UserError(f"Sweep parameter {name}: Optuna cannot draw from this range ({exc}).") from exc
    return parameter


def parse_parameter(name, spec) -> Parameter:
    if isinstance(name, str) and name in NOT_SWEPT:
        raise UserError(
            f"Sweep parameter {name}: it names files or folders or only changes speed or memory, so it cannot be "
            'swept; set it in "fixed".'
        )
    if not isinstance(name, str) or name not in sweepable():
        raise UserError(f"Unknown sweep parameter {name!r}: a sweep can vary {', '.join(sorted(sweepable()))}.")
    if isinstance(spec, list):
        return _choices(name, spec)
    if isinstance(spec, dict):
        return _range(name, spec)
    raise UserError(f'Sweep parameter {name}: give a list of choices or {{"low": ..., "high": ...}}.')


def _reject_constant(name: str):
    raise UserError(f"The search space holds {name}: every number must be finite.")


def load_json(text: str) -> dict:
    """The search space's JSON object; NaN and Infinity (which Python's json accepts) are refused."""
    if not isinstance(text, str) or not text.strip():
        raise UserError('The search space is empty: give a JSON object with "parameters".')
    if len(text.encode("utf-8", "surrogatepass")) > MAX_SPACE_BYTES:
        raise UserError(f"The search space is larger than {MAX_SPACE_BYTES // 1024} KB.")
    try:
        raw = json.loads(text, parse_constant=_reject_constant)
    except RecursionError as exc:  # "[[[[..." nested deeper than Python's stack
        raise UserError('The search space must be a JSON object with "parameters".') from exc
    except ValueError as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(f"The search space is not valid JSON (line {exc.lineno}: {exc.msg}).") from exc
    if not isinstance(raw, dict):
        raise UserError('The search space must be a JSON object with "parameters".')
    return raw


def _whole(raw: dict, key: str, *, default: int, low: int, high: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserError(f'Search space: "{key}" must be a whole number from {low} to {high}; got {value!r}.')
    return value


def _fixed(raw) -> dict:
    if not isinstance(raw, dict):
        raise UserError('Search space: "fixed" must be an object of training options.')
    owned = sorted(set(raw) & TRIAL_OWNED)
    if owned:
        raise UserError(f'Search space: "fixed" cannot set {", ".join(owned)}; each trial sets it.')
    config_from_dict(TrainConfig, {**_PLACEHOLDER, **raw})  # unknown options and bad values, with their names
    return dict(raw)


def _pruner(raw) -> dict:
    if not isinstance(raw, dict) or raw.get("type", "median") not in PRUNERS:
        raise UserError(f'Search space: "pruner" must be an object whose type is one of {", ".join(PRUNERS)}.')
    unknown = sorted(set(raw) - {"type", "startup_trials", "warmup_steps", "percentile"})
    if unknown:
        raise UserError(f"Search space: unknown pruner key(s) {', '.join(unknown)}.")
    pruner = {"type": raw.get("type", "median")}
    pruner["startup_trials"] = _whole(raw, "startup_trials", default=2, low=0, high=MAX_TRIALS)
    pruner["warmup_steps"] = _whole(raw, "warmup_steps", default=0, low=0, high=MAX_STEPS)
    pruner["percentile"] = _whole(raw, "percentile", default=50, low=1, high=99)
    return pruner


def _sampler(raw) -> dict:
    if not isinstance(raw, dict) or raw.get("type", "tpe") not in SAMPLERS:
        raise UserError(f'Search space: "sampler" must be an object whose type is one of {", ".join(SAMPLERS)}.')
    unknown = sorted(set(raw) - {"type", "seed"})
    if unknown:
        raise UserError(f"Search space: unknown sampler key(s) {', '.join(unknown)}.")
    sampler = {"type": raw.get("type", "tpe")}
    if "seed" in raw:
        sampler["seed"] = _whole(raw, "seed", default=0, low=0, high=2**31 - 1)
    return sampler


def _enqueued(raw, parameters: tuple[Parameter, ...], *, trials: int) -> tuple[dict, ...]:
    if not isinstance(raw, list) or not all(isinstance(row, dict) for row in raw):
        raise UserError('Search space: "enqueue" must be a list of objects (settings to try first).')
    if len(raw) > trials:
        raise UserError(f"Search space: {len(raw)} trials to try first, but the budget is {trials} trials.")
    by_name = {parameter.name: parameter for parameter in parameters}
    for row in raw:
        for name, value in row.items():
            if name not in by_name:
                raise UserError(f"Search space: an enqueued trial sets {name!r}, which is not a swept parameter.")
            if not by_name[name].contains(value):
                raise UserError(
                    f"Search space: an enqueued trial's {name} {value!r} is outside {by_name[name].describe()}."
                )
            _check_value(name, value)
    return tuple(dict(row) for row in raw)


def check_trials(trials) -> int:
    if isinstance(trials, float) and trials.is_integer():
        trials = int(trials)
    if isinstance(trials, bool) or not isinstance(trials, int) or not 1 <= trials <= MAX_TRIALS:
        raise UserError(f"The number of trials must be a whole number from 1 to {MAX_TRIALS}; got {trials!r}.")
    return trials


def parse_space(text: str, *, trials: int) -> SweepSpace:
    """The checked search space of ``text`` (JSON) for a budget of ``trials``; a UserError naming the first
    problem otherwise."""
    trials = check_trials(trials)
    raw = load_json(text)
    unknown = sorted(set(raw) - set(_TOP_KEYS))
    if unknown:
        raise UserError(f"Search space: unknown key(s) {', '.join(unknown)}; use {', '.join(_TOP_KEYS)}.")
    specs = raw.get("parameters")
    if not isinstance(specs, dict) or not specs:
        raise UserError('Search space: "parameters" must be an object naming at least one option to vary.')
    if len(specs) > MAX_PARAMETERS:
        raise UserError(f"Search space: {len(specs)} parameters; vary at most {MAX_PARAMETERS}.")
    parameters = tuple(parse_parameter(name, spec) for name, spec in specs.items())
    if raw.get("objective", "validation_loss") not in OBJECTIVES:
        raise UserError(f'Search space: "objective" must be one of {", ".join(OBJECTIVES)}.')
    return SweepSpace(
        parameters=parameters,
        fixed=_fixed(raw.get("fixed", {})),
        trial_steps=_whole(raw, "trial_steps", default=DEFAULT_TRIAL_STEPS, low=1, high=MAX_STEPS),
        reports=_whole(raw, "reports", default=DEFAULT_REPORTS, low=1, high=MAX_REPORTS),
        pruner=_pruner(raw.get("pruner", {})),
        sampler=_sampler(raw.get("sampler", {})),
        enqueue=_enqueued(raw.get("enqueue", []), parameters, trials=trials),
        objective=raw.get("objective", "validation_loss"),
    )
