"""Write a Stable Diffusion 1.5 pipeline as one original-layout (LDM / "webui") ``.safetensors`` file.

U-Net and VAE as :mod:`families.ldm_layout` names them; the CLIP text encoder keeps its Hugging Face
keys under ``cond_stage_model.transformer.`` (SD 2.x has OpenCLIP under ``cond_stage_model.model.``).
"""

from __future__ import annotations

from pathlib import Path

import torch

TEXT_PREFIX = "cond_stage_model.transformer."


def sd15_to_original_state_dict(pipe) -> dict[str, torch.Tensor]:
    from families.ldm_layout import clip_state, unet_state, vae_state

    state = {**unet_state(pipe.unet), **vae_state(pipe.vae), **clip_state(pipe.text_encoder, TEXT_PREFIX)}
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_sd15_single_file(pipe, path: Path, *, metadata: dict[str, str] | None = None) -> None:
    from model_formats.single_file import save_state_dict

    save_state_dict(sd15_to_original_state_dict(pipe), path, metadata=metadata or {})
