"""Where a LoRA project's files live: ``LoRA_Projects_Internal/<project>/``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from core.atomic import write_text_atomic
from core.errors import UserError
from core.regular_files import UnreadableFile, read_json_bounded
from modules.lora_training.names import validate_name

MAX_PROJECT_JSON_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ProjectPaths:
    root: Path

    @classmethod
    def for_project(cls, projects_dir: Path, name: str) -> ProjectPaths:
        return cls(Path(projects_dir).resolve() / validate_name(name))

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def source(self) -> Path:
        """Photos uploaded from the browser for this project (prepared like any image folder)."""
        return self.root / "source"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def caption_cache(self) -> Path:
        """Each image's captioner outputs, by content hash and captioner settings (``caption_run.py``)."""
        return self.root / "caption_cache.json"


def read_json(path: Path, default=None):
    """The JSON in a project file, ``default`` when there is none; read as a regular file only (a FIFO would
    block the server) and bounded; a file that cannot be read is a UserError naming it."""
    if not os.path.lexists(path):
        return default
    try:
        return read_json_bounded(path, max_bytes=MAX_PROJECT_JSON_BYTES)
    except UnreadableFile as exc:
        raise UserError(
            f"Project file {path} cannot be used ({exc}); delete it or write it again (Prepare or a new run)."
        ) from exc


def write_json(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False))
