"""Model families: a small class each, plugged into the one training loop."""

from __future__ import annotations


def family_class(name: str):
    if name == "sdxl":
        from modules.lora_training.families.sdxl import SDXLFamily

        return SDXLFamily
    if name == "flux":
        from modules.lora_training.families.flux import FluxFamily

        return FluxFamily
    raise ValueError(f"unknown model family {name!r}")
