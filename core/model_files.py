"""Find base models and LoRAs on disk and tell which model family a file belongs to."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError

SDXL = "sdxl"
FLUX = "flux"
FAMILIES = (SDXL, FLUX)
# Folders inside models/ that hold helpers, not base models.
_NOT_BASE_MODELS = {"captioners", "configs"}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    family: str
    single_file: bool


def read_safetensors_header(path: Path) -> tuple[list[str], dict[str, str]]:
    """Tensor names and header metadata, without reading the tensors.

    Only a regular file is opened: a named pipe would block ``open()`` (inside safetensors,
    holding the GIL: every thread of the server would stop)."""
    from safetensors import safe_open

    require_regular_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys()), dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises several types for a bad file
        raise UserError(
            f"{Path(path).name} is not a readable .safetensors file ({exc}): download it again, or remove it."
        ) from exc


def require_regular_file(path: Path) -> None:
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise UserError(f"{Path(path).name} cannot be read ({exc.strerror}).") from exc
    if not stat.S_ISREG(mode):
        raise UserError(f"{Path(path).name} is not a regular file: only model files are read; remove it.")


def family_of_state_keys(keys: list[str]) -> str | None:
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return SDXL
    if any(k.startswith("model.diffusion_model.double_blocks.") or k.startswith("double_blocks.") for k in keys):
        return FLUX
    if any(k.startswith("transformer_blocks.") and ".attn.add_q_proj." in k for k in keys):
        return FLUX
    return None


def detect_family(path: Path) -> str:
    path = Path(path)
    if path.is_dir():
        index = path / "model_index.json"
        try:
            require_regular_file(index)
            class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
        except (OSError, ValueError, UserError) as exc:
            raise UserError(
                f"{path.name}: no readable model_index.json, so this is not a diffusers model folder; "
                "copy the whole folder of the model, or pick another one."
            ) from exc
        if "Flux" in class_name:
            return FLUX
        if "StableDiffusionXL" in class_name:
            return SDXL
        raise UserError(f"{path.name}: pipeline {class_name!r} is not supported; use an SDXL or Flux model.")
    keys, _ = read_safetensors_header(path)
    family = family_of_state_keys(keys)
    if family is None:
        raise UserError(
            f"{path.name}: not an SDXL or Flux checkpoint (unrecognised tensor names); pick a base model "
            "(LoRA files belong in the loras folder)."
        )
    return family


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
        except UserError:
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
    """The side length a model was trained at: 1024 for SDXL and Flux, small for the demo models."""
    if entry.single_file:
        _, metadata = read_safetensors_header(entry.path)
        is_demo = metadata.get("lora_studio.random_weights") == "true"
    else:
        is_demo = (entry.path / "lora_studio_demo.json").is_file()
    return demo_size if is_demo else 1024
