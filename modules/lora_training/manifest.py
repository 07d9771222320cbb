"""A project's ``manifest.json``: what Prepare made of the photos, read and written in this one place.

Prepare writes it once a run completes: the preparation settings, one entry per image (the used
ones with their crop and caption, the skipped ones with the reason) and a bucket histogram.
Everything else (training, the tab, the CLI, the estimate) reads it through :class:`ProjectManifest`.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError
from core.regular_files import UnreadableFile, read_json_bounded
from modules.lora_training.project import ProjectPaths, write_json

MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 256 * 2**20
DEFAULT_RESOLUTION = 1024  # what an estimate assumes before a project is prepared


@dataclass(frozen=True)
class PreparedImage:
    """One image training uses: its crop in ``images/`` and where it came from."""

    sha256: str
    image: str  # file name inside the project's images/
    caption_file: str
    caption: str  # as Prepare wrote it; the .txt beside the image may have been edited since
    bucket: tuple[int, int]  # width, height
    original_size: tuple[int, int]  # width, height of the source after EXIF rotation
    crop_top_left: tuple[int, int]  # top, left in the resized image
    resized_size: tuple[int, int]  # width, height of the image the crop was cut from
    mask: str | None = None  # the crop's loss mask inside images/, when the photo had one


@dataclass(frozen=True)
class ProjectManifest:
    settings: dict = field(default_factory=dict)  # the PrepareConfig the images were prepared with
    entries: tuple[dict, ...] = ()  # every image entry, used and skipped, as Prepare wrote it
    source_dir: str = ""
    not_read: dict = field(default_factory=dict)  # other folder entries, counted by reason
    version: int = MANIFEST_VERSION

    # ----- reading and writing ---------------------------------------------------------------
    @classmethod
    def read(cls, paths: ProjectPaths) -> ProjectManifest | None:
        """The project's manifest; None when the project was never prepared."""
        if not os.path.lexists(paths.manifest):
            return None
        try:  # a regular file only: a FIFO put there would block every handler that reads the manifest
            raw = read_json_bounded(paths.manifest, max_bytes=MAX_MANIFEST_BYTES)
        except UnreadableFile as exc:
            raise _unreadable(paths, exc) from exc
        if not isinstance(raw, dict) or not isinstance(raw.get("images", []), list):
            raise _unreadable(paths, "not a manifest")
        return cls(
            settings=raw.get("config") if isinstance(raw.get("config"), dict) else {},
            entries=tuple(e for e in raw.get("images", []) if isinstance(e, dict)),
            source_dir=str(raw.get("source_dir", "")),
            not_read=raw.get("not_read") if isinstance(raw.get("not_read"), dict) else {},
            version=raw.get("version", MANIFEST_VERSION),
        )

    @classmethod
    def read_or_none(cls, paths: ProjectPaths) -> ProjectManifest | None:
        """The manifest, or None when it is missing or unreadable (for views that show what they can)."""
        try:
            return cls.read(paths)
        except UserError:
            return None

    def write(self, paths: ProjectPaths) -> None:
        write_json(
            paths.manifest,
            {
                "version": self.version,
                "source_dir": self.source_dir,
                "config": self.settings,
                "images": list(self.entries),
                "buckets": self.bucket_histogram(),
                "not_read": self.not_read,
            },
        )

    # ----- what readers ask ----------------------------------------------------------------------
    @property
    def trigger(self) -> str:
        return str(self.settings.get("trigger", ""))

    @property
    def resolution(self) -> int:
        value = self.settings.get("resolution")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else DEFAULT_RESOLUTION

    def used_entries(self) -> list[dict]:
        return [e for e in self.entries if e.get("status") == "used"]

    def bucket_histogram(self) -> dict[str, int]:
        return bucket_histogram(self.used_entries())

    def bucket_sizes(self) -> list[int]:
        """Images per bucket, the figure the step plan needs."""
        return list(Counter(str(e.get("bucket")) for e in self.used_entries()).values())

    def prepared_images(self, paths: ProjectPaths) -> list[PreparedImage]:
        """The used images, typed; a malformed entry is an error that says to prepare again."""
        try:
            return [_prepared_image(entry) for entry in self.used_entries()]
        except (KeyError, TypeError, ValueError) as exc:
            raise _unreadable(paths, f"an image entry lacks {exc}") from exc


def bucket_histogram(used: list[dict]) -> dict[str, int]:
    """Used images per bucket, keyed "WIDTHxHEIGHT"."""
    return dict(sorted(Counter(f"{e['bucket'][0]}x{e['bucket'][1]}" for e in used).items()))


def resolution_of(paths: ProjectPaths) -> int:
    """The resolution a project was prepared at (the default before it is prepared or when unreadable)."""
    manifest = ProjectManifest.read_or_none(paths)
    return manifest.resolution if manifest else DEFAULT_RESOLUTION


def _prepared_image(entry: dict) -> PreparedImage:
    crop = entry["crop"]
    bucket = _pair(entry["bucket"])
    return PreparedImage(
        sha256=str(entry["sha256"]),
        image=_file_name(entry["image"]),
        caption_file=_file_name(entry["caption_file"]),
        caption=str(entry.get("caption", "")),
        bucket=bucket,
        original_size=_pair(entry["original_size"]),
        crop_top_left=(int(crop["top"]), int(crop["left"])),
        resized_size=_pair(crop.get("resized") or bucket),
        mask=_file_name(entry["mask"]) if entry.get("mask") else None,
    )


def _pair(value) -> tuple[int, int]:
    first, second = value
    return int(first), int(second)


def _file_name(value) -> str:
    """A plain file name: an edited manifest must not point training outside the project's images/."""
    name = str(value)
    if Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"a plain file name (got {name!r})")
    return name


def _unreadable(paths: ProjectPaths, reason) -> UserError:
    return UserError(
        f"Project {paths.name!r}: {paths.manifest.name} is unreadable ({reason}); run Prepare again to rewrite it."
    )
