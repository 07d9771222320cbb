"""The app's ``config.json``: typed, validated, with paths resolved against its folder."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError

LANGUAGES = ("en", "fr")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class AppConfig:
    MODELS_DIR: Path
    LORAS_DIR: Path
    LORA_PROJECTS_DIR: Path
    OUTPUTS_DIR: Path
    # family → the base model preselected for it; config.json holds one DEFAULT_<FAMILY>_MODEL_FOR_LORA each.
    DEFAULT_MODELS_FOR_LORA: dict[str, str]
    LANGUAGE: str = "en"
    DEVICE: str = "auto"
    BUILD_DEMO_MODELS: bool = True
    AUTH: str = ""  # "user:password" required to open the app; needed with --listen
    MAX_GENERATE_STEPS: int = 150  # the most sampling steps one Generate request may ask for
    MAX_IMAGE_SIDE: int = 2048  # the largest width or height, in pixels, Generate accepts
    DATASETS_DIR: Path | None = None  # config_from_dict fills it: "datasets" beside config.json
    IMAGE_ROOTS: tuple[Path, ...] = ()  # the only folders Prepare reads from (tab and API); never empty
    MAX_IMAGE_FILE_MB: int = 200  # image files larger than this are skipped, not read
    QUEUE_DB: Path | None = None  # config_from_dict fills it: the job queue's SQLite file in LORA_PROJECTS_DIR
    QUEUE_RESUME_INTERRUPTED: bool = False  # at start, queue the jobs a crash interrupted again (from checkpoints)
    QUEUE_MAX_WAITING: int = 1000  # the most jobs waiting in the queue; one more is refused

    def served_folders(self) -> tuple[Path, ...]:
        """The folders whose files the app hands to browsers (Gradio's ``allowed_paths``): generated images
        only, never models, LoRAs or projects."""
        return (self.OUTPUTS_DIR,)

    def folders(self) -> tuple[Path, ...]:
        datasets = (self.DATASETS_DIR,) if self.DATASETS_DIR else ()
        return (self.MODELS_DIR, self.LORAS_DIR, self.LORA_PROJECTS_DIR, self.OUTPUTS_DIR, *datasets)


_PATH_KEYS = {"MODELS_DIR", "LORAS_DIR", "LORA_PROJECTS_DIR", "OUTPUTS_DIR", "DATASETS_DIR", "QUEUE_DB"}
_JSON_TYPES = {"bool": bool, "int": int, "tuple[Path, ...]": list}
_TYPES = {f.name: f.type for f in dataclasses.fields(AppConfig)}
# Below these nothing can be generated; above them one request can hold the GPU for hours.
_INT_RANGES = {
    "MAX_GENERATE_STEPS": (1, 1000),
    "MAX_IMAGE_SIDE": (64, 8192),
    "MAX_IMAGE_FILE_MB": (1, 10240),
    "QUEUE_MAX_WAITING": (1, 100_000),  # a bound on the queue file and on what one list of it costs
}


def _default_model_keys() -> dict[str, str]:
    """config.json key → family, one ``DEFAULT_<FAMILY>_MODEL_FOR_LORA`` per registered family."""
    from families import FAMILY_NAMES

    return {f"DEFAULT_{name.upper()}_MODEL_FOR_LORA": name for name in FAMILY_NAMES}


def _demo_name(name: str) -> str:
    from families import family

    return family(name).demo_name


def config_from_dict(raw: dict, *, base_dir: Path) -> AppConfig:
    default_models = _default_model_keys()
    known = (set(_TYPES) - {"DEFAULT_MODELS_FOR_LORA"}) | set(default_models)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"config: unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(sorted(known))}")
    required = [f.name for f in dataclasses.fields(AppConfig) if f.default is dataclasses.MISSING]
    # A family's DEFAULT_<FAMILY>_MODEL_FOR_LORA may be left out: the family's demo model is its default.
    required = [key for key in required if key != "DEFAULT_MODELS_FOR_LORA"]
    missing = [key for key in required if key not in raw]
    if missing:
        raise UserError(f"config: missing key(s) {', '.join(missing)}")
    values = {"DEFAULT_MODELS_FOR_LORA": {}}
    for key, value in raw.items():
        expected = _JSON_TYPES.get(_TYPES.get(key, "str"), str)
        if key in _PATH_KEYS:
            expected = str
        if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
            raise UserError(f"config: {key} must be a {expected.__name__}, got {type(value).__name__} {value!r}")
        values[key] = (base_dir / value).resolve() if key in _PATH_KEYS else value
    values["DEFAULT_MODELS_FOR_LORA"] = {
        name: values.pop(key) if key in values else _demo_name(name) for key, name in default_models.items()
    }
    values.setdefault("DATASETS_DIR", (base_dir / "datasets").resolve())
    values.setdefault("QUEUE_DB", values["LORA_PROJECTS_DIR"] / ".queue.sqlite")
    values["IMAGE_ROOTS"] = _image_roots(raw.get("IMAGE_ROOTS"), base_dir=base_dir, datasets=values["DATASETS_DIR"])
    config = AppConfig(**values)
    if config.LANGUAGE not in LANGUAGES:
        raise UserError(f"config: LANGUAGE must be one of {', '.join(LANGUAGES)}, got {config.LANGUAGE!r}")
    if config.DEVICE not in DEVICES:
        raise UserError(f"config: DEVICE must be one of {', '.join(DEVICES)}, got {config.DEVICE!r}")
    for key, (low, high) in _INT_RANGES.items():
        if not low <= getattr(config, key) <= high:
            raise UserError(f"config: {key} must be between {low} and {high}, got {getattr(config, key)}")
    return config


def _image_roots(raw: list | None, *, base_dir: Path, datasets: Path) -> tuple[Path, ...]:
    """IMAGE_ROOTS resolved (``~`` expanded, relative to config.json); default: home and DATASETS_DIR."""
    if raw is None:
        return (Path.home().resolve(), datasets)
    if not raw:
        raise UserError(
            'config: IMAGE_ROOTS is empty; list the folders the app may read photos from, e.g. ["~", "datasets"] '
            "(an empty list does not mean no restriction)"
        )
    bad = [entry for entry in raw if not isinstance(entry, str) or not entry.strip()]
    if bad:
        raise UserError(f"config: IMAGE_ROOTS must list folder paths as strings, got {bad[0]!r}")
    return tuple((base_dir / Path(entry).expanduser()).resolve() for entry in raw)


def load_config(path: Path) -> AppConfig:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UserError(f"config: file not found: {path}") from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"config: {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    if not isinstance(raw, dict):
        raise UserError(f"config: {path} must hold a JSON object")
    return config_from_dict(raw, base_dir=path.resolve().parent)


def ensure_folders(config: AppConfig) -> None:
    for folder in config.folders():
        folder.mkdir(parents=True, exist_ok=True)


_LANGUAGE_ENTRY = re.compile(r'("LANGUAGE"\s*:\s*)"(?:[^"\\]|\\.)*"')


def save_language(path: Path, language: str) -> None:
    """Set LANGUAGE in config.json, atomically; the rest of the file (order, layout) is kept as it is."""
    from core.atomic import write_text_atomic

    if language not in LANGUAGES:
        raise UserError(f"config: LANGUAGE must be one of {', '.join(LANGUAGES)}, got {language!r}")
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    raw = json.loads(text)
    edited, count = _LANGUAGE_ENTRY.subn(lambda m: f'{m.group(1)}"{language}"', text)
    # One entry and nothing else changed: keep the user's layout; anything odder is written out afresh.
    if count != 1 or json.loads(edited) != {**raw, "LANGUAGE": language}:
        edited = json.dumps({**raw, "LANGUAGE": language}, indent=2, ensure_ascii=False) + "\n"
    write_text_atomic(path, edited)
