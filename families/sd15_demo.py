"""The tiny Stable Diffusion 1.5 demo pipeline: real classes, random weights, SD 1.5's block layout."""

from __future__ import annotations


def build_tiny_sd15_pipeline(*, seed: int = 0):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from families.sd15_configs import SD15_LAYERS_PER_BLOCK, SD15_SCHEDULER_CONFIG
    from model_formats.demo_models import DEMO_IMAGE_SIZE, tiny_clip_config, tiny_vae
    from model_formats.tokenizers import build_clip_tokenizer

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_clip_config(hidden_size=32, intermediate_size=64, hidden_act="quick_gelu"))
    # As in SD 1.5: attention in every block but the last, 1x1-convolution projections around it.
    unet = UNet2DConditionModel(
        sample_size=DEMO_IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=SD15_LAYERS_PER_BLOCK,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    vae = tiny_vae(latent_channels=4, scaling_factor=0.18215)
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=build_clip_tokenizer(),
        unet=unet.eval(),
        scheduler=EulerDiscreteScheduler(**SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
