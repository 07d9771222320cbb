"""Stable Diffusion 1.5: SDXL's DDPM training (:mod:`families.ddpm`) with one CLIP ViT-L text encoder,
its last hidden state as the U-Net's context, and no size conditioning.

Single files use the original (LDM / "webui") layout (:mod:`families.sd15_layout`); kohya LoRAs the
names kohya sd-scripts gives SD 1.x (:mod:`families.sd15_lora_names`).
"""

from __future__ import annotations

import torch

from families.ddpm import DDPMFamily
from families.sd15_files import SD15Files


class SD15Family(SD15Files, DDPMFamily):
    name = "sd15"
    display_name = "SD 1.5"
    pipeline_marker = "StableDiffusionPipeline"
    text_encoder_attrs = ("text_encoder",)
    size_multiple = 8
    uses_negative_prompt = True
    auto_precision_on_gpu = "fp16"
    # SD 1.5 attends at 1/8 of the image side where SDXL starts at 1/16: more activation per pixel.
    activation_gib = (1.8, 9.0)
    # Names only SD 1.x LoRAs have: the one text encoder's kohya prefix, and attention where SDXL's U-Net
    # has none (its first down block, its fourth up block, original input blocks 1-2 and output blocks 9-11).
    lora_key_markers = (
        "lora_te_",
        "down_blocks.0.attentions.",
        "down_blocks_0_attentions_",
        "up_blocks.3.attentions.",
        "up_blocks_3_attentions_",
        "input_blocks_1_1_",
        "input_blocks_2_1_",
        "output_blocks_9_1_",
        "output_blocks_10_1_",
        "output_blocks_11_1_",
    )
    demo_name = "demo-tiny-sd15-RANDOM-WEIGHTS"
    demo_architecture = "stable-diffusion-v1"
    default_guidance = 7.5
    smallest_preset = "sd15-4gb"

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        # As StableDiffusionPipeline does (no clip skip): the last hidden state, final layer norm applied.
        tokenizer, encoder = self.pipe.tokenizer, self.pipe.text_encoder
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(encoder.device)
        return {"prompt_embeds": encoder(ids)[0]}

    def sample_text_kwargs(self, text: dict[str, torch.Tensor]) -> dict:
        # The negative prompt is empty: encoded, as SD 1.5's pipeline does (SDXL base uses zeros).
        dtype = self.weight_dtype
        with torch.no_grad():
            empty = self.encode_text([""])["prompt_embeds"]
        embeds = text["prompt_embeds"]
        return {"prompt_embeds": embeds.to(dtype), "negative_prompt_embeds": empty.to(embeds.device, dtype)}

    def unet_conditioning(self, text: dict[str, torch.Tensor], items, *, device, dtype) -> dict:
        return {"encoder_hidden_states": text["prompt_embeds"].to(device, dtype)}
