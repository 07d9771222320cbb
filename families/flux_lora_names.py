"""Flux LoRA module names: Black Forest Labs names (kohya sd-scripts), OneTrainer's ``lora_transformer_``,
ComfyUI's ``diffusion_model.``, and the kohya copy with q/k/v (and a single block's MLP input) fused.

A fused module's down matrices are stacked and its up matrices sit block-diagonally, alpha multiplied
like the rank, so that ComfyUI, sd-scripts and diffusers (which all scale by alpha over the fused
down's rows) apply exactly the diffusers LoRA's change.
"""

from __future__ import annotations

import re

from core.errors import UserError
from modules.lora_training.lora_layouts import COMFY_PREFIXES, split_down_key

MLP_RATIO = 4  # the MLP width of a Flux block, in model widths (the only Flux variant we load)
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
    from families.flux_layout import linear_module_map

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
    from families.clip_names import kohya_text_name

    return kohya_text_name("lora_te1_", module[len("text_encoder.") :])


def flux_lycoris_name(part: str) -> str:
    """One diffusers module's unfused webui name: OneTrainer's ``lora_transformer_<module>`` (ComfyUI and
    Forge map it onto the transformer; a Kronecker or Hadamard product cannot be fused along rows)."""
    if part.startswith("text_encoder."):
        return flux_kohya_text_name(part)
    return "lora_transformer_" + part.removeprefix("transformer.").replace(".", "_")


def bfl_lycoris_names(parts: list[str]) -> dict[str, tuple[tuple[str, ...], str]]:
    """kohya sd-scripts' ``lora_unet_<Black Forest Labs module>`` names of the transformer layers in ``parts``;
    a fused name (q, k, v together) lists its modules in row order."""
    present = set(parts)
    by_name, _ = flux_name_tables(*block_counts(parts))
    return {
        name: (members, kind)
        for name, (members, kind) in by_name.items()
        if name.startswith("lora_unet_") and all(member in present for member in members)
    }


def _file_parts(name: str, table: dict) -> tuple[tuple[str, ...], str]:
    for prefix in COMFY_PREFIXES:
        if name.startswith(prefix):
            name = "lora_unet_" + name[len(prefix) :].replace(".", "_")
    if name in table:
        return table[name]
    if m := _CLIP_KOHYA.fullmatch(name):
        return (f"text_encoder.encoder.layers.{m[1]}.{m[2]}.{m[3]}",), "rename"
    return (), "rename"


def flux_module_parts(modules: list, layout: str) -> list[tuple[tuple[str, ...], str]]:
    if layout == "diffusers":
        out = []
        for item in modules:
            module = split_down_key(item.down_key)[2]
            part = module if module.startswith(("transformer.", "text_encoder")) else f"transformer.{module}"
            out.append(((part,), "rename"))
        return out
    table, _ = flux_name_tables(*block_counts([m.name for m in modules]))
    return [_file_parts(item.name, table) for item in modules]


def _fused(name: str, members: tuple[str, ...], source):
    from modules.lora_training.export import OutModule

    shapes = [source.shape(part) for part in members]
    rank, _, width = next(shape for shape in shapes if shape is not None)
    rows, ranks = [], []
    for index, (part, shape) in enumerate(zip(members, shapes, strict=True)):
        if shape is not None:
            rows.append(shape[1])
            ranks.append(shape[0])
            continue
        ranks.append(rank)
        if index < 3:
            rows.append(width)  # q, k, v are as wide as the model
        else:
            linear2 = source.shape(part.replace(".proj_mlp", ".proj_out"))
            rows.append(linear2[2] - width if linear2 else MLP_RATIO * width)
    parts = tuple(part if shape is not None else None for part, shape in zip(members, shapes, strict=True))
    return OutModule(name, parts, tuple(rows), tuple(ranks), (sum(ranks), width), (sum(rows), sum(ranks)))


def flux_kohya_plan(source) -> list:
    """Black Forest Labs module names (kohya sd-scripts' Flux LoRA layout), q/k/v(/MLP) fused."""
    from modules.lora_training.export import present_parts, single_module

    parts = present_parts(source)
    by_name, by_part = flux_name_tables(*block_counts(parts))
    plan, done = [], set()
    for part in parts:
        if part.startswith("text_encoder."):
            plan.append(single_module(flux_kohya_text_name(part), part, source))
            continue
        if part not in by_part:
            raise UserError(f"Flux layer {part!r} has no Black Forest Labs (kohya) name; use the diffusers format.")
        name = "lora_unet_" + by_part[part][0].replace(".", "_")
        if name in done:
            continue
        done.add(name)
        members, kind = by_name[name]
        if kind == "fused":
            plan.append(_fused(name, members, source))
        else:
            plan.append(single_module(name, part, source, swapped=kind == "swapped"))
    return plan
