"""Module names of every LoRA layout we read and write, mapped onto one naming.

Each LoRA module in a file becomes a :class:`FileModule`: its tensor keys and shapes, the
alpha written for it, and the diffusers module(s) it changes ("parts"), named as
``unet.<module>``, ``transformer.<module>``, ``text_encoder.<module>`` or
``text_encoder_2.<module>`` (CLIP names without the ``text_model.`` level, which
transformers 4 and 5 disagree on). A Black Forest Labs (kohya sd-scripts) Flux module
such as ``img_attn_qkv`` holds several parts, stacked along its output rows.

Layouts read: diffusers/PEFT (``lora_A``/``lora_B``), kohya (``lora_unet_``/``lora_te*``,
SDXL names resolved by diffusers' own converter, Flux in BFL names), OneTrainer
(``lora_transformer_``) and ComfyUI (``diffusion_model.<original name>``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from types import SimpleNamespace

from core.flux_single_file import linear_module_map
from core.sdxl_single_file import unet_key_to_original

SDXL_LAYERS_PER_BLOCK = 2
KOHYA_PREFIXES = ("lora_unet_", "lora_te", "lora_transformer_", "lycoris_")
COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

_DOWN_SUFFIXES = (
    ".lora_A.weight",
    ".lora.down.weight",
    ".lora_down.weight",
    ".lora_linear_layer.down.weight",
    "_lora.down.weight",  # diffusers' old attention-processor names (to_q_lora, to_out_lora)
)


@dataclass(frozen=True)
class FileModule:
    """One LoRA module as a file holds it."""

    name: str  # as in the file, without the tensor suffix
    down_key: str
    up_key: str
    down_shape: tuple[int, ...]
    up_shape: tuple[int, ...]
    parts: tuple[str, ...] = ()  # the diffusers modules it changes, in row order; () when unknown
    kind: str = "rename"  # "rename", "fused" (parts stacked along rows) or "swapped" (row halves exchanged)
    alpha_key: str | None = None
    alpha: float | None = None  # as written; None: the file gives none (loaders then use alpha = rank)

    @property
    def rank(self) -> int:
        return self.down_shape[0]

    @property
    def in_features(self) -> int:
        size = 1
        for dim in self.down_shape[1:]:
            size *= dim
        return size

    @property
    def out_features(self) -> int:
        return self.up_shape[0]

    def part_rows(self) -> tuple[int, ...]:
        """Output rows of each part: q, k, v are as wide as the input, a single block's MLP takes the rest."""
        count = len(self.parts)
        if count <= 1:
            return (self.out_features,)
        width = self.in_features
        return (width,) * 3 + ((self.out_features - 3 * width,) if count == 4 else ())


def split_down_key(key: str) -> tuple[str, str, str] | None:
    """(file module name, up key, normalised module) for a down-weight key, None for other keys."""
    suffix = next((s for s in _DOWN_SUFFIXES if key.endswith(s)), None)
    if suffix is None:
        return None
    stem = key[: -len(suffix)]
    up_key = stem + suffix.replace("lora_A", "lora_B").replace("down", "up")
    module = stem.replace(".processor.", ".")
    if suffix == "_lora.down.weight":
        head, _, projection = module.rpartition(".")
        if module.startswith("text_encoder"):
            module = f"{head}.{projection[len('to_') :]}_proj"  # to_q → q_proj, to_out → out_proj
        elif projection == "to_out":
            module += ".0"
    return stem, up_key, module.replace(".text_model.", ".")


def family_of(keys: list[str], metadata: dict[str, str]) -> str:
    if metadata.get("lora_studio.family") in ("sdxl", "flux"):
        return metadata["lora_studio.family"]
    if metadata.get("ss_base_model_version", "").startswith("flux") or "lora_flux" in metadata.get(
        "ss_network_module", ""
    ):
        return "flux"
    joined = " ".join(keys[:2000])
    markers = ("transformer.", "double_blocks", "single_blocks", "lora_transformer_")
    return "flux" if any(marker in joined for marker in markers) else "sdxl"


def format_of(names: list[str]) -> str:
    if names and all(n.startswith(KOHYA_PREFIXES) for n in names):
        return "kohya"
    if names and all(n.startswith(COMFY_PREFIXES) for n in names):
        return "comfyui"
    return "diffusers"


