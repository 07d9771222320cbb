"""Where a LoRA project's files live: ``LoRA_Projects_Internal/<project>/``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.atomic import write_text_atomic
from modules.lora_training.names import validate_name


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
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default


def write_json(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False))
