"""SDXL: DDPM noise from the checkpoint's own schedule (:mod:`families.ddpm`), two CLIP encoders, size
conditioning.

Single files use the original (LDM / "webui") layout (:mod:`families.sdxl_layout`), kohya LoRAs the
original U-Net block names (:mod:`families.sdxl_lora_names`).
"""

from __future__ import annotations

import torch

from families.ddpm import DDPMFamily
from families.sdxl_files import SDXLFiles


class SDXLFamily(SDXLFiles, DDPMFamily):
    name = "sdxl"
    display_name = "SDXL"
    pipeline_marker = "StableDiffusionXL"
    text_encoder_attrs = ("text_encoder", "text_encoder_2")
    size_multiple = 8
    uses_negative_prompt = True
    auto_precision_on_gpu = "fp16"
    activation_gib = (1.6, 8.0)
    lora_key_markers = (
        "unet.",
        "lora_unet_",
        "lora_te1_",
        "lora_te2_",
        "text_encoder_2.",
        "input_blocks",
        "down_blocks",
    )
    demo_name = "demo-tiny-sdxl-RANDOM-WEIGHTS"
    demo_architecture = "stable-diffusion-xl-v1-base"
    default_guidance = 5.0
    smallest_preset = "sdxl-8gb"

    def sample_text_kwargs(self, text: dict[str, torch.Tensor]) -> dict:
        # The negative prompt is empty: zeros, as SDXL base's pipeline does for an empty prompt.
        dtype = self.weight_dtype
        embeds, pooled = text["prompt_embeds"].to(dtype), text["pooled"].to(dtype)
        return {
            "prompt_embeds": embeds,
            "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": torch.zeros_like(embeds),
            "negative_pooled_prompt_embeds": torch.zeros_like(pooled),
        }

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        hidden = []
        for tokenizer, encoder in zip((self.pipe.tokenizer, self.pipe.tokenizer_2), self.text_encoders(), strict=True):
            ids = tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(encoder.device)
            output = encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
        # The pooled embedding comes from the second encoder, the one with a projection.
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled": output.text_embeds}

    def time_ids(self, items) -> torch.Tensor:
        rows = []
        for item in items:
            width, height = item.original_size
            top, left = item.crop_top_left
            bucket_w, bucket_h = item.bucket
            if item.flipped:  # the crop's left edge, seen in the mirrored image
                left = item.resized_size[0] - bucket_w - left
            rows.append([height, width, top, left, bucket_h, bucket_w])
        return torch.tensor(rows, dtype=torch.float32)

    def unet_conditioning(self, text: dict[str, torch.Tensor], items, *, device, dtype) -> dict:
        return {
            "encoder_hidden_states": text["prompt_embeds"].to(device, dtype),
            "added_cond_kwargs": {
                "text_embeds": text["pooled"].to(device, dtype),
                "time_ids": self.time_ids(items).to(device, dtype),
            },
        }
