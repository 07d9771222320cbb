"""The prompts a LoRA is judged on: the trigger in new contexts, one image each at one seed.

The same panel gives the CLIP figures (is the subject there? is the context obeyed?) and the
columns of the comparison grid, so the grid shows exactly the images that were scored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

PANEL = (
    "a photo of {trigger}",
    "{trigger} on a beach",
    "{trigger}, watercolor painting",
    "{trigger} in a snowy forest",
)
GRID_WEIGHTS = (0.0, 0.5, 0.75, 1.0)


def panel_prompts(subject: str) -> list[str]:
    """The panel with ``subject`` (the trigger word, or the project's name when it has none) in place."""
    return [template.replace("{trigger}", subject) for template in PANEL]


def panel_contexts() -> list[str]:
    """What each prompt asks beyond the subject ("on a beach"): the text CLIP compares an image with."""
    return [template.replace("{trigger}", "").strip(" ,") or "a photo" for template in PANEL]


def render_panel(
    family,
    *,
    prompts: list[str],
    text_for: Callable[[str], dict],
    seed: int,
    size: tuple[int, int],
    steps: int,
    should_stop: Callable[[], bool] = lambda: False,
) -> list | None:
    """One image per prompt, every one at ``seed``; None when ``should_stop`` turned true between images."""
    from modules.lora_training.samples import render_image

    images = []
    for prompt in prompts:
        if should_stop():
            return None
        images.append(render_image(family, text=text_for(prompt), seed=seed, size=size, steps=steps))
    return images


@contextlib.contextmanager
def lora_weight(modules: list, weight: float) -> Iterator[None]:
    """Every LoRA (DoRA, LoKr, LoHa) layer inside ``modules`` applied at ``weight`` times its trained strength, restored after.
    At weight 0 the layers are switched off, as Generate leaves a LoRA at 0 out: scaling only scales B·A,
    and a DoRA layer would still apply its magnitudes."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer  # LoKr, LoHa

    kinds = (LoraLayer, LycorisLayer)
    layers = [layer for module in modules for layer in module.modules() if isinstance(layer, kinds)]
    were_off = [layer.disable_adapters for layer in layers]
    for layer in layers:
        if weight == 0:
            layer.enable_adapters(False)
        for adapter in layer.active_adapters:
            if adapter in layer.scaling:
                layer.scaling[adapter] *= weight
    try:
        yield
    finally:
        for layer, off in zip(layers, were_off, strict=True):
            layer.unscale_layer(None)  # back to alpha / rank, as the layers were built
            layer.enable_adapters(not off)
