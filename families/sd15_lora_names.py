"""Stable Diffusion 1.5 LoRA module names in kohya/webui files, and back.

kohya sd-scripts trains SD 1.x on a U-Net whose modules carry diffusers' names (``down_blocks``,
``attentions``...; only its SDXL U-Net uses the original ``input_blocks`` names), so its SD 1.x
LoRAs are ``lora_unet_<diffusers module, dots as _>`` and ``lora_te_text_model_...`` for the one
text encoder. Every reader takes that spelling: sd-scripts itself, diffusers' StableDiffusionPipeline
(which, unlike SDXL's, never remaps ``input_blocks`` names), and A1111, Forge and ComfyUI, which map
it onto the original block names. Reading also accepts the original (``input_blocks``) spelling.
"""

from __future__ import annotations

from families.sd15_configs import SD15_LAYERS_PER_BLOCK

KOHYA_TEXT_PREFIX = "lora_te_"


def sd15_kohya_name(module: str) -> str:
    """``unet.down_blocks.0.attentions.0...attn1.to_q`` → ``lora_unet_down_blocks_0_attentions_0_..._attn1_to_q``;
    ``text_encoder.encoder.layers.0.self_attn.q_proj`` → ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``."""
    from families.clip_names import kohya_text_name

    part, _, rest = module.partition(".")
    if part == "unet":
        return "lora_unet_" + rest.replace(".", "_")
    if part != "text_encoder":
        raise KeyError(module)
    return kohya_text_name(KOHYA_TEXT_PREFIX, rest)


def sd15_module_from_kohya(name: str) -> str | None:
    from diffusers import StableDiffusionPipeline

    from families.unet_lora_names import module_from_kohya

    return module_from_kohya(name, pipeline_class=StableDiffusionPipeline, layers_per_block=SD15_LAYERS_PER_BLOCK)


def sd15_module_parts(modules: list) -> list[tuple[tuple[str, ...], str]]:
    from families.unet_lora_names import unet_module_parts

    return unet_module_parts(modules, sd15_module_from_kohya)


def sd15_kohya_plan(source) -> list:
    from families.unet_lora_names import kohya_plan

    return kohya_plan(source, name_of=sd15_kohya_name, display_name="SD 1.5")
