"""Training presets: the shipped ones (``presets/*.json``) and those a user saved."""

from __future__ import annotations

import json
from pathlib import Path

from core.errors import UserError

PRESETS_DIR = Path(__file__).resolve().parent / "presets"


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
            return _with_learning_rate(json.loads(path.read_text(encoding="utf-8")))
    raise UserError(f"Preset {name!r} not found.")


def _with_learning_rate(preset: dict) -> dict:
    """A preset naming an optimizer but no learning rate gets that optimizer's usual one."""
    from modules.lora_training.config import default_learning_rate

    options = preset.get("options", {})
    if "optimizer" in options and "learning_rate" not in options:
        options["learning_rate"] = default_learning_rate(options["optimizer"])
    return preset
