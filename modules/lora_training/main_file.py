"""The main ``loras/<name>.safetensors``: key names that diffusers, ComfyUI and Forge all apply in full.

Tensors are PEFT's ``lora_A`` (down) and ``lora_B`` (up) per module, prefixed by the pipeline
component (``unet.``, ``transformer.``, ``text_encoder.``, ``text_encoder_2.``), with diffusers'
``lora_adapter_metadata`` header (rank and ``lora_alpha`` per component) and fp16 values. Two
exceptions, each chosen because it is the one spelling every reader maps:

- CLIP modules carry ``text_model.`` (``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``):
  ComfyUI and Forge only know that spelling; diffusers strips it when its text encoder (transformers 5)
  has no ``text_model`` level.
- SDXL U-Net attention projections use diffusers' attention-processor names
  (``unet.<block>.attn1.processor.to_q_lora.down.weight``, ``...processor.to_out_lora...``): ComfyUI's
  and Forge's SDXL map knows ``unet.`` names only in that form, and diffusers' U-Net loader turns them
  back into ``to_q`` / ``to_out.0``. Its loader converts names only when none is in PEFT spelling, so
  the U-Net's other modules use diffusers' ``.lora.down.weight`` / ``.lora.up.weight``.

No ``.alpha`` tensors: diffusers would leave them unused. Readers that ignore the adapter metadata
(ComfyUI, Forge) therefore apply the change at ``alpha = rank``; the kohya/webui copy carries alphas.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from core.safetensors_stream import TensorSpec, write_safetensors

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
OUT_DTYPE = torch.float16
_ATTENTION_PROJECTION = re.compile(r"^(?P<head>.+\.attn\d)\.(?P<proj>to_q|to_k|to_v|to_out\.0)$")


def main_file_keys(component: str, module: str) -> tuple[str, str]:
    """(down key, up key) of ``module`` (a name inside ``component``) in the main file."""
    if component in TEXT_ENCODERS:
        if not module.startswith("text_model."):
            module = f"text_model.{module}"
        return f"{component}.{module}.lora_A.weight", f"{component}.{module}.lora_B.weight"
    if component == "unet":
        match = _ATTENTION_PROJECTION.match(module)
        if match:
            stem = f"unet.{match['head']}.processor.{match['proj'].removesuffix('.0')}_lora"
            return f"{stem}.down.weight", f"{stem}.up.weight"
        return f"unet.{module}.lora.down.weight", f"unet.{module}.lora.up.weight"
    return f"{component}.{module}.lora_A.weight", f"{component}.{module}.lora_B.weight"


def adapter_metadata_json(configs: dict[str, dict]) -> str:
    """``lora_adapter_metadata`` as diffusers' ``save_lora_weights`` packs it: ``<component>.<field>``."""
    packed = {}
    for component, config in configs.items():
        for key, value in config.items():
            packed[f"{component}.{key}"] = sorted(value) if isinstance(value, set) else value
    return json.dumps(packed, indent=2, sort_keys=True)


def _module_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's ``<module>.lora_A.weight`` / ``lora_B.weight`` as {module: (down, up)}."""
    pairs = {}
    for key, down in state.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            pairs[module] = (down, state[f"{module}.lora_B.weight"])
    unknown = [k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if unknown:
        raise ValueError(f"not a plain LoRA state dict (e.g. {unknown[0]})")
    return pairs


def _specs(component: str, state: dict[str, torch.Tensor]) -> list[TensorSpec]:
    specs = []
    for module, pair in _module_pairs(state).items():
        for key, tensor in zip(main_file_keys(component, module), pair, strict=True):
            produce = lambda t=tensor: t.detach().to("cpu", OUT_DTYPE).contiguous()  # noqa: E731
            specs.append(TensorSpec(key, OUT_DTYPE, tuple(tensor.shape), produce))
    return specs


def write_main_lora(
    path: Path, layers: dict[str, dict[str, torch.Tensor]], configs: dict[str, dict], *, metadata: dict[str, str]
) -> None:
    """Write ``layers`` (component → PEFT state dict) with ``configs`` (component → ``LoraConfig.to_dict()``)
    and the caller's header ``metadata``, atomically."""
    specs = [spec for component, state in layers.items() for spec in _specs(component, state)]
    if not specs:
        raise ValueError("no LoRA layers to save")
    header = {"format": "pt", "lora_adapter_metadata": adapter_metadata_json(configs), **metadata}
    write_safetensors(Path(path), specs, metadata=header)
