"""Diffusers-layout config folders (no weights) that single-file checkpoints load against.

``from_single_file`` needs the pipeline's component configs and tokenizers. Online,
diffusers fetches them from the hub; offline we write them here from the published
SDXL base 1.0 configuration, with the real CLIP tokenizer rebuilt locally.
"""

from __future__ import annotations

from pathlib import Path

SDXL_BASE_CONFIG_NAME = "sdxl-base"

SDXL_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}

SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

SDXL_VAE = {
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
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

_CLIP_COMMON = {
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
    "layer_norm_eps": 1e-05,
}
SDXL_TEXT_ENCODER = {
    **_CLIP_COMMON,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
SDXL_TEXT_ENCODER_2 = {
    **_CLIP_COMMON,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}

SDXL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def write_sdxl_base_config(folder: Path) -> Path:
    """Write the SDXL base 1.0 config folder (idempotent, atomic)."""
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextConfig

    from model_formats.config_folders import save_transformers_config, write_config_folder
    from model_formats.tokenizers import build_clip_tokenizer

    def write_rest(tmp: Path) -> None:
        save_transformers_config(tmp / "text_encoder", CLIPTextConfig, SDXL_TEXT_ENCODER, architecture="CLIPTextModel")
        save_transformers_config(
            tmp / "text_encoder_2", CLIPTextConfig, SDXL_TEXT_ENCODER_2, architecture="CLIPTextModelWithProjection"
        )
        build_clip_tokenizer().save_pretrained(tmp / "tokenizer")
        build_clip_tokenizer(pad_token="!").save_pretrained(tmp / "tokenizer_2")
        EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG).save_config(tmp / "scheduler")

    configs = {"unet": SDXL_UNET, "vae": SDXL_VAE}
    return write_config_folder(folder, model_index=SDXL_MODEL_INDEX, configs=configs, write_rest=write_rest)
