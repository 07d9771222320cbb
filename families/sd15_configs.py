"""The offline config folder single-file Stable Diffusion 1.5 checkpoints load against.

From the published SD 1.5 configuration (``runwayml/stable-diffusion-v1-5``), with the real CLIP
tokenizer rebuilt locally. Inference samples with Euler on the same 1000-step scaled-linear
schedule the model was trained on (the published folder names PNDM).
"""

from __future__ import annotations

from pathlib import Path

from families.sdxl_configs import SDXL_SCHEDULER_CONFIG, SDXL_TEXT_ENCODER

SD15_CONFIG_NAME = "sd15"
SD15_LAYERS_PER_BLOCK = 2
SD15_CONTEXT_DIM = 768  # CLIP ViT-L/14's width; SD 2.x (OpenCLIP ViT-H) has 1024
# The schedule numbers are SD 1.x's: SDXL kept them.
SD15_SCHEDULER_CONFIG = dict(SDXL_SCHEDULER_CONFIG)
# SD 1.x conditions on CLIP ViT-L/14, the same encoder as SDXL's first.
SD15_TEXT_ENCODER = dict(SDXL_TEXT_ENCODER)

SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": SD15_CONTEXT_DIM,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": SD15_LAYERS_PER_BLOCK,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SD15_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

SD15_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def write_sd15_config(folder: Path) -> Path:
    """Write the SD 1.5 config folder (idempotent, atomic)."""
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextConfig

    from model_formats.config_folders import save_transformers_config, write_config_folder
    from model_formats.tokenizers import build_clip_tokenizer

    def write_rest(tmp: Path) -> None:
        save_transformers_config(tmp / "text_encoder", CLIPTextConfig, SD15_TEXT_ENCODER, architecture="CLIPTextModel")
        build_clip_tokenizer().save_pretrained(tmp / "tokenizer")
        EulerDiscreteScheduler(**SD15_SCHEDULER_CONFIG).save_config(tmp / "scheduler")

    configs = {"unet": SD15_UNET, "vae": SD15_VAE}
    return write_config_folder(folder, model_index=SD15_MODEL_INDEX, configs=configs, write_rest=write_rest)
