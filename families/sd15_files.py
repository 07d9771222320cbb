"""What Stable Diffusion 1.5 is on disk and to the estimate: detection, loading, LoRA names, the demo."""

from __future__ import annotations

from pathlib import Path

from core.regular_files import read_config
from families.unet_files import UNetFiles


class SD15Files(UNetFiles):
    # ----- detection and loading --------------------------------------------------------
    @classmethod
    def matches_checkpoint(cls, keys: list[str]) -> bool:
        # SD 1.x conditions on Hugging Face CLIP under cond_stage_model.transformer.; SD 2.x on OpenCLIP
        # under cond_stage_model.model.; SDXL uses conditioner.embedders.
        return any(k.startswith("cond_stage_model.transformer.") for k in keys)

    @classmethod
    def folder_refusal(cls, folder: Path) -> str | None:
        """Why a diffusers folder whose pipeline class is SD 1.x's is not SD 1.x: SD 2.x shares the class, but
        its U-Net attends to OpenCLIP's 1024-wide text through linear projections (SD 1.x: 1x1 convolutions)."""
        unet = read_config(Path(folder) / "unet" / "config.json")  # None: loading names what is missing
        if isinstance(unet, dict) and (unet.get("use_linear_projection") or unet.get("cross_attention_dim") == 1024):
            return "Stable Diffusion 2.x is not supported (its U-Net has SD 2's OpenCLIP text layout)"
        return None

    @classmethod
    def claims_lora_metadata(cls, metadata: dict[str, str]) -> bool:
        return metadata.get("ss_base_model_version", "").startswith("sd_v1") or metadata.get(
            "modelspec.architecture", ""
        ).startswith("stable-diffusion-v1")

    @classmethod
    def load_pipeline(cls, entry, *, models_dir: Path, dtype):
        from families.sd15_loading import load_sd15_pipeline

        return load_sd15_pipeline(entry, models_dir=models_dir, dtype=dtype)

    @classmethod
    def components_folder(cls, entry, models_dir: Path) -> Path:
        from families.sd15_loading import sd15_config_folder

        return sd15_config_folder(entry.path, models_dir) if entry.single_file else entry.path

    # ----- the estimate -----------------------------------------------------------------
    @classmethod
    def meta_inputs(cls, config: dict, *, batch: int, latent_side: int, text_length: int, make) -> dict:
        return {
            "sample": make(batch, config.get("in_channels", 4), latent_side, latent_side),
            "timestep": make(batch),
            "encoder_hidden_states": make(batch, 77, config["cross_attention_dim"]),
            "return_dict": False,
        }

    # ----- LoRA files -------------------------------------------------------------------
    @classmethod
    def module_parts(cls, modules: list, layout: str) -> list[tuple[tuple[str, ...], str]]:
        from families.sd15_lora_names import sd15_module_parts

        return sd15_module_parts(modules)

    @classmethod
    def kohya_plan(cls, source) -> list:
        from families.sd15_lora_names import sd15_kohya_plan

        return sd15_kohya_plan(source)

    @classmethod
    def lycoris_name(cls, part: str) -> str:
        from families.sd15_lora_names import sd15_kohya_name

        return sd15_kohya_name(part)

    @classmethod
    def kohya_identity(cls) -> dict[str, str]:
        return {"ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora"}

    @classmethod
    def kohya_extra_metadata(cls, metadata: dict[str, str]) -> dict[str, str]:
        extra = {**super().kohya_extra_metadata(metadata), "ss_v2": "False"}
        if extra["ss_v_parameterization"] == "True":
            extra["ss_base_model_version"] = "sd_v1_v"  # sd-scripts' name for a v-prediction SD 1.x
        return extra

    @classmethod
    def modelspec_identity(cls) -> dict[str, str]:
        # sd-scripts' sai_model_spec: an SD 1.x LoRA is "diffusers"-implemented (only SDXL LoRAs are Stability's).
        return {"modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.implementation": "diffusers"}

    # ----- full size and the demo model -------------------------------------------------
    @classmethod
    def full_size_config_folder(cls, models_dir: Path) -> Path:
        from families.sd15_configs import SD15_CONFIG_NAME, write_sd15_config

        return write_sd15_config(Path(models_dir) / "configs" / SD15_CONFIG_NAME)

    @classmethod
    def build_demo_pipeline(cls, *, seed: int = 0):
        from families.sd15_demo import build_tiny_sd15_pipeline

        return build_tiny_sd15_pipeline(seed=seed)

    @classmethod
    def save_single_file(cls, pipe, path: Path, *, metadata: dict[str, str]) -> None:
        from families.sd15_layout import save_sd15_single_file

        save_sd15_single_file(pipe, path, metadata=metadata)
