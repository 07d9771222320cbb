"""Load a Stable Diffusion 1.5 pipeline from a diffusers folder or a single original-layout file (offline)."""

from __future__ import annotations

from pathlib import Path

# Components SD 1.5 folders may list that LoRA Studio never loads.
_NOT_LOADED = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def sd15_config_folder(path: Path, models_dir: Path) -> Path:
    """The diffusers-layout config folder a single-file SD 1.5 checkpoint loads against (offline)."""
    from families.sd15_configs import SD15_CONFIG_NAME, write_sd15_config
    from model_formats.single_file import companion_folder

    named = companion_folder(path, models_dir)
    return named or write_sd15_config(Path(models_dir) / "configs" / SD15_CONFIG_NAME)


def require_text_to_image(path: Path) -> None:
    """Refuse SD 1.x variants whose U-Net takes more than the 4 latent channels (inpainting: 9, instruct: 8)."""
    from core.errors import UserError
    from model_formats.safetensors_header import header_shapes

    shape = header_shapes(path).get("model.diffusion_model.input_blocks.0.0.weight")
    if shape is not None and len(shape) == 4 and shape[1] != 4:
        raise UserError(
            f"{path.name}: its U-Net takes {shape[1]} input channels (an inpainting or instruct variant); "
            "only text-to-image SD 1.5 checkpoints (4 channels) are supported."
        )


def load_sd15_pipeline(entry, *, models_dir: Path, dtype):
    from diffusers import StableDiffusionPipeline

    from families.sdxl_loading import scheduler_for_single_file

    if not entry.single_file:
        return StableDiffusionPipeline.from_pretrained(str(entry.path), dtype=dtype, **_NOT_LOADED)
    require_text_to_image(entry.path)
    config = sd15_config_folder(entry.path, models_dir)
    pipe = StableDiffusionPipeline.from_single_file(str(entry.path), config=str(config), dtype=dtype, **_NOT_LOADED)
    pipe.scheduler = scheduler_for_single_file(pipe.scheduler, entry.path)
    return pipe
