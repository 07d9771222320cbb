"""CLIP text-encoder module names in the file layouts we read and write.

transformers 4 names the encoder's modules under ``text_model.``; transformers 5 leaves that level
out. ComfyUI and A1111-era readers expect it, so files carry it, and names read from files drop it.
"""

from __future__ import annotations

_LEVEL = "text_model."


def with_clip_level(module: str) -> str:
    return module if module.startswith(_LEVEL) else _LEVEL + module


def without_clip_level(name: str) -> str:
    return name.replace("." + _LEVEL, ".")


def kohya_text_name(prefix: str, module: str) -> str:
    """``encoder.layers.0.self_attn.q_proj`` with prefix ``lora_te1_`` →
    ``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``."""
    return prefix + with_clip_level(module).replace(".", "_")
