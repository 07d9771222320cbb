"""A safetensors file's tensor names and metadata, read without the tensors, from regular files only."""

from __future__ import annotations

from pathlib import Path

from core.errors import UserError


def read_safetensors_header(path: Path) -> tuple[list[str], dict[str, str]]:
    """Tensor names and header metadata, without reading the tensors.

    Only a regular file is opened: a named pipe would block ``open()`` (inside safetensors,
    holding the GIL: every thread of the server would stop)."""
    from safetensors import safe_open

    require_regular_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys()), dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises several types for a bad file
        raise UserError(
            f"{Path(path).name} is not a readable .safetensors file ({exc}): download it again, or remove it."
        ) from exc


def require_regular_file(path: Path) -> None:
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise UserError(f"{Path(path).name} cannot be read ({exc.strerror}).") from exc
    if not stat.S_ISREG(mode):
        raise UserError(f"{Path(path).name} is not a regular file: only model files are read; remove it.")


def header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a single file, without reading the tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
