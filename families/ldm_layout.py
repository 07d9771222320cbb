"""Original (LDM / "webui") tensor names of a Stable Diffusion U-Net, VAE and CLIP text encoder.

Diffusers can read that layout (``from_single_file``) but cannot write it, so we map every
diffusers key back to its original name. The U-Net layout, for ``layers_per_block = L``:

- ``input_blocks.0.0`` is ``conv_in``; then per down block, per layer, one entry
  ``input_blocks.N`` holding the resnet at ``.0`` and the transformer at ``.1``, and,
  except for the last block, one more entry with the downsampler at ``.0.op``.
- ``middle_block.0/1/2`` are resnet, transformer, resnet.
- ``output_blocks.N`` per up block, per layer (L + 1): resnet ``.0``, transformer ``.1``,
  upsampler at ``.1.conv`` (no transformer) or ``.2.conv``.

SD 1.x and SDXL share it; SDXL adds ``label_emb`` (its size conditioning).
"""

from __future__ import annotations

import re

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

_UNET_FIXED = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_RESNET_PARTS = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}


def _rename_resnet(rest: str) -> str:
    for new, old in _RESNET_PARTS.items():
        if rest.startswith(new):
            return old + rest[len(new) :]
    raise KeyError(f"unexpected resnet key {rest!r}")


def unet_key_to_original(key: str, layers_per_block: int) -> str:
    """A diffusers U-Net key (``down_blocks.1.attentions.0...``) in original naming (``input_blocks.4.1...``)."""
    for new, old in _UNET_FIXED.items():
        if key.startswith(new):
            return old + key[len(new) :]
    per_block = layers_per_block + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * per_block + layer
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_rename_resnet(rest)}"
        return f"input_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        index = 1 + int(m[1]) * per_block + layers_per_block
        return f"input_blocks.{index}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * per_block + layer
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_rename_resnet(rest)}"
        return f"output_blocks.{index}.1.{rest}"
    raise KeyError(f"unexpected U-Net key {key!r}")


def unet_state(unet) -> dict[str, torch.Tensor]:
    """The U-Net's state dict in original naming, under ``model.diffusion_model.``."""
    layers = unet.config.layers_per_block
    per_block = layers + 1
    up_has_attention = {i: bool(getattr(block, "attentions", None)) for i, block in enumerate(unet.up_blocks)}
    out = {}
    for key, value in unet.state_dict().items():
        if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            block = int(m[1])
            slot = 2 if up_has_attention[block] else 1
            new = f"output_blocks.{block * per_block + layers}.{slot}.conv.{m[2]}"
        else:
            new = unet_key_to_original(key, layers)
        out[UNET_PREFIX + new] = value
    return out


_VAE_ATTENTION_PARTS = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def _vae_key(key: str, num_up_blocks: int) -> str:
    key = key.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{num_up_blocks - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{num_up_blocks - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        rest = m[2]
        for new, old in _VAE_ATTENTION_PARTS.items():
            if rest.startswith(new):
                return f"{m[1]}.mid.attn_1.{old}{rest[len(new) :]}"
    return key


def vae_state(vae) -> dict[str, torch.Tensor]:
    """The VAE's state dict in original naming, under ``first_stage_model.``."""
    num_up = len(vae.config.up_block_types)
    out = {}
    for key, value in vae.state_dict().items():
        new = _vae_key(key, num_up)
        # The original VAE attention projections are 1x1 convolutions.
        if ".mid.attn_1." in new and new.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[VAE_PREFIX + new] = value
    return out


def clip_state(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A Hugging Face CLIP text encoder's state dict under ``prefix``, with its ``text_model.`` level."""
    out = {}
    for key, value in text_encoder.state_dict().items():
        name = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + name] = value
    return out
