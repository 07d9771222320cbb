"""Project and LoRA names: safe as one folder or file name on every OS."""

from __future__ import annotations

import re

from core.errors import UserError

MAX_NAME_LENGTH = 64
_ALLOWED = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._\-]*$")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {f"com{i}" for i in range(1, 10)} | {f"lpt{i}" for i in range(1, 10)}


def validate_name(name: str, *, what: str = "Project name") -> str:
    """Return ``name`` stripped, or raise a UserError saying what is wrong with it."""
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{what} is empty: give it a short name such as my_style.")
    name = name.strip()
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UserError(
            f"{what} contains control characters (a line break?): use letters, digits, spaces, '.', '_' or '-'."
        )
    if "/" in name or "\\" in name or ".." in name:
        raise UserError(f"{what} {name!r} must not contain '/', '\\' or '..'.")
    if len(name) > MAX_NAME_LENGTH:
        raise UserError(f"{what} is {len(name)} characters long; use at most {MAX_NAME_LENGTH}.")
    if name.split(".")[0].lower() in _WINDOWS_RESERVED:
        raise UserError(f"{what} {name!r} is a reserved device name; choose another.")
    if not _ALLOWED.match(name) or name.endswith((".", " ")):
        raise UserError(
            f"{what} {name!r}: use letters, digits, spaces, '.', '_' or '-', starting with a letter or digit."
        )
    return name


MAX_TRIGGER_LENGTH = 100


def validate_trigger(trigger: str) -> str:
    """Return the trigger word stripped, or raise a UserError saying what is wrong with it."""
    if not isinstance(trigger, str) or not trigger.strip():
        raise UserError("The trigger word is empty: pick a rare word (e.g. ohwx) that will call your LoRA.")
    trigger = trigger.strip()
    if any(ord(c) < 32 or ord(c) == 127 for c in trigger):
        raise UserError("The trigger word contains control characters (a line break?): type it on one line.")
    if len(trigger) > MAX_TRIGGER_LENGTH:
        raise UserError(
            f"The trigger word is {len(trigger)} characters long; use a short rare word (at most {MAX_TRIGGER_LENGTH})."
        )
    if "," in trigger:
        raise UserError("The trigger word must not contain commas (captions are comma-separated): use one word.")
    return trigger
