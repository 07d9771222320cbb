"""Which folder may be read, and which files in it: regular image files only, within limits.

Nothing here opens a file it has not first ``lstat``-ed (and, for symlinks, ``stat``-ed)
as a regular file: a FIFO blocks ``open()`` forever and a device (``/dev/zero``) never
ends. Only image-like names (by extension) are ever reported; every other entry is
counted by reason, so a folder's private file names (``id_rsa``) never reach a log.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError
from core.regular_files import UnreadableFile, read_bounded
from modules.lora_training.dataset.masks import MASK_SUFFIX, is_mask_name

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif"}
    | {".avif", ".jxl", ".jp2", ".tga", ".ppm"}
)
CAPTION_SUFFIX = ".txt"
IMAGE_SIZE_SETTING = "MAX_IMAGE_FILE_MB in config.json"
EMPTY_FOLDER = "Image folder is empty: type the folder that holds your photos"


class StopRequested(Exception):
    """``should_stop`` said so; the caller keeps what it finished."""


class RejectedFile(Exception):
    """Why a file is not read; the message is the per-file reason."""


@dataclass(frozen=True)
class ScanLimits:
    max_image_bytes: int = 200 * 2**20
    max_caption_bytes: int = 64 * 2**10
    max_entries: int = 100_000
    max_depth: int = 16
    max_seconds: float = 60.0


DEFAULT_LIMITS = ScanLimits()


@dataclass(frozen=True)
class SourceFile:
    path: Path  # as found under the folder (may be a symlink that stays inside it)
    relative: str
    size: int


@dataclass
class ScanResult:
    files: list[SourceFile] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (image-like name, reason)
    ignored: Counter = field(default_factory=Counter)  # reason -> count, names never kept


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def never_stop() -> bool:
    return False


def _special_kind(mode: int) -> str | None:
    kinds = ((stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "device"))
    kinds += ((stat.S_ISBLK, "device"),)
    return next((name for test, name in kinds if test(mode)), None)


def regular_file_stat(path: Path, *, folder: Path) -> os.stat_result:
    """The ``stat`` of ``path`` if it is a regular file (or a symlink to one inside ``folder``)."""
    try:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            target = path.resolve(strict=True)
            if folder not in target.parents:
                raise RejectedFile("symlink points outside the image folder")
            info = os.stat(target)
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, FileNotFoundError | RuntimeError) or getattr(exc, "errno", 0) == errno.ELOOP:
            raise RejectedFile("broken or looping symlink") from exc
        raise RejectedFile(f"cannot be read ({getattr(exc, 'strerror', None) or exc})") from exc
    kind = _special_kind(info.st_mode)
    if kind:
        raise RejectedFile(f"not a regular file ({kind})")
    if not stat.S_ISREG(info.st_mode):
        raise RejectedFile("not a regular file")
    return info


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB" if size >= 2**20 else f"{size / 2**10:.0f} KB"


def too_large(size: int, limit: int, *, setting: str = "") -> str:
    where = f", {setting}" if setting else ""
    return f"file too large ({_megabytes(size)}; the limit is {_megabytes(limit)}{where})"


def read_regular_file(path: Path, *, folder: Path, max_bytes: int, setting: str = "") -> bytes:
    """The bytes of a regular file no larger than ``max_bytes``, or RejectedFile with the reason."""
    size = regular_file_stat(path, folder=folder).st_size
    if size > max_bytes:
        raise RejectedFile(too_large(size, max_bytes, setting=setting))
    try:
        return read_bounded(path, max_bytes=max_bytes)
    except UnreadableFile as exc:
        if exc.too_large:
            raise RejectedFile(too_large(max_bytes + 1, max_bytes, setting=setting)) from exc
        raise RejectedFile(str(exc)) from exc


def read_caption_beside(image: Path, *, folder: Path, max_bytes: int) -> tuple[str | None, str]:
    """The ``.txt`` caption next to ``image`` (or None) and, when one was refused, why."""
    candidate = image.with_suffix(CAPTION_SUFFIX)
    if not os.path.lexists(candidate):
        return None, ""
    try:
        data = read_regular_file(candidate, folder=folder, max_bytes=max_bytes)
        return data.decode("utf-8").strip(), ""
    except RejectedFile as exc:
        return None, f"caption file ignored: {exc}"
    except UnicodeDecodeError:
        return None, "caption file ignored: not UTF-8 text"


MAX_PATH_LENGTH = 4000  # below Linux's PATH_MAX: longer paths fail in the kernel with a less clear error


def require_folder_text(images_dir) -> None:
    # Path("") is Path("."): an empty field would otherwise name the server's working folder.
    if images_dir is None or str(images_dir).strip() in ("", "."):
        raise UserError(f"{EMPTY_FOLDER}.")
    if "\0" in str(images_dir):
        raise UserError("The image folder path contains a NUL character: type or paste the folder path again.")
    if len(str(images_dir)) > MAX_PATH_LENGTH:
        raise UserError(
            f"The image folder path is {len(str(images_dir))} characters long; the limit is {MAX_PATH_LENGTH}."
        )


def check_within_roots(folder: Path, roots: Iterable[Path]) -> Path:
    """``folder`` resolved (symlinks followed) if it lies inside one of ``roots``; else a UserError."""
    require_folder_text(folder)
    roots = [Path(r).expanduser().resolve() for r in roots]
    if not roots:
        raise UserError("No image roots are configured: list at least one folder in config.json IMAGE_ROOTS.")
    resolved = Path(folder).expanduser().resolve()
    root = next((r for r in roots if resolved == r or r in resolved.parents), None)
    if root is None:
        listed = ", ".join(str(r) for r in roots)
        raise UserError(
            f"Image folder {folder} is not inside the folders this app may read ({listed}). Move your photos "
            "into one of them, or add their folder to IMAGE_ROOTS in config.json and restart the app."
        )
    hidden = next((part for part in resolved.relative_to(root).parts if part.startswith(".")), None)
    if hidden:
        raise UserError(f"Image folder {folder} is inside the hidden folder {hidden}: move your photos elsewhere.")
    return resolved


def image_folder(images_dir, *, roots: Iterable[Path] | None) -> Path:
    """The folder of photos, resolved: within ``roots`` (when given), existing, a folder."""
    require_folder_text(images_dir)
    folder = Path(images_dir).expanduser()
    if roots is not None:
        check_within_roots(folder, roots)
    if not folder.exists():
        raise UserError(f"Image folder {folder} does not exist: check the path (it is a folder on the server).")
    if not folder.is_dir():
        raise UserError(f"{folder} is a file; choose the folder that holds your photos.")
    return folder.resolve()


def count_image_files(folder: Path, *, subfolders: bool, limit: int = 10_000) -> int:
    """About how many photos ``folder`` holds (regular files with an image name, hidden entries skipped),
    looking at no more than ``limit`` entries: a quick figure for the form, not a scan."""
    count, seen, pending = 0, 0, [Path(folder)]
    while pending and seen < limit:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                seen += 1
                if seen > limit:
                    break
                if entry.name.startswith("."):
                    continue
                if entry.is_file(follow_symlinks=False) and is_image_name(entry.name) and not is_mask_name(entry.name):
                    count += 1
                elif subfolders and entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
    return count


class _Scanner:
    def __init__(self, folder: Path, *, subfolders: bool, limits: ScanLimits, should_stop: Callable[[], bool]):
        self.folder = folder
        self.subfolders = subfolders
        self.limits = limits
        self.should_stop = should_stop
        self.result = ScanResult()
        self.entries = 0
        self.deadline = time.monotonic() + limits.max_seconds

    def tick(self) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise UserError(
                f"Image folder {self.folder} holds more than {self.limits.max_entries:,} entries: "
                "choose the folder that holds only your photos."
            )
        if self.entries % 256 == 0:
            if self.should_stop():
                raise StopRequested()
            if time.monotonic() > self.deadline:
                raise UserError(
                    f"Listing image folder {self.folder} took over {self.limits.max_seconds:.0f} s: "
                    "choose a smaller folder (or one on a faster disk)."
                )

    def walk(self, directory: Path, depth: int) -> None:
        entries = []
        try:
            with os.scandir(directory) as listing:
                for entry in listing:  # counted while listing: a huge folder is refused before it is all read
                    self.tick()
                    entries.append(entry)
        except OSError as exc:
            self.result.ignored[f"folder that cannot be listed ({exc.strerror or 'error'})"] += 1
            return
        for entry in sorted(entries, key=lambda e: e.name):
            self.visit(entry, depth)

    def visit(self, entry: os.DirEntry, depth: int) -> None:
        ignored = self.result.ignored
        image_like = is_image_name(entry.name)
        if entry.name.startswith("."):
            ignored["hidden file or folder"] += 1
        elif entry.name.lower().endswith((CAPTION_SUFFIX, MASK_SUFFIX)) and not entry.is_dir(follow_symlinks=False):
            return  # read only as the caption or the loss mask beside its image
        elif entry.is_symlink() and not image_like:
            ignored["symlink that is not an image (not followed)"] += 1
        elif entry.is_dir(follow_symlinks=False):
            if not self.subfolders:
                ignored["subfolder (include subfolders is off)"] += 1
            elif depth >= self.limits.max_depth:
                ignored[f"folder nested deeper than {self.limits.max_depth} levels"] += 1
            else:
                self.walk(Path(entry.path), depth + 1)
        elif not image_like:
            try:
                kind = _special_kind(entry.stat(follow_symlinks=False).st_mode)
            except OSError:
                kind = None
            ignored[f"not a regular file ({kind})" if kind else "not an image file (by its extension)"] += 1
        else:
            self.add_image(Path(entry.path))

    def add_image(self, path: Path) -> None:
        relative = path.relative_to(self.folder).as_posix()
        try:
            info = regular_file_stat(path, folder=self.folder)
        except RejectedFile as exc:
            self.result.refused.append((relative, str(exc)))
            return
        if info.st_size > self.limits.max_image_bytes:
            reason = too_large(info.st_size, self.limits.max_image_bytes, setting=IMAGE_SIZE_SETTING)
            self.result.refused.append((relative, reason))
            return
        self.result.files.append(SourceFile(path=path, relative=relative, size=info.st_size))


def scan_folder(
    folder: Path,
    *,
    include_subfolders: bool = False,
    limits: ScanLimits = DEFAULT_LIMITS,
    should_stop: Callable[[], bool] = never_stop,
) -> ScanResult:
    """Image files under ``folder`` (resolved), refused image-like names with reasons, other entries counted."""
    scanner = _Scanner(Path(folder).resolve(), subfolders=include_subfolders, limits=limits, should_stop=should_stop)
    scanner.walk(scanner.folder, depth=0)
    return scanner.result
