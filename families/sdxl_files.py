"""What SDXL is on disk and to the estimate: detection, loading, LoRA names, meta-device inputs, the demo."""

from __future__ import annotations

from pathlib import Path

from families.unet_files import UNetFiles


class SDXLFiles(UNetFiles):
    # ----- detection and loading --------------------------------------------------------
    @classmethod
    def matches_checkpoint(cls, keys: list[str]) -> bool:
        return any(k.startswith("conditioner.embedders.1.") for k in keys)

    @classmethod
    def claims_lora_metadata(cls, metadata: dict[str, str]) -> bool:
        base = metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")
        return "sdxl" in base or "stable-diffusion-xl" in base

    @classmethod
    def load_pipeline(cls, entry, *, models_dir: Path, dtype):
        from families.sdxl_loading import load_sdxl_pipeline

        return load_sdxl_pipeline(entry, models_dir=models_dir, dtype=dtype)

    @classmethod
    def components_folder(cls, entry, models_dir: Path) -> Path:
        from families.sdxl_loading import single_file_config_folder

        return single_file_config_folder(entry.path, models_dir) if entry.single_file else entry.path

    # ----- the estimate -----------------------------------------------------------------
    @classmethod
    def meta_inputs(cls, config: dict, *, batch: int, latent_side: int, text_length: int, make) -> dict:
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        return {
            "sample": make(batch, config.get("in_channels", 4), latent_side, latent_side),
            "timestep": make(batch),
            "encoder_hidden_states": make(batch, 77, config["cross_attention_dim"]),
            "added_cond_kwargs": {"text_embeds": make(batch, pooled), "time_ids": make(batch, 6)},
            "return_dict": False,
        }

    @classmethod
    def narrow_config(cls, config: dict) -> dict:
        # The size conditioning: 6 time ids of 8 values each beside a 16-wide pooled text embedding.
        return {
            **super().narrow_config(config),
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 16 + 6 * 8,
        }

    # ----- LoRA files -------------------------------------------------------------------
    @classmethod
    def module_parts(cls, modules: list, layout: str) -> list[tuple[tuple[str, ...], str]]:
        from families.sdxl_lora_names import sdxl_module_parts

        return sdxl_module_parts(modules)

    @classmethod
    def kohya_plan(cls, source) -> list:
        from families.sdxl_lora_names import sdxl_kohya_plan

        return sdxl_kohya_plan(source)

    @classmethod
    def lycoris_name(cls, part: str) -> str:
        from families.sdxl_lora_names import sdxl_kohya_name

        return sdxl_kohya_name(part)

    @classmethod
    def lycoris_names(cls, parts: list[str]) -> dict[str, tuple[tuple[str, ...], str]]:
        from families.sdxl_lora_names import sdxl_upsampler_names

        return super().lycoris_names(parts) | sdxl_upsampler_names(parts)

    @classmethod
    def kohya_identity(cls) -> dict[str, str]:
        return {"ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora"}

    @classmethod
    def modelspec_identity(cls) -> dict[str, str]:
        return {
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        }

    # ----- full size and the demo model -------------------------------------------------
    @classmethod
    def full_size_config_folder(cls, models_dir: Path) -> Path:
        from families.sdxl_configs import SDXL_BASE_CONFIG_NAME, write_sdxl_base_config

        return write_sdxl_base_config(Path(models_dir) / "configs" / SDXL_BASE_CONFIG_NAME)

    @classmethod
    def build_demo_pipeline(cls, *, seed: int = 0):
        from families.sdxl_demo import build_tiny_sdxl_pipeline

        return build_tiny_sdxl_pipeline(seed=seed)

    @classmethod
    def save_single_file(cls, pipe, path: Path, *, metadata: dict[str, str]) -> None:
        from families.sdxl_layout import save_sdxl_single_file

        save_sdxl_single_file(pipe, path, metadata=metadata)
