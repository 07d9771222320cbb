"""Load an SDXL pipeline from a diffusers folder or a single original-layout file (offline)."""

from __future__ import annotations

from pathlib import Path


def single_file_config_folder(path: Path, models_dir: Path) -> Path:
    """The diffusers-layout config folder a single-file SDXL checkpoint loads against (offline)."""
    from families.sdxl_configs import SDXL_BASE_CONFIG_NAME, write_sdxl_base_config
    from model_formats.single_file import companion_folder

    named = companion_folder(path, models_dir)
    return named or write_sdxl_base_config(Path(models_dir) / "configs" / SDXL_BASE_CONFIG_NAME)


def scheduler_for_single_file(scheduler, path: Path):
    """The config folder's scheduler, switched to v-prediction / zero terminal SNR when the file says so.

    v-prediction SDXL fine-tunes carry an empty ``v_pred`` tensor (and ``ztsnr`` for a schedule
    rescaled to zero terminal SNR), the markers A1111, Forge and ComfyUI read; the config folder
    cannot know.
    """
    from model_formats.safetensors_header import read_safetensors_header

    keys, _ = read_safetensors_header(path)
    changes = {}
    if "v_pred" in keys:
        changes["prediction_type"] = "v_prediction"
    if "ztsnr" in keys:
        changes.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return type(scheduler).from_config(scheduler.config, **changes) if changes else scheduler


def load_sdxl_pipeline(entry, *, models_dir: Path, dtype):
    from diffusers import StableDiffusionXLPipeline

    if not entry.single_file:
        return StableDiffusionXLPipeline.from_pretrained(str(entry.path), dtype=dtype)
    config = single_file_config_folder(entry.path, models_dir)
    pipe = StableDiffusionXLPipeline.from_single_file(str(entry.path), config=str(config), dtype=dtype)
    pipe.scheduler = scheduler_for_single_file(pipe.scheduler, entry.path)
    return pipe
