"""Write small LoRA files with diffusers' own saver, for tests."""

from __future__ import annotations

from pathlib import Path

import torch


def _randomize_lora(model, *, seed: int, scale: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def write_diffusers_lora(
    model_dir: Path, out_path: Path, *, family: str, seed: int = 0, rank: int = 4, alpha: float = 4.0, scale=0.3
) -> Path:
    """A LoRA for the model in ``model_dir`` with random non-zero A and B, via ``save_lora_weights``."""
    from diffusers import FluxPipeline, FluxTransformer2DModel, StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    if family == "sdxl":
        model = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    else:
        model = FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    model.add_adapter(config)
    _randomize_lora(model, seed=seed, scale=scale)
    layers = get_peft_model_state_dict(model)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if family == "sdxl":
        StableDiffusionXLPipeline.save_lora_weights(
            out_path.parent,
            unet_lora_layers=layers,
            unet_lora_adapter_metadata=config.to_dict(),
            weight_name=out_path.name,
        )
    else:
        FluxPipeline.save_lora_weights(
            out_path.parent,
            transformer_lora_layers=layers,
            transformer_lora_adapter_metadata=config.to_dict(),
            weight_name=out_path.name,
        )
    return out_path
