"""Photos sent from the browser (files or .zip archives) copied into a project's ``source/`` folder.

Only entries with an image name are kept; every name is reduced to its last part (no folders, no ``..``),
symbolic links and special entries in archives are skipped, and sizes are checked before and while
copying (a zip bomb stops at its cap), one upload writes at most ``max_total_bytes`` in all, and an archive
whose entries share or overlap their data (a crafted zip that repeats one blob) is refused whole.
Existing photos are never replaced: a clash gets " (2)".
"""

from __future__ import annotations

import functools
import re
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError
from modules.lora_training.dataset.scan import is_image_name

MAX_FILES = 5_000
MAX_TOTAL_BYTES = 16 << 30
MAX_ZIP_ENTRIES = 2 * MAX_FILES
LOCAL_HEADER = 30  # fixed part of a zip local file header, before its name and extra field
CHUNK = 1 << 20


@dataclass
class UploadResult:
    folder: Path
    copied: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def summary(self) -> str:
        skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
        return f"{len(self.copied)} photo(s) copied to {self.folder}" + (f"; skipped: {skipped}" if skipped else "")


def _safe_name(name: str) -> str:
    base = re.split(r"[\\/]", name)[-1].strip()
    base = re.sub(r"[\x00-\x1f\x7f]", "", base)
    return "" if base in ("", ".", "..") or base.startswith(".") else base[:150]


def _free_name(folder: Path, name: str) -> Path:
    target = folder / name
    stem, suffix, number = target.stem, target.suffix, 2
    while target.exists():
        target = folder / f"{stem} ({number}){suffix}"
        number += 1
    return target


def _copy_stream(source, target: Path, *, max_bytes: int) -> int | None:
    """Copy at most ``max_bytes``; the bytes written, or None (and nothing left behind) when the data is longer."""
    written = 0
    partial = target.with_name(f".{target.name}.partial")
    with open(partial, "wb") as out:
        while chunk := source.read(CHUNK):
            written += len(chunk)
            if written > max_bytes:
                break
            out.write(chunk)
    if written > max_bytes:
        partial.unlink()
        return None
    partial.rename(target)
    return written


def _overlapping(entries: list[zipfile.ZipInfo]) -> bool:
    """True when two entries' data share bytes (each entry must own its local header and compressed data)."""
    end = -1
    for entry in sorted(entries, key=lambda e: e.header_offset):
        if entry.header_offset < end:
            return True
        end = entry.header_offset + LOCAL_HEADER + len(entry.orig_filename.encode()) + entry.compress_size
    return False


class _Uploader:
    def __init__(self, folder: Path, *, max_file_bytes: int, max_total_bytes: int) -> None:
        self.result = UploadResult(folder=folder)
        self.max_file_bytes = max_file_bytes
        self.left = max_total_bytes
        self.over_total = f"over the limit of {max_total_bytes / 2**30:.1f} GB per upload"

    def add(self, name: str, opener, size: int) -> None:
        if len(self.result.copied) >= MAX_FILES:
            self.result.skip(f"over the limit of {MAX_FILES} files")
            return
        safe = _safe_name(name)
        if not safe or not is_image_name(safe):
            self.result.skip("not an image file")
            return
        if size > self.max_file_bytes:
            self.result.skip("too large")
            return
        if size > self.left:
            self.result.skip(self.over_total)
            return
        cap = min(self.max_file_bytes, self.left)
        target = _free_name(self.result.folder, safe)
        with opener() as source:
            written = _copy_stream(source, target, max_bytes=cap)
        if written is None:
            self.result.skip("too large" if cap == self.max_file_bytes else self.over_total)
            return
        self.left -= written
        self.result.copied.append(target.name)

    def add_file(self, path: Path, *, name: str) -> None:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode):
            self.result.skip("not a regular file")
        elif name.lower().endswith(".zip"):
            self.add_zip(path)
        else:
            self.add(name, functools.partial(path.open, "rb"), info.st_size)

    def add_zip(self, path: Path) -> None:
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError):
            self.result.skip("unreadable .zip")
            return
        with archive:
            entries = archive.infolist()
            if len(entries) > MAX_ZIP_ENTRIES:
                self.result.skip(f".zip with over {MAX_ZIP_ENTRIES} entries")
                return
            if _overlapping(entries):
                self.result.skip(".zip whose entries overlap (damaged or crafted)")
                return
            for entry in entries:
                kind = stat.S_IFMT(entry.external_attr >> 16)  # 0 when the archiver recorded no file type
                if entry.is_dir():
                    continue
                if kind and kind != stat.S_IFREG:
                    self.result.skip("link or special entry in a .zip")
                    continue
                try:
                    self.add(entry.filename, lambda entry=entry: archive.open(entry), entry.file_size)
                except (zipfile.BadZipFile, NotImplementedError, OSError, RuntimeError):
                    self.result.skip("unreadable entry in a .zip")


def copy_uploads(
    files: list[tuple[Path, str]], *, folder: Path, max_file_bytes: int, max_total_bytes: int = MAX_TOTAL_BYTES
) -> UploadResult:
    """Copy uploaded ``(path, original name)`` files (images or .zip archives of images) into ``folder``,
    ``max_total_bytes`` at most in all."""
    if not files:
        raise UserError("No files were received: drop photos (or a .zip of photos) onto the upload area.")
    folder.mkdir(parents=True, exist_ok=True)
    uploader = _Uploader(folder, max_file_bytes=max_file_bytes, max_total_bytes=max_total_bytes)
    for path, name in files:
        uploader.add_file(Path(path), name=name)
    if not uploader.result.copied:
        raise UserError(f"None of the files is a photo (JPEG, PNG, WebP...): {uploader.result.summary()}.")
    return uploader.result
