"""A quiet, informative console: library messages known to be harmless here are dropped at their logger.

Each entry names the logger that emits the message and a piece of its text, and says why it is harmless,
so a new, useful warning from the same library still gets through.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownNoise:
    logger: str
    contains: str
    why: str


KNOWN_NOISE = (
    KnownNoise(
        "transformers.utils.import_utils",
        "requires torchvision (not installed)",
        "torchvision is deliberately not installed; the PIL image processors it falls back to are the ones we use",
    ),
    KnownNoise(
        "bitsandbytes.backends.cpu.ops",
        "Failed to load CPU gemm_4bit_forward from kernels-community",
        "an optional CPU kernel package; 4-bit layers run without it",
    ),
    KnownNoise(
        "diffusers.models.modeling_utils",
        "that should be kept in float32: []",
        "the list of modules to keep in float32 is empty: casting the whole model is exact",
    ),
)


class _DropKnownNoise(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_known_noise(*, progress_bars: bool = False) -> None:
    """Drop the messages of :data:`KNOWN_NOISE`; without ``progress_bars``, also the model-loading bars
    ("Loading pipeline components", "Loading weights") that print on every model load."""
    for name in {entry.logger for entry in KNOWN_NOISE}:
        fragments = tuple(entry.contains for entry in KNOWN_NOISE if entry.logger == name)
        logging.getLogger(name).addFilter(_DropKnownNoise(fragments))
    if not progress_bars:
        import diffusers.utils.logging
        import transformers.utils.logging

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
