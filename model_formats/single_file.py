"""Helpers for single-file checkpoints of any family: the companion folder a file names, and writing one."""

from __future__ import annotations

from pathlib import Path

from core.errors import UserError

# Header key naming the diffusers folder (inside models/) whose configs a single file loads against.
COMPANION_KEY = "lora_studio.diffusers_config"


def companion_folder(path: Path, models_dir: Path) -> Path | None:
    """The diffusers folder a single file's header names as its companion (our demo files do), if any."""
    from core.model_files import resolve_inside
    from model_formats.safetensors_header import read_safetensors_header

    _, metadata = read_safetensors_header(path)
    named = metadata.get(COMPANION_KEY)
    if not named:
        return None
    folder = resolve_inside(models_dir, named)
    if not (folder / "model_index.json").is_file():
        raise UserError(f"{path.name} needs the model folder {folder}, which is missing.")
    return folder


def save_state_dict(state: dict, path: Path, *, metadata: dict[str, str]) -> None:
    """Write ``state`` as one ``.safetensors`` file, atomically."""
    from safetensors.torch import save_file

    from core.atomic import atomic_path

    with atomic_path(Path(path)) as tmp:
        save_file(state, str(tmp), metadata=metadata)
