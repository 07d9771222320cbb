"""Reading LoRA module names of Stable Diffusion U-Net families (SD 1.x, SDXL) in any layout we know."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

from families import KOHYA_PREFIXES
from modules.lora_training.lora_layouts import COMFY_PREFIXES, split_down_key


def module_from_kohya(name: str, *, pipeline_class, layers_per_block: int) -> str | None:
    """The diffusers module of a kohya module name, as diffusers' own converter for ``pipeline_class`` names it."""
    import torch

    # The converter only renames; 1x1 stand-ins keep it from touching the real tensors.
    probe = {f"{name}.lora_down.weight": torch.zeros(1, 1), f"{name}.lora_up.weight": torch.zeros(1, 1)}
    config = SimpleNamespace(layers_per_block=layers_per_block)
    try:
        converted, _ = pipeline_class.lora_state_dict(probe, unet_config=config)
    except (ValueError, KeyError, IndexError):
        return None
    modules = {split[2] for key in converted if (split := split_down_key(key))}
    return modules.pop() if len(modules) == 1 else None


def _parts(name: str, module: str, from_kohya: Callable[[str], str | None]) -> tuple[str, ...]:
    if name.startswith(COMFY_PREFIXES):
        name = "lora_unet_" + name.split("diffusion_model.", 1)[1].replace(".", "_")
    if name.startswith(KOHYA_PREFIXES):
        found = from_kohya(name)
        return (found,) if found else ()
    return (module if module.startswith(("unet.", "text_encoder")) else f"unet.{module}",)


def unet_module_parts(modules: list, from_kohya: Callable[[str], str | None]) -> list[tuple[tuple[str, ...], str]]:
    """Per file module, the diffusers module it renames (none when unknown)."""
    return [(_parts(item.name, split_down_key(item.down_key)[2], from_kohya), "rename") for item in modules]


def kohya_plan(source, *, name_of: Callable[[str], str], display_name: str) -> list:
    """One kohya module per diffusers module of ``source``, named by ``name_of``."""
    from core.errors import UserError
    from modules.lora_training.export import present_parts, single_module

    plan = []
    for part in present_parts(source):
        try:
            name = name_of(part)
        except (KeyError, IndexError) as exc:
            raise UserError(f"{display_name} layer {part!r} has no kohya name; use the diffusers format.") from exc
        plan.append(single_module(name, part, source))
    return plan
