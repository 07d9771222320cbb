"""Load an SDXL or Flux pipeline from a model entry: one code path for inference and training."""

from __future__ import annotations

from pathlib import Path

from core.errors import UserError
from core.model_files import FLUX, SDXL, ModelEntry, read_safetensors_header, resolve_inside


def single_file_config_folder(path: Path, models_dir: Path) -> Path:
    """The diffusers-layout config folder a single-file SDXL checkpoint loads against (offline)."""
    from core.model_configs import SDXL_BASE_CONFIG_NAME, write_sdxl_base_config

    _, metadata = read_safetensors_header(path)
    named = metadata.get("lora_studio.diffusers_config")
    if named:
        folder = resolve_inside(models_dir, named)
        if not (folder / "model_index.json").is_file():
            raise UserError(f"{path.name} needs the config folder {folder}, which is missing.")
        return folder
    return write_sdxl_base_config(Path(models_dir) / "configs" / SDXL_BASE_CONFIG_NAME)


def load_pipeline(entry: ModelEntry, *, models_dir: Path, dtype):
    """The diffusers pipeline for ``entry`` on the CPU, in ``dtype``."""
    from diffusers import FluxPipeline, StableDiffusionXLPipeline

    if entry.family == SDXL:
        if entry.single_file:
            config = single_file_config_folder(entry.path, models_dir)
            pipe = StableDiffusionXLPipeline.from_single_file(str(entry.path), config=str(config), dtype=dtype)
        else:
            pipe = StableDiffusionXLPipeline.from_pretrained(str(entry.path), dtype=dtype)
    elif entry.family == FLUX:
        if entry.single_file:
            raise UserError(
                f"{entry.name}: a Flux transformer alone is not enough; use a Flux diffusers folder "
                "(model_index.json with transformer, VAE and both text encoders)."
            )
        pipe = FluxPipeline.from_pretrained(str(entry.path), dtype=dtype)
    else:
        raise UserError(f"Unknown model family {entry.family!r}.")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_entry(models_dir: Path, name_or_path: str) -> ModelEntry:
    """A base model named inside ``models_dir``, or given by path."""
    from core.model_files import detect_family

    candidate = Path(name_or_path).expanduser()
    path = candidate if candidate.is_absolute() else resolve_inside(models_dir, name_or_path)
    if not path.exists():
        raise UserError(f"Base model {name_or_path!r} not found (looked at {path}).")
    return ModelEntry(name=path.name, path=path, family=detect_family(path), single_file=path.is_file())
