"""Find base models and LoRAs on disk; the families tell which one a model belongs to."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError

# Folders inside models/ that hold helpers, not base models.
_NOT_BASE_MODELS = {"captioners", "clip", "configs"}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    family: str
    single_file: bool


def detect_family(path: Path) -> str:
    """The registered family of a base model folder or single file (:func:`families.detect`)."""
    from families import detect

    return detect(path)


def list_models(models_dir: Path) -> list[ModelEntry]:
    """Every loadable base model in ``models_dir``; unreadable entries are left out."""
    entries = []
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return entries
    for path in sorted(models_dir.iterdir()):
        if path.name.startswith(".") or path.name in _NOT_BASE_MODELS:
            continue
        is_model_folder = path.is_dir() and (path / "model_index.json").is_file()
        is_file = path.is_file() and path.suffix == ".safetensors"
        if not (is_model_folder or is_file):
            continue
        try:
            family = detect_family(path)
        except Exception as exc:  # noqa: BLE001 - one odd folder or file must not break the whole list: it is left out
            logging.getLogger("lora_studio").info("model %s left out of the list: %s", path.name, exc)
            continue
        entries.append(ModelEntry(name=path.name, path=path, family=family, single_file=is_file))
    return entries


# Export copies of LoRAs already in loras/: webui/ for other apps (kohya/BFL layout, which diffusers cannot
# always read), diffusers/ as `export --format diffusers` writes them. Listing them would show a LoRA twice.
EXPORT_ONLY_FOLDERS = ("webui", "diffusers")


def list_loras(loras_dir: Path) -> list[str]:
    """LoRA names relative to ``loras_dir`` (sub-folders allowed, export copies left out), sorted."""
    loras_dir = Path(loras_dir)
    if not loras_dir.is_dir():
        return []
    names = []
    for path in loras_dir.rglob("*.safetensors"):
        parts = path.relative_to(loras_dir).parts
        if any(part.startswith(".") for part in parts) or (len(parts) > 1 and parts[0] in EXPORT_ONLY_FOLDERS):
            continue
        if path.is_file():
            names.append(str(path.relative_to(loras_dir)))
    return sorted(names)


def resolve_inside(folder: Path, name: str) -> Path:
    """``folder / name``, refusing anything that would land outside ``folder``."""
    folder = Path(folder).resolve()
    path = (folder / name).resolve()
    if path != folder and folder not in path.parents:
        raise UserError(f"{name!r} is outside {folder}: pick a file from the list (files inside that folder).")
    return path


def native_image_size(entry: ModelEntry, *, demo_size: int = 64) -> int:
    """The side length a model was trained at: 1024 for every family we load, small for the demo models."""
    from model_formats.safetensors_header import read_safetensors_header

    if entry.single_file:
        _, metadata = read_safetensors_header(entry.path)
        is_demo = metadata.get("lora_studio.random_weights") == "true"
    else:
        is_demo = (entry.path / "lora_studio_demo.json").is_file()
    return demo_size if is_demo else 1024


def model_entry(models_dir: Path, name_or_path: str) -> ModelEntry:
    """A base model named inside ``models_dir`` (by name, relative path or an absolute path inside it)."""
    candidate = Path(name_or_path).expanduser()
    if candidate.is_absolute():
        # Base models live in models/: a path from the API or the CLI may name one there, nothing else.
        try:
            name_or_path = str(candidate.relative_to(Path(models_dir).resolve()))
        except ValueError:
            raise UserError(
                f"Base model {candidate} is outside the models folder {Path(models_dir).resolve()}: "
                "copy it there (or pick a model from the list)."
            ) from None
    path = resolve_inside(models_dir, name_or_path)
    if not path.exists():
        raise UserError(
            f"Base model {name_or_path!r} not found (looked at {path}): pick one from the list, or put the model "
            "into the models folder and click Refresh."
        )
    return ModelEntry(name=path.name, path=path, family=detect_family(path), single_file=path.is_file())
