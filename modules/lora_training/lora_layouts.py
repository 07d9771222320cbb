"""Module names of every LoRA layout we read and write, mapped onto one naming.

Each LoRA module in a file becomes a :class:`FileModule`: its tensor keys and shapes, the
alpha written for it, and the diffusers module(s) it changes ("parts"), named as
``<pipeline component>.<module>`` (text-encoder names without the level transformers 4 and 5
disagree on). A module of a fused layout holds several parts, stacked along its output rows.

Layouts read: diffusers/PEFT (``lora_A``/``lora_B``), kohya (each family resolves its names),
OneTrainer and ComfyUI (``diffusion_model.<original name>``); the family of a file is judged
from its header metadata, else from its tensor names (:func:`families.lora_family`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from families import FALLBACK_LORA_FAMILY, KOHYA_PREFIXES, family, lora_family
from families.clip_names import without_clip_level

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
    return stem, up_key, without_clip_level(module)


def family_of(keys: list[str], metadata: dict[str, str]) -> str:
    return lora_family(keys[:2000], metadata) or FALLBACK_LORA_FAMILY


def format_of(names: list[str]) -> str:
    if names and all(n.startswith(KOHYA_PREFIXES) for n in names):
        return "kohya"
    if names and all(n.startswith(COMFY_PREFIXES) for n in names):
        return "comfyui"
    return "diffusers"


def discover_modules(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> tuple[str, str, list]:
    """(family, format, modules) of a LoRA file from its tensor names and shapes; alphas not yet read."""
    keys = list(shapes)
    family_name = family_of(keys, metadata)
    found = []
    for key in keys:
        split = split_down_key(key)
        if split is None or split[1] not in shapes:
            continue
        name, up_key, module = split
        alpha_key = f"{name}.alpha" if f"{name}.alpha" in shapes else None
        found.append(FileModule(name, key, up_key, tuple(shapes[key]), tuple(shapes[up_key]), alpha_key=alpha_key))
    layout = format_of([m.name for m in found])
    resolved = family(family_name).module_parts(found, layout)
    modules = [replace(item, parts=parts, kind=kind) for item, (parts, kind) in zip(found, resolved, strict=True)]
    return family_name, layout, modules
