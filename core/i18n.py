"""Flat translation dictionaries. A missing key shows as ``[key]``: visible, never a crash."""

from __future__ import annotations

import json
from pathlib import Path


def translate(key: str, strings: dict[str, str], **values) -> str:
    text = strings.get(key)
    if text is None:
        return f"[{key}]"
    return text.format(**values) if values else text


def load_locale(locales_dir: Path, language: str) -> dict[str, str]:
    """English strings overlaid with ``language``'s, so an untranslated key falls back to English."""
    strings = json.loads((Path(locales_dir) / "en.json").read_text(encoding="utf-8"))
    if language != "en":
        strings.update(json.loads((Path(locales_dir) / f"{language}.json").read_text(encoding="utf-8")))
    return strings


def module_strings(language_table: dict[str, dict[str, str]], language: str) -> dict[str, str]:
    strings = dict(language_table.get("en", {}))
    strings.update(language_table.get(language, {}))
    return strings
