"""The main ``loras/<name>.safetensors``: key names that diffusers, ComfyUI and Forge all apply in full.

Tensors are PEFT's ``lora_A`` (down) and ``lora_B`` (up) per module, prefixed by the pipeline
component, with diffusers' ``lora_adapter_metadata`` header (rank and ``lora_alpha`` per component)
and fp16 values. Each family spells its keys (``family.main_file_keys``): text-encoder layers and
some denoiser layers take the one spelling every reader maps.

LoKr and LoHa (which diffusers' LoRA loaders do not read) keep peft's own names,
``<component>.<module>.lokr_w1`` / ``.hada_w1_a`` ..., and their peft config in the same header field:
``inject_adapter_in_model(LoKrConfig(**config), model)`` + ``set_peft_model_state_dict`` load them.

No ``.alpha`` tensors: diffusers would leave them unused. Readers that ignore the adapter metadata
(ComfyUI, Forge) therefore apply the change at ``alpha = rank``; the kohya/webui copy carries alphas.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

from model_formats.safetensors_stream import TensorSpec, write_safetensors

OUT_DTYPE = torch.float16
MAGNITUDE = "lora_magnitude_vector"
LYCORIS_KEY = re.compile(r"\.(lokr_w[12](_[ab])?|lokr_t2|hada_w[12]_[ab]|hada_t[12])$")
KeyNames = Callable[[str, str], tuple[str, str]]


def adapter_metadata_json(configs: dict[str, dict]) -> str:
    """``lora_adapter_metadata`` as diffusers' ``save_lora_weights`` packs it: ``<component>.<field>``."""
    packed = {}
    for component, config in configs.items():
        for key, value in config.items():
            packed[f"{component}.{key}"] = sorted(value) if isinstance(value, set) else value
    return json.dumps(packed, indent=2, sort_keys=True)


def _module_tensors(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
    """PEFT's ``<module>.lora_A.weight`` / ``lora_B.weight`` (and DoRA's ``lora_magnitude_vector``) as
    {module: (down, up)} or {module: (down, up, magnitude)}."""
    modules = {}
    for key, down in state.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            magnitude = state.get(f"{module}.{MAGNITUDE}")
            modules[module] = (down, state[f"{module}.lora_B.weight"]) + (() if magnitude is None else (magnitude,))
    unknown = [k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight", f".{MAGNITUDE}"))]
    if unknown:
        raise ValueError(f"not a LoRA or DoRA state dict (e.g. {unknown[0]})")
    return modules


def magnitude_key(component: str, module: str, down_key: str) -> str:
    """DoRA's magnitude vector beside ``down_key``, as ``<module>.lora_magnitude_vector.weight``: diffusers'
    loaders keep that name (their U-Net renames touch only down/up spellings) and infer ``use_dora`` from it;
    peft and transformers' adapter loader both insert the adapter name before ``.weight``, as the model names it."""
    if down_key.endswith(".lora_A.weight"):
        return down_key.removesuffix(".lora_A.weight") + f".{MAGNITUDE}.weight"
    return f"{component}.{module}.{MAGNITUDE}.weight"


def _tensor_spec(key: str, tensor: torch.Tensor) -> TensorSpec:
    produce = lambda t=tensor: t.detach().to("cpu", OUT_DTYPE).contiguous()  # noqa: E731
    return TensorSpec(key, OUT_DTYPE, tuple(tensor.shape), produce)


def is_lycoris_state(state: dict[str, torch.Tensor]) -> bool:
    """True for a peft LoKr or LoHa state dict (``...lokr_w1``, ``...hada_w1_a``)."""
    return any(LYCORIS_KEY.search(key) for key in state)


def _specs(component: str, state: dict[str, torch.Tensor], keys: KeyNames) -> list[TensorSpec]:
    if is_lycoris_state(state):
        return [_tensor_spec(f"{component}.{key}", tensor) for key, tensor in state.items()]
    specs = []
    for module, tensors in _module_tensors(state).items():
        names = keys(component, module)
        if len(tensors) == 3:
            names = (*names, magnitude_key(component, module, names[0]))
        specs += [_tensor_spec(key, tensor) for key, tensor in zip(names, tensors, strict=True)]
    return specs


def write_main_lora(
    path: Path,
    layers: dict[str, dict[str, torch.Tensor]],
    configs: dict[str, dict],
    *,
    metadata: dict[str, str],
    keys: KeyNames,
) -> None:
    """Write ``layers`` (component → PEFT state dict) with ``configs`` (component → ``LoraConfig.to_dict()``),
    key names from ``keys(component, module)`` and the caller's header ``metadata``, atomically."""
    specs = [spec for component, state in layers.items() for spec in _specs(component, state, keys)]
    if not specs:
        raise ValueError("no LoRA layers to save")
    header = {"format": "pt", "lora_adapter_metadata": adapter_metadata_json(configs), **metadata}
    write_safetensors(Path(path), specs, metadata=header)
