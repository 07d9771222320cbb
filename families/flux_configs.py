"""Flux dev's published architecture, and a diffusers-layout config folder of it written offline.

The folder (no weights) is what full-size random-weight builds start from (the bench, the smoke
run); its T5 tokenizer is a tiny one, so it is not a companion for real checkpoints.
"""

from __future__ import annotations

from pathlib import Path

FLUX_DEV_CONFIG_NAME = "flux-dev"

# FLUX.1 [dev]'s transformer (diffusers' FluxTransformer2DModel arguments), for full-size layouts
# built on the meta device (tests, the bench) without a download.
FLUX_DEV_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}

# T5 v1.1 XXL, Flux's second text encoder.
T5_XXL = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "feed_forward_proj": "gated-gelu",
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
# Flux's VAE is SDXL's architecture with 16 latent channels and no quant convolutions.
FLUX_VAE_CHANGES = {
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
}
FLUX_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
FLUX_MODEL_INDEX = {
    "_class_name": "FluxPipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5Tokenizer"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def write_flux_dev_config(folder: Path) -> Path:
    """Write the Flux dev config folder (idempotent, atomic)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, T5Config

    from families.sdxl_configs import SDXL_TEXT_ENCODER, SDXL_VAE
    from model_formats.config_folders import save_transformers_config, write_config_folder
    from model_formats.tokenizers import build_clip_tokenizer, build_tiny_t5_tokenizer

    def write_rest(tmp: Path) -> None:
        # Flux's CLIP is the same CLIP ViT-L/14 text encoder as SDXL's first one.
        save_transformers_config(tmp / "text_encoder", CLIPTextConfig, SDXL_TEXT_ENCODER, architecture="CLIPTextModel")
        save_transformers_config(tmp / "text_encoder_2", T5Config, T5_XXL, architecture="T5EncoderModel")
        build_clip_tokenizer().save_pretrained(tmp / "tokenizer")
        build_tiny_t5_tokenizer().save_pretrained(tmp / "tokenizer_2")  # random weights read any ids alike
        FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER).save_config(tmp / "scheduler")

    transformer = {**FLUX_DEV_TRANSFORMER, "axes_dims_rope": list(FLUX_DEV_TRANSFORMER["axes_dims_rope"])}
    configs = {
        "transformer": {"_class_name": "FluxTransformer2DModel", **transformer},
        "vae": {**SDXL_VAE, **FLUX_VAE_CHANGES},
    }
    return write_config_folder(folder, model_index=FLUX_MODEL_INDEX, configs=configs, write_rest=write_rest)
