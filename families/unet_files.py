"""What Stable Diffusion U-Net families (SD 1.x, SDXL) share on disk: main-file key names, the estimate's
blueprint, and the kohya header fields that follow the prediction type."""

from __future__ import annotations

import re
from pathlib import Path

from families.base import ModelFamily

_ATTENTION_PROJECTION = re.compile(r"^(?P<head>.+\.attn\d)\.(?P<proj>to_q|to_k|to_v|to_out\.0)$")


class UNetFiles(ModelFamily):
    denoiser_attr = "unet"
    # The U-Net's LoRA layers (its transformer blocks' attention; feed-forward and the projections around them).
    attention_targets = ("to_k", "to_q", "to_v", "to_out.0")
    feedforward_targets = ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")

    @classmethod
    def main_file_keys(cls, component: str, module: str) -> tuple[str, str]:
        """U-Net attention projections use diffusers' attention-processor names
        (``unet.<block>.attn1.processor.to_q_lora.down.weight``): ComfyUI's and Forge's U-Net map knows
        ``unet.`` names only in that form, and diffusers' U-Net loader turns them back into ``to_q`` /
        ``to_out.0``. Its loader converts names only when none is in PEFT spelling, so the U-Net's
        other modules use diffusers' ``.lora.down.weight`` / ``.lora.up.weight``."""
        if component != "unet":
            return super().main_file_keys(component, module)
        match = _ATTENTION_PROJECTION.match(module)
        if match:
            stem = f"unet.{match['head']}.processor.{match['proj'].removesuffix('.0')}_lora"
            return f"{stem}.down.weight", f"{stem}.up.weight"
        return f"unet.{module}.lora.down.weight", f"unet.{module}.lora.up.weight"

    @classmethod
    def denoiser_blueprint(cls, entry, *, models_dir: Path) -> tuple[type, dict]:
        from diffusers import UNet2DConditionModel

        folder = cls.components_folder(entry, models_dir)
        return UNet2DConditionModel, dict(UNet2DConditionModel.load_config(folder / "unet"))

    @classmethod
    def text_tokens(cls, folder: Path) -> int:
        return 77

    @classmethod
    def modelspec_prediction_type(cls, metadata: dict[str, str]) -> str:
        return "v" if metadata.get("lora_studio.prediction_type") == "v_prediction" else "epsilon"

    @classmethod
    def kohya_extra_metadata(cls, metadata: dict[str, str]) -> dict[str, str]:
        # As sd-scripts writes them (str of a bool).
        return {
            "ss_v_parameterization": str(metadata.get("lora_studio.prediction_type") == "v_prediction"),
            "ss_zero_terminal_snr": str(metadata.get("lora_studio.zero_terminal_snr") == "true"),
        }

    @classmethod
    def narrow_config(cls, config: dict) -> dict:
        """Every block and layer of the U-Net kept, at 32 channels, one attention head and 16-wide text."""
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        config.update(
            block_out_channels=[32] * len(config["block_out_channels"]),
            norm_num_groups=32,
            attention_head_dim=1,
            num_attention_heads=None,
            cross_attention_dim=16,
        )
        return config
