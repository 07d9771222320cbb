"""Training presets: the shipped ones (``presets/*.json``) and those a user saved."""

from __future__ import annotations

from pathlib import Path

from core.errors import UserError
from core.regular_files import UnreadableFile, read_json_bounded

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
MAX_PRESET_BYTES = 1 * 2**20


def preset_names(user_dir: Path | None = None) -> list[str]:
    """Shipped presets first, then the user's (``user_dir``), each sorted by name."""
    names = [p.stem for p in sorted(PRESETS_DIR.glob("*.json"))]
    if user_dir is not None and Path(user_dir).is_dir():
        names += [p.stem for p in sorted(Path(user_dir).glob("*.json"))]
    return names


def read_preset(name: str, *, user_dir: Path | None = None) -> dict:
    """``{"resolution", "options", "note"}`` of preset ``name``; a shipped one wins over a user's."""
    folders = [PRESETS_DIR] + ([Path(user_dir)] if user_dir is not None else [])
    for folder in folders:
        path = folder / f"{name}.json"
        if path.is_file():
            try:
                return _with_learning_rate(_checked(_read(path)))
            except (UnreadableFile, UserError) as exc:
                raise UserError(f"Preset {name!r} cannot be used ({exc}); fix or delete {path}.") from exc
    raise UserError(f"Preset {name!r} not found.")


def _read(path: Path) -> dict:
    """A preset file: a regular file (a FIFO would block the tab), a JSON object with an ``options`` object."""
    preset = read_json_bounded(path, max_bytes=MAX_PRESET_BYTES)  # NaN and Infinity refused
    if not isinstance(preset, dict) or not isinstance(preset.get("options", {}), dict):
        raise UnreadableFile('not a preset: {"resolution": ..., "options": {...}} expected')
    return preset


def _checked(preset: dict) -> dict:
    """Every value is validated as a run's would be (as saving a preset does) before it reaches the form."""
    from modules.lora_training.config import PrepareConfig, TrainConfig, config_from_dict

    config_from_dict(TrainConfig, {"project": "x", "base_model": "x", **preset.get("options", {})})
    if "resolution" in preset:
        config_from_dict(
            PrepareConfig, {"project": "x", "images_dir": "x", "trigger": "x", "resolution": preset["resolution"]}
        )
    if not isinstance(preset.get("note", ""), str):
        raise UserError("note must be text")
    return preset


def _with_learning_rate(preset: dict) -> dict:
    """A preset naming an optimizer but no learning rate gets that optimizer's usual one."""
    from modules.lora_training.config import default_learning_rate

    options = preset.get("options", {})
    if "optimizer" in options and "learning_rate" not in options:
        options["learning_rate"] = default_learning_rate(options["optimizer"])
    return preset
