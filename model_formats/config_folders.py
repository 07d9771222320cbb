"""Diffusers-layout config folders (configs and tokenizers, no weights) written offline."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def write_config_folder(
    folder: Path, *, model_index: dict, configs: dict[str, dict], write_rest: Callable[[Path], None]
) -> Path:
    """``folder`` with ``model_index.json``, one ``<component>/config.json`` per entry of ``configs`` and
    what ``write_rest(tmp)`` adds (text encoders, tokenizers, scheduler): written whole or not at all, and
    only once (an existing folder is kept)."""
    from core.atomic import atomic_path

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    with atomic_path(folder) as tmp:
        write_json(tmp / "model_index.json", model_index)
        for component, config in configs.items():
            write_json(tmp / component / "config.json", config)
        write_rest(tmp)
    return folder


def save_transformers_config(folder: Path, config_class, values: dict, *, architecture: str) -> None:
    """A transformers model config (``config_class(**values)``) saved as the model class ``architecture``."""
    config = config_class(**values)
    config.architectures = [architecture]
    config.save_pretrained(folder)
