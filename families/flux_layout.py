"""Flux transformer single files in the original (Black Forest Labs) layout, both ways.

A ``flux1-dev.safetensors`` holds the transformer alone, with fused q/k/v projections and
BFL names. Diffusers' own reader assumes the full-size model (inner width 3072); this one
reads every size off the tensors, so the tiny demo model loads through the same code as the
real one. The VAE, text encoders, tokenizers and scheduler come from a Flux diffusers folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import UserError
from core.regular_files import read_config
from families.base import ORIGINAL_DENOISER_PREFIX as _PREFIX

# Prefixes of all-in-one checkpoints that also carry the VAE and text encoders.
_OTHER_PARTS = ("vae.", "first_stage_model.", "text_encoders.", "conditioner.", "cond_stage_model.")

_GLOBAL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
# BFL's final modulation is (shift, scale); diffusers' AdaLayerNormContinuous reads (scale, shift).
_SWAPPED = {"final_layer.adaLN_modulation.1": "norm_out.linear"}


@dataclass(frozen=True)
class _Rule:
    """One BFL tensor and the diffusers tensor(s) it becomes."""

    original: str
    diffusers: tuple[str, ...]
    kind: str  # "rename", "fused" (split along rows) or "swapped" (halves exchanged)


def _block_count(keys, prefix: str) -> int:
    indices = {int(m.group(1)) for k in keys if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def _rules(original_keys) -> list[_Rule]:
    """Every mapping for a model with the blocks and optional parts present in ``original_keys``."""
    templates: list[tuple[str, tuple[str, ...], str]] = []
    templates += [(o, (d,), "rename") for o, d in _GLOBAL.items()]
    templates += [(o, (d,), "swapped") for o, d in _SWAPPED.items()]
    for i in range(_block_count(original_keys, "double_blocks")):
        block, target = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        templates += [(block + o, (target + d,), "rename") for o, d in _DOUBLE.items()]
        templates += [(block + o, tuple(target + d for d in ds), "fused") for o, ds in _DOUBLE_FUSED.items()]
        templates += [(block + o, (target + d,), "norm") for o, d in _DOUBLE_NORMS.items()]
    for i in range(_block_count(original_keys, "single_blocks")):
        block, target = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        templates += [(block + o, (target + d,), "rename") for o, d in _SINGLE.items()]
        templates += [(block + o, tuple(target + d for d in ds), "fused") for o, ds in _SINGLE_FUSED.items()]
        templates += [(block + o, (target + d,), "norm") for o, d in _SINGLE_NORMS.items()]
    rules = []
    for original, targets, kind in templates:
        if kind == "norm":
            rules.append(_Rule(original, targets, "rename"))
            continue
        for suffix in (".weight", ".bias"):
            rules.append(_Rule(original + suffix, tuple(t + suffix for t in targets), kind))
    present = set(original_keys)
    return [rule for rule in rules if rule.original in present]


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def strip_transformer_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformer's tensors of a checkpoint, without the ``model.diffusion_model.`` prefix."""
    if any(k.startswith(_PREFIX) for k in state):
        return {k[len(_PREFIX) :]: v for k, v in state.items() if k.startswith(_PREFIX)}
    return {k: v for k, v in state.items() if not k.startswith(_OTHER_PARTS)}


def original_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL tensor names → diffusers ``FluxTransformer2DModel`` names, sizes read off the tensors."""
    state = strip_transformer_prefix(state)
    if "img_in.weight" not in state:
        raise UserError("Not a Flux transformer in the original layout (no img_in.weight).")
    inner = state["img_in.weight"].shape[0]
    rules = _rules(state)
    unknown = set(state) - {rule.original for rule in rules}
    if unknown:
        raise UserError(f"Unrecognised tensors in the Flux checkpoint: {sorted(unknown)[:5]}")
    converted = {}
    for rule in rules:
        tensor = state[rule.original]
        if rule.kind == "rename":
            converted[rule.diffusers[0]] = tensor
        elif rule.kind == "swapped":
            converted[rule.diffusers[0]] = _swap_halves(tensor)
        else:
            rows = tensor.shape[0]
            sizes = [rows // 3] * 3 if len(rule.diffusers) == 3 else [inner, inner, inner, rows - 3 * inner]
            converted.update(zip(rule.diffusers, torch.split(tensor, sizes, dim=0), strict=True))
    return converted


def diffusers_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`original_to_diffusers` (used to write single files)."""
    double = _block_count(state, "transformer_blocks")
    single = _block_count(state, "single_transformer_blocks")
    rules = _rules(_all_original_names(double, single))
    converted = {}
    for rule in rules:
        if not all(name in state for name in rule.diffusers):
            continue
        parts = [state[name] for name in rule.diffusers]
        if rule.kind == "swapped":
            converted[rule.original] = _swap_halves(parts[0])
        else:
            converted[rule.original] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    missing = set(state) - {name for rule in rules for name in rule.diffusers if name in state}
    if missing:
        raise ValueError(f"no original name for {sorted(missing)[:5]}")
    return converted


