"""Model families: one class each holds everything specific to a kind of model.

The registry names each family and imports its module only when asked, so importing this
package does no work. Shared code asks a family (``family(name).size_multiple``,
``family(name).kohya_plan(...)``) instead of comparing names.
"""

from __future__ import annotations

import importlib
from pathlib import Path

# name → (module, class), in the order lists and defaults use.
_REGISTRY = {
    "sdxl": ("families.sdxl", "SDXLFamily"),
    "flux": ("families.flux", "FluxFamily"),
    "sd15": ("families.sd15", "SD15Family"),
}
FAMILY_NAMES: tuple[str, ...] = tuple(_REGISTRY)
# A Flux LoRA may also hold CLIP text-encoder layers named like SDXL's first encoder: its own
# markers are looked for first. SD 1.5's markers are names SDXL LoRAs never have, while SDXL's
# (``lora_unet_``, ``down_blocks``...) are in SD 1.5 LoRAs too: SD 1.5 comes before SDXL.
_LORA_DETECTION_ORDER = ("flux", "sd15", "sdxl")
# Which family a LoRA whose names carry no family marker is read as (the U-Net naming).
FALLBACK_LORA_FAMILY = "sdxl"
# Name prefixes of kohya-style LoRA modules (any family), LyCORIS included.
KOHYA_PREFIXES = ("lora_unet_", "lora_te", "lora_transformer_", "lycoris_")


def family(name: str):
    """The family class registered as ``name``."""
    try:
        module, cls = _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model family {name!r}") from None
    return getattr(importlib.import_module(module), cls)


def all_families() -> list:
    return [family(name) for name in FAMILY_NAMES]


def family_of_state_keys(keys: list[str]) -> str | None:
    """The family whose base-model checkpoint has these tensor names, None when none does."""
    return next((f.name for f in all_families() if f.matches_checkpoint(keys)), None)


def family_of_pipeline(class_name: str) -> str | None:
    """The family of a diffusers folder whose ``model_index.json`` names pipeline ``class_name``."""
    return next((f.name for f in all_families() if f.pipeline_marker in class_name), None)


def lora_family(keys: list[str], metadata: dict[str, str]) -> str | None:
    """The family a LoRA is for, from header metadata, else from tensor names; None when unknown."""
    if metadata.get("lora_studio.family") in FAMILY_NAMES:
        return metadata["lora_studio.family"]
    ordered = [family(name) for name in _LORA_DETECTION_ORDER]
    for candidate in ordered:
        if candidate.claims_lora_metadata(metadata):
            return candidate.name
    for candidate in ordered:
        if any(marker in key for key in keys for marker in candidate.lora_key_markers):
            return candidate.name
    return None


def display_name(name: str) -> str:
    """How messages name a family: "SDXL", "Flux", "SD 1.5"."""
    return family(name).display_name


def display_names() -> str:
    """ "SDXL, Flux or SD 1.5": the families, for messages."""
    names = [f.display_name for f in all_families()]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def _odd_component_file(folder: Path) -> str | None:
    """The first entry of a component folder (``unet/``, ``vae/``...) that is neither a regular file nor a
    folder: diffusers opens the components' files by name, and a FIFO there would block the server."""
    import os
    import stat

    for component in sorted(folder.iterdir()):
        if component.name.startswith(".") or not component.is_dir():
            continue
        for entry in sorted(component.iterdir()):
            try:
                mode = os.stat(entry).st_mode
            except OSError:
                return f"{component.name}/{entry.name}"  # a broken link
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                return f"{component.name}/{entry.name}"
    return None


def detect(path: Path) -> str:
    """The family of a base model: a diffusers folder or a single ``.safetensors`` file."""
    from core.errors import UserError
    from core.regular_files import MAX_CONFIG_BYTES, UnreadableFile, read_json_bounded
    from model_formats.safetensors_header import read_safetensors_header

    path = Path(path)
    if path.is_dir():
        index = path / "model_index.json"
        try:
            raw = read_json_bounded(index, max_bytes=MAX_CONFIG_BYTES)
        except UnreadableFile as exc:
            raise UserError(
                f"{path.name}: no readable model_index.json, so this is not a diffusers model folder; "
                "copy the whole folder of the model, or pick another one."
            ) from exc
        class_name = raw.get("_class_name") if isinstance(raw, dict) else None
        if not isinstance(class_name, str):
            raise UserError(
                f"{path.name}: model_index.json names no pipeline class (_class_name), so this is not a diffusers "
                "model folder; copy the whole folder of the model, or pick another one."
            )
        odd = _odd_component_file(path)
        if odd is not None:
            raise UserError(f"{path.name}: {odd} is not a regular file; only model files are read. Remove it.")
        found = family_of_pipeline(class_name)
        refusal = family(found).folder_refusal(path) if found else None
        if found is None or refusal:
            why = refusal or f"pipeline {class_name!r} is not supported"
            raise UserError(f"{path.name}: {why}; use an {display_names()} model.")
        return found
    keys, _ = read_safetensors_header(path)
    found = family_of_state_keys(keys)
    if found is None:
        raise UserError(
            f"{path.name}: not an {display_names()} checkpoint (unrecognised tensor names); pick a base model "
            "(LoRA files belong in the loras folder)."
        )
    return found


def load_pipeline(entry, *, models_dir: Path, dtype):
    """The diffusers pipeline for a model entry on the CPU, in ``dtype``: one path for inference and training."""
    pipe = family(entry.family).load_pipeline(entry, models_dir=Path(models_dir), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
