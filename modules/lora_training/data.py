"""The prepared set as training batches: buckets never mix, order is a pure function of (seed, epoch).

Because the order, noise and dropout of every step derive from the seed and the step
number alone, a run resumed from a checkpoint continues exactly as if it had never
stopped.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from modules.lora_training.project import ProjectPaths, read_json


@dataclass(frozen=True)
class TrainItem:
    sha256: str
    image_path: Path
    caption: str
    bucket: tuple[int, int]  # width, height
    original_size: tuple[int, int]  # width, height of the source after EXIF rotation
    crop_top_left: tuple[int, int]  # top, left in the resized image
    resized_size: tuple[int, int] = (0, 0)  # width, height of the image the crop was cut from
    flipped: bool = False  # mirrored for this step (random horizontal flip)


def load_items(paths: ProjectPaths) -> list[TrainItem]:
    """The prepared images and their current captions (as the user may have edited them)."""
    manifest = read_json(paths.manifest)
    if not manifest:
        raise UserError(f"Project {paths.name!r} has no prepared images: run Prepare first.")
    items = []
    for entry in manifest["images"]:
        if entry.get("status") != "used":
            continue
        image_path = paths.images / entry["image"]
        caption_path = paths.images / entry["caption_file"]
        if not image_path.is_file():
            raise UserError(f"Prepared image {image_path.name} is missing: run Prepare again.")
        caption = caption_path.read_text(encoding="utf-8").strip() if caption_path.is_file() else entry["caption"]
        items.append(
            TrainItem(
                sha256=entry["sha256"],
                image_path=image_path,
                caption=caption,
                bucket=tuple(entry["bucket"]),
                original_size=tuple(entry["original_size"]),
                crop_top_left=(entry["crop"]["top"], entry["crop"]["left"]),
                resized_size=tuple(entry["crop"].get("resized") or entry["bucket"]),
            )
        )
    if not items:
        raise UserError(f"Project {paths.name!r} has no usable images: run Prepare on a folder with photos.")
    return items


def epoch_batches(
    items: list[TrainItem], *, batch_size: int, repeats: int, seed: int, epoch: int, shuffle: bool
) -> list[list[int]]:
    """Batches of item indices for one epoch; each batch holds one bucket only."""
    rng = random.Random(f"{seed}-{epoch}")
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, item in enumerate(items):
        by_bucket.setdefault(item.bucket, []).extend([index] * repeats)
    batches = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        if shuffle:
            rng.shuffle(indices)
        batches += [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


class BatchStream:
    """Micro-batch ``m`` of the whole run, computable without replaying the ones before it."""

    def __init__(self, items: list[TrainItem], *, batch_size: int, repeats: int, seed: int, shuffle: bool) -> None:
        self.items = items
        self.batch_size = batch_size
        self.repeats = repeats
        self.seed = seed
        self.shuffle = shuffle
        self._plan: tuple[int, list[list[int]]] | None = None
        self.per_epoch = len(self._epoch(0))

    def _epoch(self, epoch: int) -> list[list[int]]:
        # Steps walk an epoch in order: keep its plan instead of reshuffling at every step.
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, self._make_epoch(epoch))
        return self._plan[1]

    def _make_epoch(self, epoch: int) -> list[list[int]]:
        return epoch_batches(
            self.items,
            batch_size=self.batch_size,
            repeats=self.repeats,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
        )

    def micro_batch(self, index: int) -> tuple[int, list[TrainItem]]:
        epoch, position = divmod(index, self.per_epoch)
        return epoch, [self.items[i] for i in self._epoch(epoch)[position]]


def step_seed(seed: int, step: int, micro: int = 0, rank: int = 0) -> int:
    digest = hashlib.sha256(f"{seed}/{step}/{micro}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