def _all_original_names(double: int, single: int) -> list[str]:
    """Every name a model with ``double`` and ``single`` blocks could have (optional parts included)."""
    names = [f"{o}{s}" for o in (*_GLOBAL, *_SWAPPED) for s in (".weight", ".bias")]
    for i in range(double):
        names += [f"double_blocks.{i}.{o}{s}" for o in (*_DOUBLE, *_DOUBLE_FUSED) for s in (".weight", ".bias")]
        names += [f"double_blocks.{i}.{o}" for o in _DOUBLE_NORMS]
    for i in range(single):
        names += [f"single_blocks.{i}.{o}{s}" for o in (*_SINGLE, *_SINGLE_FUSED) for s in (".weight", ".bias")]
        names += [f"single_blocks.{i}.{o}" for o in _SINGLE_NORMS]
    return names


def linear_module_map(double_blocks: int, single_blocks: int) -> dict[str, tuple[tuple[str, ...], str]]:
    """Every Linear layer of a Flux transformer with that many blocks: BFL module name →
    (the diffusers module(s) it holds in row order, "rename" / "fused" / "swapped")."""
    names = _all_original_names(double_blocks, single_blocks)
    return {
        rule.original[: -len(".weight")]: (tuple(d[: -len(".weight")] for d in rule.diffusers), rule.kind)
        for rule in _rules(names)
        if rule.original.endswith(".weight")
    }


def transformer_config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict:
    """The ``FluxTransformer2DModel`` arguments a BFL checkpoint's tensor shapes imply."""
    try:
        inner, in_channels = shapes["img_in.weight"]
        head_dim = (
            shapes.get("double_blocks.0.img_attn.norm.query_norm.scale")
            or shapes["single_blocks.0.norm.query_norm.scale"]
        )[0]
        config = {
            "patch_size": 1,
            "in_channels": in_channels,
            "out_channels": shapes["final_layer.linear.weight"][0],
            "num_layers": _block_count(shapes, "double_blocks"),
            "num_single_layers": _block_count(shapes, "single_blocks"),
            "attention_head_dim": head_dim,
            "num_attention_heads": inner // head_dim,
            "joint_attention_dim": shapes["txt_in.weight"][1],
            "pooled_projection_dim": shapes["vector_in.in_layer.weight"][1],
            "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"Not a Flux transformer checkpoint: tensor {exc} is missing or has an odd shape.") from exc
    mlp = shapes.get("double_blocks.0.img_mlp.0.weight")
    if mlp is not None and mlp[0] != 4 * inner:
        raise UserError("This Flux variant (MLP width other than 4× the model width) is not supported.")
    return config


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the transformer in a single file, prefix removed, without reading the tensors."""
    from model_formats.safetensors_header import header_shapes

    return strip_transformer_prefix(header_shapes(path))


def load_flux_transformer(path: Path, *, rope_axes: tuple[int, ...] | None, dtype: torch.dtype):
    """A ``FluxTransformer2DModel`` from a BFL single file, in ``dtype``, on the CPU."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open

    shapes = checkpoint_shapes(path)
    config = transformer_config_from_shapes(shapes)
    head_dim = config["attention_head_dim"]
    if rope_axes is None or sum(rope_axes) != head_dim:
        rope_axes = (16, 56, 56) if head_dim == 128 else None
    if rope_axes is None:
        raise UserError(f"{Path(path).name}: no rotary-embedding layout known for attention heads of width {head_dim}.")
    config["axes_dims_rope"] = list(rope_axes)
    with safe_open(str(path), framework="pt") as handle:
        prefixed = any(k.startswith(_PREFIX) for k in handle.keys())  # noqa: SIM118
        state = {}
        for key in handle.keys():  # noqa: SIM118
            name = key[len(_PREFIX) :] if prefixed and key.startswith(_PREFIX) else key
            if name in shapes:
                # fp8 and bf16 files are cast tensor by tensor, so the full-precision copy is never held twice.
                state[name] = handle.get_tensor(key).to(dtype)
    with init_empty_weights():
        model = FluxTransformer2DModel(**config)
    try:
        model.load_state_dict(original_to_diffusers(state), strict=True, assign=True)
    except RuntimeError as exc:
        raise UserError(f"{Path(path).name} does not match a Flux transformer: {str(exc)[:300]}") from exc
    return model.eval()


def save_flux_single_file(transformer, path: Path, *, metadata: dict[str, str]) -> None:
    """Write ``transformer`` as a BFL-layout single file (atomically), as Black Forest Labs ship it."""
    from model_formats.single_file import save_state_dict

    state = {k: v.detach().contiguous() for k, v in transformer.state_dict().items()}
    converted = {k: v.contiguous() for k, v in diffusers_to_original(state).items()}
    save_state_dict(converted, Path(path), metadata={"format": "pt", **metadata})


def rope_axes_of(folder: Path) -> tuple[int, ...] | None:
    """The rotary axes a diffusers Flux folder's transformer config names, if any."""
    config = read_config(Path(folder) / "transformer" / "config.json")
    if config is None:
        return None
    axes = config.get("axes_dims_rope")
    return tuple(axes) if axes else None
