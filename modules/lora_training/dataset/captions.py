"""Caption text: trigger word placement, merging with existing captions, token limits."""

from __future__ import annotations

import re
import unicodedata

EXISTING_CAPTION_MODES = ("keep", "replace", "append")
# CLIP reads 77 tokens, two of them BOS and EOS.
CLIP_CONTENT_TOKENS = 75


def _trigger_pattern(trigger: str) -> re.Pattern:
    return re.compile(rf"(?<![\w-]){re.escape(trigger)}(?![\w-])", re.IGNORECASE)


def _tidy(text: str) -> str:
    # Captioners can emit control characters or U+FFFD (a byte sequence cut mid-character).
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Cf") or c == "\ufffd" else c for c in text)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:])", r"\1", text)
    text = re.sub(r"([,;])(\s*[,;])+", r"\1", text)
    return text.strip(" ,;")


def inject_trigger(caption: str, trigger: str) -> str:
    """Put ``trigger`` once, at the start; whole-word copies elsewhere are removed."""
    trigger = trigger.strip()
    caption = _tidy(caption)
    if not trigger:
        return caption
    rest = _tidy(_trigger_pattern(trigger).sub(" ", caption))
    return f"{trigger}, {rest}" if rest else trigger


def merge_existing(existing: str | None, generated: str | None, mode: str) -> str:
    """Combine a caption found beside the source image with the captioner's output."""
    existing = _tidy(existing or "")
    generated = _tidy(generated or "")
    if mode == "keep":
        return existing or generated
    if mode == "replace":
        return generated or existing
    if mode == "append":
        return ", ".join(part for part in (existing, generated) if part)
    raise ValueError(f"existing caption mode must be one of {EXISTING_CAPTION_MODES}, got {mode!r}")


def needs_captioner(existing: str | None, mode: str) -> bool:
    return mode != "keep" or not (existing or "").strip()


def count_clip_tokens(tokenizer, caption: str) -> int:
    return len(tokenizer.tokenize(caption))