# ----- SDXL ----------------------------------------------------------------------------
def sdxl_kohya_name(module: str) -> str:
    """``unet.down_blocks.1...`` → ``lora_unet_input_blocks_4_1_...`` (original SDXL block names)."""
    part, _, rest = module.partition(".")
    if part == "unet":
        original = unet_key_to_original(rest + ".weight", SDXL_LAYERS_PER_BLOCK)[: -len(".weight")]
        return "lora_unet_" + original.replace(".", "_")
    prefix = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[part]
    return prefix + "text_model_" + rest.replace(".", "_")


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


# ----- Flux ----------------------------------------------------------------------------
_CLIP_KOHYA = re.compile(r"lora_te1?_text_model_encoder_layers_(\d+)_(self_attn|mlp)_(\w+)")


def block_counts(names: list[str]) -> tuple[int, int]:
    double = single = 0
    for name in names:
        if m := re.search(r"(?<!single_)(?:double_blocks|transformer_blocks)[._](\d+)[._]", name):
            double = max(double, int(m[1]) + 1)
        if m := re.search(r"(?:single_blocks|single_transformer_blocks)[._](\d+)[._]", name):
            single = max(single, int(m[1]) + 1)
    return double, single


def flux_name_tables(double: int, single: int) -> tuple[dict, dict]:
    """(kohya/OneTrainer module name → (parts, kind), diffusers module → (BFL module, part index))."""
    by_name, by_part = {}, {}
    for bfl, (parts, kind) in linear_module_map(double, single).items():
        parts = tuple(f"transformer.{p}" for p in parts)
        by_name["lora_unet_" + bfl.replace(".", "_")] = (parts, kind)
        for index, part in enumerate(parts):
            by_part[part] = (bfl, index)
            by_name["lora_transformer_" + part[len("transformer.") :].replace(".", "_")] = ((part,), "rename")
    return by_name, by_part


def flux_kohya_text_name(module: str) -> str:
    """``text_encoder.encoder.layers.0.self_attn.q_proj`` → ``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``."""
    return "lora_te1_text_model_" + module[len("text_encoder.") :].replace(".", "_")


def _flux_parts(name: str, table: dict) -> tuple[tuple[str, ...], str]:
    for prefix in COMFY_PREFIXES:
        if name.startswith(prefix):
            name = "lora_unet_" + name[len(prefix) :].replace(".", "_")
    if name in table:
        return table[name]
    if m := _CLIP_KOHYA.fullmatch(name):
        return (f"text_encoder.encoder.layers.{m[1]}.{m[2]}.{m[3]}",), "rename"
    return (), "rename"


# ----- all layouts -----------------------------------------------------------------------
def _sdxl_parts(name: str, module: str) -> tuple[str, ...]:
    if name.startswith(COMFY_PREFIXES):
        name = "lora_unet_" + name.split("diffusion_model.", 1)[1].replace(".", "_")
    if name.startswith(KOHYA_PREFIXES):
        found = sdxl_module_from_kohya(name)
        return (found,) if found else ()
    return (module if module.startswith(("unet.", "text_encoder")) else f"unet.{module}",)


def _diffusers_flux_part(module: str) -> tuple[str, ...]:
    return (module if module.startswith(("transformer.", "text_encoder")) else f"transformer.{module}",)


def discover_modules(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> tuple[str, str, list]:
    """(family, format, modules) of a LoRA file from its tensor names and shapes; alphas not yet read."""
    keys = list(shapes)
    family = family_of(keys, metadata)
    found = []
    for key in keys:
        split = split_down_key(key)
        if split is None or split[1] not in shapes:
            continue
        name, up_key, module = split
        alpha_key = f"{name}.alpha" if f"{name}.alpha" in shapes else None
        found.append(FileModule(name, key, up_key, tuple(shapes[key]), tuple(shapes[up_key]), alpha_key=alpha_key))
    layout = format_of([m.name for m in found])
    if family == "flux":
        table, _ = flux_name_tables(*block_counts([m.name for m in found]))
    modules = []
    for item in found:
        module = split_down_key(item.down_key)[2]
        if family == "sdxl":
            parts, kind = _sdxl_parts(item.name, module), "rename"
        elif layout == "diffusers":
            parts, kind = _diffusers_flux_part(module), "rename"
        else:
            parts, kind = _flux_parts(item.name, table)
        modules.append(replace(item, parts=parts, kind=kind))
    return family, layout, modules


def adapter_alpha(metadata: dict[str, str], part: str) -> float | None:
    """``lora_alpha`` from diffusers' adapter metadata for ``part`` (unet, transformer, text_encoder...)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        value = json.loads(raw).get(f"{part}.lora_alpha")
    except (ValueError, AttributeError):
        return None
    return float(value) if value is not None else None
