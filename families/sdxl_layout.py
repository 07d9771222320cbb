"""Write an SDXL pipeline as one original-layout (LDM / "webui") ``.safetensors`` file.

The U-Net and VAE names are Stable Diffusion's (:mod:`families.ldm_layout`). Text encoder 1
keeps Hugging Face CLIP keys under ``conditioner.embedders.0.transformer.``; text encoder 2
uses OpenCLIP names under ``conditioner.embedders.1.model.`` with fused q/k/v projections.
"""

from __future__ import annotations

from pathlib import Path

import torch

from families.ldm_layout import clip_state, unet_state, vae_state

_TE1_PREFIX = "conditioner.embedders.0.transformer."
_TE2_PREFIX = "conditioner.embedders.1.model."


def _te2_state(text_encoder) -> dict[str, torch.Tensor]:
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
        "text_projection": state.pop("text_projection.weight").T.contiguous(),
    }
    state.pop("embeddings.position_ids", None)
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")}
    for i in layers:
        src = f"encoder.layers.{i}."
        dst = f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [state.pop(src + f"self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            )
            out[dst + f"attn.out_proj.{kind}"] = state.pop(src + f"self_attn.out_proj.{kind}")
            out[dst + f"ln_1.{kind}"] = state.pop(src + f"layer_norm1.{kind}")
            out[dst + f"ln_2.{kind}"] = state.pop(src + f"layer_norm2.{kind}")
            out[dst + f"mlp.c_fc.{kind}"] = state.pop(src + f"mlp.fc1.{kind}")
            out[dst + f"mlp.c_proj.{kind}"] = state.pop(src + f"mlp.fc2.{kind}")
    if state:
        raise KeyError(f"unmapped text encoder 2 keys: {sorted(state)[:5]}")
    return {_TE2_PREFIX + k: v for k, v in out.items()}


def sdxl_to_original_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The whole SDXL pipeline as one original-layout state dict."""
    state = {}
    state.update(unet_state(pipe.unet))
    state.update(vae_state(pipe.vae))
    state.update(clip_state(pipe.text_encoder, _TE1_PREFIX))
    state.update(_te2_state(pipe.text_encoder_2))
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_sdxl_single_file(pipe, path: Path, *, metadata: dict[str, str] | None = None) -> None:
    from model_formats.single_file import save_state_dict

    save_state_dict(sdxl_to_original_state_dict(pipe), path, metadata=metadata or {})
