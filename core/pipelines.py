"""Load an SDXL or Flux pipeline from a model entry: one code path for inference and training."""

from __future__ import annotations

import json
from pathlib import Path

from core.errors import UserError
from core.model_files import FLUX, SDXL, ModelEntry, read_safetensors_header, resolve_inside


def single_file_config_folder(path: Path, models_dir: Path) -> Path:
    """The diffusers-layout config folder a single-file SDXL checkpoint loads against (offline)."""
    from core.model_configs import SDXL_BASE_CONFIG_NAME, write_sdxl_base_config

    named = _folder_named_in_header(path, models_dir)
    return named or write_sdxl_base_config(Path(models_dir) / "configs" / SDXL_BASE_CONFIG_NAME)


def _folder_named_in_header(path: Path, models_dir: Path) -> Path | None:
    """The diffusers folder a single file's header names as its companion (our demo files do)."""
    _, metadata = read_safetensors_header(path)
    named = metadata.get("lora_studio.diffusers_config")
    if not named:
        return None
    folder = resolve_inside(models_dir, named)
    if not (folder / "model_index.json").is_file():
        raise UserError(f"{path.name} needs the model folder {folder}, which is missing.")
    return folder


def flux_components_folder(path: Path, models_dir: Path) -> Path:
    """The Flux diffusers folder whose VAE, text encoders and scheduler go with a transformer single file.

    The file's header may name one (``lora_studio.diffusers_config``); otherwise the Flux folders in
    ``models_dir`` whose text encoders fit the file's input widths are candidates, one with the same
    guidance embedding (dev vs schnell, which also differ in scheduler) first.
    """
    from core.flux_single_file import checkpoint_shapes, transformer_config_from_shapes
    from core.model_files import list_models

    named = _folder_named_in_header(path, models_dir)
    if named:
        return named
    wanted = transformer_config_from_shapes(checkpoint_shapes(path))
    candidates = []
    for entry in list_models(models_dir):
        if entry.family != FLUX or entry.single_file:
            continue
        try:
            config = json.loads((entry.path / "transformer" / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        widths = ("joint_attention_dim", "pooled_projection_dim")
        if all(config.get(key) == wanted[key] for key in widths):
            candidates.append((config.get("guidance_embeds") != wanted["guidance_embeds"], entry.name, entry.path))
    if not candidates:
        raise UserError(
            f"{path.name} is a Flux transformer alone: put a Flux diffusers folder (e.g. FLUX.1-dev; its "
            f"transformer weights are not needed) in {models_dir} for the VAE and text encoders."
        )
    return min(candidates)[2]


def load_pipeline(entry: ModelEntry, *, models_dir: Path, dtype):
    """The diffusers pipeline for ``entry`` on the CPU, in ``dtype``."""
    from diffusers import FluxPipeline, StableDiffusionXLPipeline

    if entry.family == SDXL:
        if entry.single_file:
            config = single_file_config_folder(entry.path, models_dir)
            pipe = StableDiffusionXLPipeline.from_single_file(str(entry.path), config=str(config), dtype=dtype)
            pipe.scheduler = scheduler_for_single_file(pipe.scheduler, entry.path)
        else:
            pipe = StableDiffusionXLPipeline.from_pretrained(str(entry.path), dtype=dtype)
    elif entry.family == FLUX:
        if entry.single_file:
            from core.flux_single_file import load_flux_transformer, rope_axes_of

            components = flux_components_folder(entry.path, models_dir)
            transformer = load_flux_transformer(entry.path, rope_axes=rope_axes_of(components), dtype=dtype)
            pipe = FluxPipeline.from_pretrained(str(components), transformer=transformer, dtype=dtype)
        else:
            pipe = FluxPipeline.from_pretrained(str(entry.path), dtype=dtype)
    else:
        raise UserError(f"Unknown model family {entry.family!r}.")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def scheduler_for_single_file(scheduler, path: Path):
    """The config folder's scheduler, switched to v-prediction / zero terminal SNR when the file says so.

    v-prediction SDXL fine-tunes carry an empty ``v_pred`` tensor (and ``ztsnr`` for a schedule
    rescaled to zero terminal SNR), the markers A1111, Forge and ComfyUI read; the config folder
    cannot know.
    """
    keys, _ = read_safetensors_header(path)
    changes = {}
    if "v_pred" in keys:
        changes["prediction_type"] = "v_prediction"
    if "ztsnr" in keys:
        changes.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return type(scheduler).from_config(scheduler.config, **changes) if changes else scheduler


def model_entry(models_dir: Path, name_or_path: str) -> ModelEntry:
    """A base model named inside ``models_dir`` (by name, relative path or an absolute path inside it)."""
    from core.model_files import detect_family

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
