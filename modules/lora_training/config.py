"""Typed, frozen configs for preparation and training.

Each field may carry ``choices`` or ``minimum``/``maximum`` in its metadata;
``from_dict`` rejects unknown keys and bad values with a message naming them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError
from modules.lora_training.dataset.captioners import CAPTIONERS, FLORENCE_TASKS
from modules.lora_training.dataset.captions import EXISTING_CAPTION_MODES

FAMILIES = ("sdxl", "flux")


def choice(default, choices: tuple, help: str = ""):
    return field(default=default, metadata={"choices": choices, "help": help})


def bounded(default, *, minimum=None, maximum=None, help: str = ""):
    return field(default=default, metadata={"minimum": minimum, "maximum": maximum, "help": help})


def _check_type(name: str, value, annotation):
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        annotation = next(a for a in options if a is not type(None))
    if annotation is Path:
        if isinstance(value, str | Path):
            return Path(value)
    elif annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif typing.get_origin(annotation) is tuple:
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
    elif isinstance(value, annotation):
        return value
    raise UserError(f"{name} must be {getattr(annotation, '__name__', annotation)}, got {value!r}")


def config_from_dict(cls, raw: dict):
    """Build ``cls`` from a plain dict (JSON, CLI flags), validating every value."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(unknown)}; valid options are {', '.join(sorted(fields))}")
    values = {}
    for name, value in raw.items():
        f = fields[name]
        value = _check_type(name, value, hints[name])
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise UserError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
        minimum, maximum = f.metadata.get("minimum"), f.metadata.get("maximum")
        if value is not None and minimum is not None and value < minimum:
            raise UserError(f"{name} must be at least {minimum}; got {value!r}")
        if value is not None and maximum is not None and value > maximum:
            raise UserError(f"{name} must be at most {maximum}; got {value!r}")
        values[name] = value
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING]
    if missing:
        raise UserError(f"missing option(s): {', '.join(missing)}")
    return cls(**values)


def config_to_dict(config) -> dict:
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
    return out


@dataclass(frozen=True)
class PrepareConfig:
    project: str
    images_dir: Path
    trigger: str
    family: str = choice("sdxl", FAMILIES, "base model family the set is prepared for")
    resolution: int = bounded(1024, minimum=64, maximum=4096, help="bucket area is about resolution²")
    min_side: int | None = bounded(None, minimum=8, help="shortest side an image needs (default: resolution/2)")
    captioner: str = choice("florence2", CAPTIONERS, "caption model, or 'none' for .txt + trigger only")
    caption_task: str = choice("<DETAILED_CAPTION>", FLORENCE_TASKS, "Florence-2 task")
    caption_model: str | None = field(default=None, metadata={"help": "captioner folder or hub id"})
    existing_captions: str = choice("keep", EXISTING_CAPTION_MODES, "what to do with .txt beside the sources")
    recaption: bool = field(default=False, metadata={"help": "caption again, overwriting edited captions"})
    duplicate_threshold: int = bounded(4, minimum=0, maximum=32, help="perceptual-hash bits for near-duplicates")

    def __post_init__(self):
        if self.resolution % 64:
            raise UserError(f"resolution must be a multiple of 64; got {self.resolution}")

    @property
    def minimum_side(self) -> int:
        return self.min_side if self.min_side is not None else self.resolution // 2
