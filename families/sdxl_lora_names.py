"""SDXL LoRA module names: kohya/webui (original U-Net block names, ``lora_te1_``/``lora_te2_``) and back."""

from __future__ import annotations

import re

SDXL_LAYERS_PER_BLOCK = 2
_TEXT_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def sdxl_kohya_name(module: str) -> str:
    """``unet.down_blocks.1...`` → ``lora_unet_input_blocks_4_1_...`` (original SDXL block names)."""
    from families.clip_names import kohya_text_name
    from families.ldm_layout import unet_key_to_original

    part, _, rest = module.partition(".")
    if part == "unet":
        original = unet_key_to_original(rest + ".weight", SDXL_LAYERS_PER_BLOCK)[: -len(".weight")]
        return "lora_unet_" + original.replace(".", "_")
    return kohya_text_name(_TEXT_PREFIXES[part], rest)


def sdxl_module_from_kohya(name: str) -> str | None:
    """The diffusers module of an SDXL kohya module name, as diffusers' own converter names it."""
    from diffusers import StableDiffusionXLPipeline

    from families.unet_lora_names import module_from_kohya

    return module_from_kohya(name, pipeline_class=StableDiffusionXLPipeline, layers_per_block=SDXL_LAYERS_PER_BLOCK)


def sdxl_module_parts(modules: list) -> list[tuple[tuple[str, ...], str]]:
    from families.unet_lora_names import unet_module_parts

    return unet_module_parts(modules, sdxl_module_from_kohya)


def sdxl_kohya_plan(source) -> list:
    from families.unet_lora_names import kohya_plan

    return kohya_plan(source, name_of=sdxl_kohya_name, display_name="SDXL")


def sdxl_upsampler_names(parts: list[str]) -> dict[str, tuple[tuple[str, ...], str]]:
    """The webui names of the U-Net's upsampler convolutions among ``parts``: their original slot depends on
    whether the up block has attentions (``output_blocks.<n>.2.conv``, else ``.1.conv``), which the name of
    the layer alone does not tell."""
    names = {}
    for part in parts:
        if m := re.fullmatch(r"unet\.up_blocks\.(\d+)\.upsamplers\.0\.conv", part):
            block = int(m[1])
            slot = 2 if any(p.startswith(f"unet.up_blocks.{block}.attentions.") for p in parts) else 1
            index = block * (SDXL_LAYERS_PER_BLOCK + 1) + SDXL_LAYERS_PER_BLOCK
            names[f"lora_unet_output_blocks_{index}_{slot}_conv"] = ((part,), "rename")
    return names
