"""Read and write ``.safetensors`` files one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header (name → dtype, shape,
byte range within the data section, plus an optional ``__metadata__`` of strings), then the
tensors' bytes. Reading seeks to one tensor's range; writing computes the header from the
shapes first, then streams each tensor as it is produced, so neither ever holds a whole file.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from core.atomic import atomic_path
from core.errors import UserError

MAX_HEADER_BYTES = 100 * 2**20
_ALIGN = 8

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _corrupt(path: Path, why: str) -> UserError:
    return UserError(f"corrupt or not a LoRA file: {Path(path).name} ({why})")


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offsets within the data section
    end: int

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


MAX_DIMENSION = 2**48  # far beyond any tensor; keeps shape arithmetic and torch.empty in range


def _whole_numbers(values) -> tuple[int, ...]:
    """The header's list of sizes or offsets: whole numbers only (1e400, 2.5, true and "3" are not)."""
    if not isinstance(values, list) or not all(type(v) is int and 0 <= v <= MAX_DIMENSION for v in values):
        raise ValueError("not a list of whole numbers in range")
    return tuple(values)


def _parse_entry(path: Path, name: str, entry) -> TensorInfo:
    try:
        dtype = DTYPES[entry["dtype"]]
        shape = _whole_numbers(entry["shape"])
        start, end = _whole_numbers(entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _corrupt(path, f"bad header entry for {name!r}") from exc
    info = TensorInfo(dtype, shape, start, end)
    if end - start != info.numel * _element_size(dtype):
        raise _corrupt(path, f"tensor {name!r} has a byte range that does not fit its shape")
    return info


class SafetensorsReader:
    """Header at open, tensors on demand. Use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # O_NONBLOCK: open() returns at once even on a FIFO; the fstat of the opened descriptor is the
        # check that cannot be raced by swapping the path after a stat.
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        except OSError as exc:
            raise UserError(f"cannot read {self.path.name}: {exc.strerror or exc}") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise _corrupt(self.path, "not a regular file")
        self._file = os.fdopen(fd, "rb")
        try:
            self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _read_header(self) -> None:
        size = os.fstat(self._file.fileno()).st_size
        prefix = self._file.read(8)
        if len(prefix) < 8:
            raise _corrupt(self.path, "shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise _corrupt(self.path, f"header length {length} is not plausible")
        try:
            header = json.loads(self._file.read(length).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise _corrupt(self.path, "header is not JSON (or nested too deeply)") from exc
        if not isinstance(header, dict):
            raise _corrupt(self.path, "header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise _corrupt(self.path, "metadata is not an object")
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in metadata.items()}
        self._data_start = 8 + length
        self.tensors = {name: _parse_entry(self.path, name, entry) for name, entry in header.items()}
        if any(self._data_start + info.end > size for info in self.tensors.values()):
            raise _corrupt(self.path, "truncated: a tensor lies past the end of the file")

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        self._file.seek(self._data_start + info.start)
        data = bytearray(info.end - info.start)
        if self._file.readinto(data) != len(data):
            raise _corrupt(self.path, f"truncated tensor {name!r}")
        if not data:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(data, dtype=info.dtype).reshape(info.shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: its name, dtype and shape up front, its values on demand."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * _element_size(self.dtype)


def _header_bytes(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for spec in specs:
        if spec.name in header or spec.name == "__metadata__":
            raise ValueError(f"duplicate tensor name {spec.name!r}")
        header[spec.name] = {
            "dtype": _NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # The data section starts 8-byte aligned, as the reference writer does.
    return raw + b" " * (-len(raw) % _ALIGN)


def _write_tensor(handle, spec: TensorSpec) -> None:
    tensor = spec.produce()
    if tuple(tensor.shape) != tuple(spec.shape) or tensor.dtype != spec.dtype:
        raise ValueError(
            f"{spec.name}: produced {tuple(tensor.shape)} {tensor.dtype}, announced {spec.shape} {spec.dtype}"
        )
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    handle.write(memoryview(raw.numpy()))


def write_safetensors_to(path: Path, specs: Iterable[TensorSpec], *, metadata: dict[str, str] | None = None) -> None:
    """Write ``specs`` to ``path`` as it is (no temporary), producing and writing one tensor at a time."""
    specs = list(specs)
    header = _header_bytes(specs, metadata or {})
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        for spec in specs:
            _write_tensor(handle, spec)


def write_safetensors(path: Path, specs: Iterable[TensorSpec], *, metadata: dict[str, str] | None = None) -> None:
    """:func:`write_safetensors_to` through a temporary name, renamed onto ``path`` once complete."""
    with atomic_path(Path(path)) as tmp:
        write_safetensors_to(tmp, specs, metadata=metadata)
