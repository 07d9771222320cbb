"""Tiny SDXL and Flux models with random weights, built offline from real classes.

They exist so the app opens, generates and trains on a machine with no GPU and no model
hub, and so the tests exercise the same loading code as real checkpoints. Random
weights draw noise: that is expected. Names say so, so nobody takes them for a real
model. Run ``python -m core.demo_models [MODELS_DIR]`` to (re)build them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

DEMO_SDXL_NAME = "demo-tiny-sdxl-RANDOM-WEIGHTS"
DEMO_FLUX_NAME = "demo-tiny-flux-RANDOM-WEIGHTS"
DEMO_FLORENCE_NAME = "demo-tiny-florence2-RANDOM-WEIGHTS"
DEMO_IMAGE_SIZE = 64
# Bump when the builders change so stale demo folders are rebuilt.
DEMO_VERSION = "2"
_STAMP = "lora_studio_demo.json"

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


def _tiny_vae(**family_specific):
    """A two-block AutoencoderKL (2x downsampling) with the family's latent channels and scaling."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        sample_size=DEMO_IMAGE_SIZE,
        **family_specific,
    )


def _tiny_clip_config(**sizes):
    """A two-layer CLIP text config over the real 49,408-token vocabulary."""
    from transformers import CLIPTextConfig

    from core.tokenizers import CLIP_VOCAB_SIZE

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
        **sizes,
    )


def build_tiny_sdxl_pipeline(*, seed: int = 0):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from core.tokenizers import build_clip_tokenizer

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_tiny_clip_config(hidden_size=32, intermediate_size=64, hidden_act="quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(
        _tiny_clip_config(hidden_size=48, intermediate_size=96, hidden_act="gelu")
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
    vae = _tiny_vae(latent_channels=4, scaling_factor=0.13025)
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


def build_tiny_flux_pipeline(*, seed: int = 0):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from core.tokenizers import build_clip_tokenizer, build_tiny_t5_tokenizer

    torch.manual_seed(seed)
    t5_tokenizer = build_tiny_t5_tokenizer()
    text_encoder = CLIPTextModel(_tiny_clip_config(hidden_size=32, intermediate_size=64, hidden_act="quick_gelu"))
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
            decoder_start_token_id=t5_tokenizer.pad_token_id,
        )
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    vae = _tiny_vae(
        latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=t5_tokenizer,
        transformer=transformer.eval(),
    )


def build_tiny_florence2(*, seed: int = 2, image_size: int = 64):
    """A tiny random Florence-2 (DaViT vision tower + BART) and its real processor classes.

    With random weights the text is one repeated token; seed 2 makes it a printable one.
    """
    import torch
    from transformers import (
        BartConfig,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        Florence2VisionConfig,
    )

    from core.tokenizers import build_tiny_bart_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tiny_bart_tokenizer()
    side = {"height": image_size, "width": image_size}
    # DaViT downsamples 32x; the processor inserts one token per patch plus one pooled token.
    image_processor = CLIPImageProcessor(
        size=side, crop_size=side, do_center_crop=False, image_seq_length=(image_size // 32) ** 2 + 1
    )
    processor = Florence2Processor(
        image_processor=image_processor, tokenizer=tokenizer, post_processor_config={"pure_text": {}}
    )
    vision = Florence2VisionConfig(
        depths=(1, 1, 1, 1),
        embed_dim=(16, 32, 32, 32),
        num_heads=(1, 2, 2, 2),
        num_groups=(1, 2, 2, 2),
        window_size=2,
        projection_dim=32,
        max_position_embeddings=8,
        max_temporal_embeddings=4,
    )
    text = BartConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_bos_token_id=tokenizer.bos_token_id,
    )
    config = Florence2Config(vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id)
    return Florence2ForConditionalGeneration(config).eval(), processor


@dataclass(frozen=True)
class DemoModelPaths:
    sdxl_folder: Path
    sdxl_single_file: Path
    flux_folder: Path
    flux_single_file: Path
    florence_folder: Path


def demo_model_paths(models_dir: Path) -> DemoModelPaths:
    models_dir = Path(models_dir)
    return DemoModelPaths(
        sdxl_folder=models_dir / DEMO_SDXL_NAME,
        sdxl_single_file=models_dir / f"{DEMO_SDXL_NAME}.safetensors",
        flux_folder=models_dir / DEMO_FLUX_NAME,
        flux_single_file=models_dir / f"{DEMO_FLUX_NAME}.safetensors",
        florence_folder=models_dir / "captioners" / DEMO_FLORENCE_NAME,
    )


def _is_current(folder: Path) -> bool:
    stamp = folder / _STAMP
    try:
        return json.loads(stamp.read_text())["version"] == DEMO_VERSION
    except (OSError, ValueError, KeyError):
        return False


def _save_pipeline_folder(folder: Path, *parts) -> None:
    """Save a pipeline (or a model and its processor) into one stamped folder, atomically."""
    from core.atomic import atomic_path

    with atomic_path(folder) as tmp:
        for part in parts:
            part.save_pretrained(tmp)
        (tmp / _STAMP).write_text(json.dumps({"version": DEMO_VERSION, "random_weights": True}))


def ensure_demo_models(models_dir: Path, *, force: bool = False) -> DemoModelPaths:
    """Build the demo models into ``models_dir`` unless current ones are already there."""
    from core.flux_single_file import save_flux_single_file
    from core.sdxl_single_file import save_sdxl_single_file

    paths = demo_model_paths(models_dir)
    if force or not _is_current(paths.sdxl_folder) or not paths.sdxl_single_file.is_file():
        pipe = build_tiny_sdxl_pipeline(seed=0)
        _save_pipeline_folder(paths.sdxl_folder, pipe)
        save_sdxl_single_file(
            pipe,
            paths.sdxl_single_file,
            metadata={
                "modelspec.architecture": "stable-diffusion-xl-v1-base",
                "modelspec.title": DEMO_SDXL_NAME,
                "lora_studio.diffusers_config": DEMO_SDXL_NAME,
                "lora_studio.random_weights": "true",
            },
        )
    if force or not _is_current(paths.flux_folder) or not paths.flux_single_file.is_file():
        pipe = build_tiny_flux_pipeline(seed=0)
        _save_pipeline_folder(paths.flux_folder, pipe)
        save_flux_single_file(
            pipe.transformer,
            paths.flux_single_file,
            metadata={
                "modelspec.architecture": "Flux.1-dev",
                "modelspec.title": DEMO_FLUX_NAME,
                "lora_studio.diffusers_config": DEMO_FLUX_NAME,
                "lora_studio.random_weights": "true",
            },
        )
    if force or not _is_current(paths.florence_folder):
        _save_pipeline_folder(paths.florence_folder, *build_tiny_florence2())
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models_dir", nargs="?", default="models")
    parser.add_argument("--force", action="store_true", help="rebuild even when current")
    args = parser.parse_args(argv)
    paths = ensure_demo_models(Path(args.models_dir), force=args.force)
    for path in (
        paths.sdxl_folder,
        paths.sdxl_single_file,
        paths.flux_folder,
        paths.flux_single_file,
        paths.florence_folder,
    ):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
