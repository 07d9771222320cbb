"""Load a Flux pipeline from a diffusers folder, or from a BFL transformer file plus a folder for the rest."""

from __future__ import annotations

from pathlib import Path

from core.errors import UserError
from core.regular_files import read_config


def flux_components_folder(path: Path, models_dir: Path) -> Path:
    """The Flux diffusers folder whose VAE, text encoders and scheduler go with a transformer single file.

    The file's header may name one (``lora_studio.diffusers_config``); otherwise the Flux folders in
    ``models_dir`` whose text encoders fit the file's input widths are candidates, one with the same
    guidance embedding (dev vs schnell, which also differ in scheduler) first.
    """
    from core.model_files import list_models
    from families.flux_layout import checkpoint_shapes, transformer_config_from_shapes
    from model_formats.single_file import companion_folder

    named = companion_folder(path, models_dir)
    if named:
        return named
    wanted = transformer_config_from_shapes(checkpoint_shapes(path))
    candidates = []
    for entry in list_models(models_dir):
        if entry.family != "flux" or entry.single_file:
            continue
        config = read_config(entry.path / "transformer" / "config.json")
        if config is None:
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


def load_flux_pipeline(entry, *, models_dir: Path, dtype):
    from diffusers import FluxPipeline

    if not entry.single_file:
        return FluxPipeline.from_pretrained(str(entry.path), dtype=dtype)
    from families.flux_layout import load_flux_transformer, rope_axes_of

    components = flux_components_folder(entry.path, models_dir)
    transformer = load_flux_transformer(entry.path, rope_axes=rope_axes_of(components), dtype=dtype)
    return FluxPipeline.from_pretrained(str(components), transformer=transformer, dtype=dtype)
