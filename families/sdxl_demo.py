"""The tiny SDXL demo pipeline: real classes, random weights, a few thousand times smaller than SDXL."""

from __future__ import annotations


def build_tiny_sdxl_pipeline(*, seed: int = 0):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from families.sdxl_configs import SDXL_SCHEDULER_CONFIG
    from model_formats.demo_models import DEMO_IMAGE_SIZE, tiny_clip_config, tiny_vae
    from model_formats.tokenizers import build_clip_tokenizer

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_clip_config(hidden_size=32, intermediate_size=64, hidden_act="quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(
        tiny_clip_config(hidden_size=48, intermediate_size=96, hidden_act="gelu")
    )
    unet = UNet2DConditionModel(
        sample_size=DEMO_IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        cross_attention_dim=32 + 48,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        norm_num_groups=32,
    )
    vae = tiny_vae(latent_channels=4, scaling_factor=0.13025)
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(pad_token="!"),
        unet=unet.eval(),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
    )
    return pipe
