"""What Flux is on disk and to the estimate: detection, loading, LoRA names, meta-device inputs, the demo."""

from __future__ import annotations

from pathlib import Path

from core.regular_files import read_config
from families.base import ModelFamily


class FluxFiles(ModelFamily):
    # ----- detection and loading --------------------------------------------------------
    @classmethod
    def matches_checkpoint(cls, keys: list[str]) -> bool:
        if any(k.startswith("model.diffusion_model.double_blocks.") or k.startswith("double_blocks.") for k in keys):
            return True
        return any(k.startswith("transformer_blocks.") and ".attn.add_q_proj." in k for k in keys)

    @classmethod
    def claims_lora_metadata(cls, metadata: dict[str, str]) -> bool:
        base = metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")
        return "flux" in base or "lora_flux" in metadata.get("ss_network_module", "")

    @classmethod
    def load_pipeline(cls, entry, *, models_dir: Path, dtype):
        from families.flux_loading import load_flux_pipeline

        return load_flux_pipeline(entry, models_dir=models_dir, dtype=dtype)

    @classmethod
    def components_folder(cls, entry, models_dir: Path) -> Path:
        from families.flux_loading import flux_components_folder

        return flux_components_folder(entry.path, models_dir) if entry.single_file else entry.path

    # ----- the estimate -----------------------------------------------------------------
    @classmethod
    def single_file_denoiser_shapes(cls, path: Path) -> dict[str, tuple[int, ...]]:
        """Diffusers-named shapes of a BFL-layout transformer file (fused q/k/v split), nothing read but the header."""
        import torch

        from families.flux_layout import checkpoint_shapes, original_to_diffusers

        empty = {key: torch.empty(shape, device="meta") for key, shape in checkpoint_shapes(path).items()}
        return {key: tuple(tensor.shape) for key, tensor in original_to_diffusers(empty).items()}

    @classmethod
    def denoiser_blueprint(cls, entry, *, models_dir: Path) -> tuple[type, dict]:
        from diffusers import FluxTransformer2DModel

        if not entry.single_file:
            return FluxTransformer2DModel, dict(FluxTransformer2DModel.load_config(entry.path / "transformer"))
        from families.flux_layout import checkpoint_shapes, rope_axes_of, transformer_config_from_shapes

        config = transformer_config_from_shapes(checkpoint_shapes(entry.path))
        axes = rope_axes_of(cls.components_folder(entry, models_dir))
        config["axes_dims_rope"] = list(axes) if axes else [16, 56, 56]
        return FluxTransformer2DModel, config

    @classmethod
    def text_tokens(cls, folder: Path) -> int:
        tokenizer = read_config(Path(folder) / "tokenizer_2" / "tokenizer_config.json") or {}
        length = tokenizer.get("model_max_length", 512)
        return min(512, int(length)) if isinstance(length, (int, float)) and 0 < length < 2**62 else 512

    @classmethod
    def meta_inputs(cls, config: dict, *, batch: int, latent_side: int, text_length: int, make) -> dict:
        tokens = (latent_side // 2) ** 2
        return {
            "hidden_states": make(batch, tokens, config["in_channels"]),
            "timestep": make(batch),
            "pooled_projections": make(batch, config["pooled_projection_dim"]),
            "encoder_hidden_states": make(batch, text_length, config["joint_attention_dim"]),
            "txt_ids": make(text_length, 3),
            "img_ids": make(tokens, 3),
            "guidance": make(batch) if config.get("guidance_embeds") else None,
            "return_dict": False,
        }

    @classmethod
    def narrow_config(cls, config: dict) -> dict:
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        config.update(
            num_attention_heads=1,
            attention_head_dim=16,
            axes_dims_rope=[4, 4, 8],
            joint_attention_dim=16,
            pooled_projection_dim=16,
        )
        return config

    # ----- LoRA files -------------------------------------------------------------------
    @classmethod
    def module_parts(cls, modules: list, layout: str) -> list[tuple[tuple[str, ...], str]]:
        from families.flux_lora_names import flux_module_parts

        return flux_module_parts(modules, layout)

    @classmethod
    def kohya_plan(cls, source) -> list:
        from families.flux_lora_names import flux_kohya_plan

        return flux_kohya_plan(source)

    @classmethod
    def lycoris_name(cls, part: str) -> str:
        from families.flux_lora_names import flux_lycoris_name

        return flux_lycoris_name(part)

    @classmethod
    def lycoris_names(cls, parts: list[str]) -> dict[str, tuple[tuple[str, ...], str]]:
        """OneTrainer's ``lora_transformer_*`` and CLIP names, plus kohya sd-scripts' Black Forest Labs names."""
        from families.flux_lora_names import bfl_lycoris_names

        return bfl_lycoris_names(parts) | super().lycoris_names(parts)

    @classmethod
    def kohya_identity(cls) -> dict[str, str]:
        return {"ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux"}

    @classmethod
    def modelspec_identity(cls) -> dict[str, str]:
        return {
            "modelspec.architecture": "flux-1-dev/lora",
            "modelspec.implementation": "https://github.com/black-forest-labs/flux",
        }

    @classmethod
    def modelspec_prediction_type(cls, metadata: dict[str, str]) -> str:
        return "flow"

    # ----- full size and the demo model -------------------------------------------------
    @classmethod
    def full_size_config_folder(cls, models_dir: Path) -> Path:
        from families.flux_configs import FLUX_DEV_CONFIG_NAME, write_flux_dev_config

        return write_flux_dev_config(Path(models_dir) / "configs" / FLUX_DEV_CONFIG_NAME)

    @classmethod
    def build_demo_pipeline(cls, *, seed: int = 0):
        from families.flux_demo import build_tiny_flux_pipeline

        return build_tiny_flux_pipeline(seed=seed)

    @classmethod
    def save_single_file(cls, pipe, path: Path, *, metadata: dict[str, str]) -> None:
        from families.flux_layout import save_flux_single_file

        save_flux_single_file(pipe.transformer, path, metadata=metadata)
