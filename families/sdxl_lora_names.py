"""SDXL LoRA module names: kohya/webui (original U-Net block names, ``lora_te1_``/``lora_te2_``) and back."""

from __future__ import annotations

from types import SimpleNamespace

from core.errors import UserError
from families import KOHYA_PREFIXES
from modules.lora_training.lora_layouts import COMFY_PREFIXES, split_down_key

SDXL_LAYERS_PER_BLOCK = 2
_TEXT_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def sdxl_kohya_name(module: str) -> str:
    """``unet.down_blocks.1...`` → ``lora_unet_input_blocks_4_1_...`` (original SDXL block names)."""
    from families.clip_names import kohya_text_name
    from families.sdxl_layout import unet_key_to_original

    part, _, rest = module.partition(".")
    if part == "unet":
        original = unet_key_to_original(rest + ".weight", SDXL_LAYERS_PER_BLOCK)[: -len(".weight")]
        return "lora_unet_" + original.replace(".", "_")
    return kohya_text_name(_TEXT_PREFIXES[part], rest)


def sdxl_module_from_kohya(name: str) -> str | None:
    """The diffusers module of an SDXL kohya module name, as diffusers' own converter names it."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    # The converter only renames; 1x1 stand-ins keep it from touching the real tensors.
    probe = {f"{name}.lora_down.weight": torch.zeros(1, 1), f"{name}.lora_up.weight": torch.zeros(1, 1)}
    config = SimpleNamespace(layers_per_block=SDXL_LAYERS_PER_BLOCK)
    try:
        converted, _ = StableDiffusionXLPipeline.lora_state_dict(probe, unet_config=config)
    except (ValueError, KeyError, IndexError):
        return None
    modules = {split[2] for key in converted if (split := split_down_key(key))}
    return modules.pop() if len(modules) == 1 else None


def _parts(name: str, module: str) -> tuple[str, ...]:
    if name.startswith(COMFY_PREFIXES):
        name = "lora_unet_" + name.split("diffusion_model.", 1)[1].replace(".", "_")
    if name.startswith(KOHYA_PREFIXES):
        found = sdxl_module_from_kohya(name)
        return (found,) if found else ()
    return (module if module.startswith(("unet.", "text_encoder")) else f"unet.{module}",)


def sdxl_module_parts(modules: list) -> list[tuple[tuple[str, ...], str]]:
    return [(_parts(item.name, split_down_key(item.down_key)[2]), "rename") for item in modules]


def sdxl_kohya_plan(source) -> list:
    from modules.lora_training.export import present_parts, single_module

    plan = []
    for part in present_parts(source):
        try:
            name = sdxl_kohya_name(part)
        except (KeyError, IndexError) as exc:
            raise UserError(f"SDXL layer {part!r} has no kohya name; use the diffusers format.") from exc
        plan.append(single_module(name, part, source))
    return plan
