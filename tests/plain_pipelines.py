"""The demo pipelines loaded by diffusers alone (no app code), and one fixed image from them: how a user
outside this app loads our LoRA files, for the tests that check those files."""

from __future__ import annotations

import numpy as np
import torch

from tests.demo_names import DEMO_FLUX_NAME, DEMO_SDXL_NAME

DEMO_MODELS = {"sdxl": DEMO_SDXL_NAME, "flux": DEMO_FLUX_NAME}


def plain_pipeline(models_dir, family: str):
    from diffusers import FluxPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else FluxPipeline
    return cls.from_pretrained(str(models_dir / DEMO_MODELS[family]))


def plain_image(pipe, family: str) -> np.ndarray:
    """The image for one prompt and seed at 64 px, 3 steps (as float pixels, to compare)."""
    kwargs = {"guidance_scale": 5.0 if family == "sdxl" else 3.5}
    out = pipe("ohwx, a photo", num_inference_steps=3, width=64, height=64, generator=torch.manual_seed(5), **kwargs)
    return np.asarray(out.images[0], dtype=np.float32)
