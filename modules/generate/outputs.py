"""Save generated images as PNG with their settings embedded."""

from __future__ import annotations

import json
import time
from pathlib import Path

from core.atomic import atomic_path


def a1111_parameters(parameters: dict) -> str:
    """The "parameters" text other tools (A1111, Forge, Civitai) read from a PNG."""
    lines = [parameters["prompt"]]
    if parameters.get("negative_prompt"):
        lines.append(f"Negative prompt: {parameters['negative_prompt']}")
    settings = [
        f"Steps: {parameters['steps']}",
        f"CFG scale: {parameters['guidance']}",
        f"Seed: {parameters['seed']}",
        f"Size: {parameters['width']}x{parameters['height']}",
        f"Model: {parameters['model']}",
    ]
    settings += [f"Lora {i + 1}: {lora['name']} ({lora['weight']})" for i, lora in enumerate(parameters["loras"])]
    lines.append(", ".join(settings))
    return "\n".join(lines)


def save_png(image, parameters: dict, path: Path) -> Path:
    """``image`` as a PNG at ``path`` (written atomically), its settings in the text chunks ("parameters" for
    other tools, "lora_studio" as JSON)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", a1111_parameters(parameters))
    info.add_text("lora_studio", json.dumps(parameters, ensure_ascii=False))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def save_generation(image, parameters: dict, outputs_dir: Path) -> Path:
    day = time.strftime("%Y-%m-%d")
    stamp = time.strftime("%H%M%S")
    folder = Path(outputs_dir) / day
    path = folder / f"{stamp}-{time.monotonic_ns() % 10**6:06d}-seed{parameters['seed']}.png"
    return save_png(image, parameters, path)
