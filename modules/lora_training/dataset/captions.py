"""Caption text: comma-separated tags, trigger word placement, merging with existing captions, token limits."""

from __future__ import annotations

import re
import unicodedata

EXISTING_CAPTION_MODES = ("keep", "replace", "append")
# CLIP reads 77 tokens, two of them BOS and EOS.
CLIP_CONTENT_TOKENS = 75


def split_tags(caption: str) -> list[str]:
    """``"a, b ,, c"`` → ``["a", "b", "c"]``: a caption's comma-separated tags, trimmed, empty ones left out."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def join_tags(tags: list[str]) -> str:
    return ", ".join(tags)


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


def plain_tag(tag: str) -> str:
    """A tag's form for comparisons: brackets unescaped, underscores as spaces, lower case, single spaces."""
    tag = tag.replace("\\(", "(").replace("\\)", ")").replace("_", " ")
    return re.sub(r"\s+", " ", tag).strip().lower()


def _in_sentence(tag: str, sentence: str) -> bool:
    words = plain_tag(tag).split(" ")
    if not any(words):
        return True
    pattern = r"(?<![\w])" + r"\s+".join(re.escape(word) for word in words) + r"(?![\w])"
    return re.search(pattern, sentence, re.IGNORECASE) is not None


def sentence_and_tags(sentence: str, tags: str) -> str:
    """A sentence, then the comma-separated ``tags`` that it does not already say (a tag whose words appear
    in it in that order, whatever the case, is dropped; so is a tag given twice)."""
    sentence = _tidy(sentence)
    kept, seen = [], set()
    for tag in split_tags(tags):
        if plain_tag(tag) not in seen and not _in_sentence(tag, sentence):
            seen.add(plain_tag(tag))
            kept.append(tag)
    return ", ".join(part for part in (sentence, ", ".join(kept)) if part)


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
