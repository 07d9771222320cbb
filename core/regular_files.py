"""Reading a file the user named, safely: a regular file only, never more than a bound.

The caller has usually ``stat``-ed the path already; the path can still be swapped for a FIFO or a
device between that check and ``open``. Opening with ``O_NONBLOCK`` makes ``open`` return at once
even on a FIFO, and the ``fstat`` of the opened descriptor is the check that cannot be raced.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

MAX_CONFIG_BYTES = 16 * 2**20  # a model's JSON config (model_index.json, config.json, tokenizer_config.json)


class UnreadableFile(Exception):
    """Why a file was not read, in words for the user (``too_large`` tells the size case apart)."""

    def __init__(self, reason: str, *, too_large: bool = False) -> None:
        super().__init__(reason)
        self.too_large = too_large


def read_bounded(path: str | Path, *, max_bytes: int) -> bytes:
    """The bytes of the regular file at ``path``; UnreadableFile if it is not one or holds over ``max_bytes``."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise UnreadableFile(f"cannot be read ({exc.strerror or exc})") from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)  # before fdopen: Python refuses to wrap a folder's descriptor
        raise UnreadableFile("not a regular file")
    with os.fdopen(fd, "rb") as handle:
        # read() allocates its whole size first: ask for what the file holds, not the (large) bound
        data = handle.read(min(max_bytes, info.st_size) + 1)
    if len(data) > max_bytes:
        raise UnreadableFile(f"larger than {max_bytes} bytes", too_large=True)
    if len(data) > info.st_size:
        raise UnreadableFile("changed while it was read; try again")
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def read_json_bounded(path: str | Path, *, max_bytes: int, allow_nan: bool = False):
    """The JSON value in the regular file at ``path`` (NaN/Infinity refused unless ``allow_nan``);
    UnreadableFile otherwise."""
    import json

    data = read_bounded(path, max_bytes=max_bytes)
    try:
        return json.loads(data.decode("utf-8"), parse_constant=None if allow_nan else _no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UnreadableFile(f"not valid JSON ({str(exc)[:200]})") from exc


def read_config(path: str | Path) -> dict | None:
    """A model folder's JSON config as a dict; None when it is missing, not a regular file, too large or not
    a JSON object (the callers treat that as "no config")."""
    try:
        value = read_json_bounded(path, max_bytes=MAX_CONFIG_BYTES)
    except UnreadableFile:
        return None
    return value if isinstance(value, dict) else None


def load_safetensors_bounded(path: str | Path, *, max_bytes: int) -> dict:
    """The tensors of the regular safetensors file at ``path``, read from its bytes (never reopened by name)."""
    from safetensors.torch import load

    data = read_bounded(path, max_bytes=max_bytes)
    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own error types for a corrupt file
        raise UnreadableFile(f"not a readable safetensors file ({str(exc)[:200]})") from exc
