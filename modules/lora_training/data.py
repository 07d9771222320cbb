"""The prepared set as training batches: buckets never mix, order is a pure function of (seed, epoch).

Batches are global: with N processes each micro-batch of ``batch_size x N`` samples is
split between them (:meth:`BatchStream.share`). Every random draw of a sample (flip,
caption dropout, latent sampling, noise, timestep) comes from its own generator seeded by
(seed, step, micro-batch, the sample's place in the global micro-batch), so

- a run resumed from a checkpoint continues exactly as if it had never stopped, and
- N processes x batch b train the same steps as one process x batch N*b.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import UserError
from modules.lora_training.manifest import ProjectManifest
from modules.lora_training.project import ProjectPaths


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
    mask_path: Path | None = None  # its loss mask (white: learn, black: the background), when it has one


def load_items(paths: ProjectPaths) -> list[TrainItem]:
    """The prepared images and their current captions (as the user may have edited them)."""
    manifest = ProjectManifest.read(paths)
    if manifest is None:
        raise UserError(f"Project {paths.name!r} has no prepared images: run Prepare first.")
    items = []
    for prepared in manifest.prepared_images(paths):
        image_path = paths.images / prepared.image
        caption_path = paths.images / prepared.caption_file
        if not image_path.is_file():
            raise UserError(f"Prepared image {image_path.name} is missing: run Prepare again.")
        caption = caption_path.read_text(encoding="utf-8").strip() if caption_path.is_file() else prepared.caption
        mask_path = paths.images / prepared.mask if prepared.mask else None
        if mask_path is not None and not mask_path.is_file():
            raise UserError(f"The loss mask of {image_path.name} is missing: run Prepare again.")
        items.append(
            TrainItem(
                sha256=prepared.sha256,
                image_path=image_path,
                caption=caption,
                bucket=prepared.bucket,
                original_size=prepared.original_size,
                crop_top_left=prepared.crop_top_left,
                resized_size=prepared.resized_size,
                mask_path=mask_path,
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


def planned_steps(
    bucket_sizes: Iterable[int],
    *,
    batch_size: int,
    repeats: int,
    accumulation: int,
    epochs: int,
    steps: int | None,
    reg_ratio: float = 0.0,
) -> int:
    """Optimizer steps of a run: ``steps`` when set, else the epochs' worth of batches (each batch holds one
    bucket, so every bucket ends with its own partial batch), ``accumulation`` batches per step. Class-image
    batches (``reg_ratio`` of them) come on top: the epochs still see every image as often."""
    if steps:
        return steps
    batches = sum(math.ceil(size * repeats / batch_size) for size in bucket_sizes)
    if reg_ratio:
        return max(1, math.ceil(batches * epochs / (1.0 - reg_ratio) / accumulation))
    return max(1, math.ceil(batches / accumulation * epochs))


def every_tenth(every: int | None, total_steps: int) -> int:
    """A cadence option: ``None`` means about ten times a run; 0 means never."""
    return every if every is not None else max(1, round(total_steps / 10))


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

    def share(self, index: int, *, rank: int, world: int) -> Share:
        """Process ``rank``'s contiguous part of global micro-batch ``index`` (parts differ by one at most)."""
        epoch, batch = self.micro_batch(index)
        size = -(-len(batch) // world)
        positions = list(range(rank * size, min(len(batch), (rank + 1) * size)))
        if not positions:
            # Fewer samples than processes: every process must still run a backward pass for DDP,
            # so this one repeats the first sample with weight 0.
            return Share(epoch=epoch, items=[batch[0]], positions=[0], weight=0.0)
        return Share(epoch=epoch, items=[batch[p] for p in positions], positions=positions, weight=world / len(batch))


class MixedStream:
    """The training images' micro-batches with the class images' (regularization) interleaved: micro-batch
    ``m`` is a class batch when ``floor((m + 1) r + p) > floor(m r + p)``, for ratio ``r`` and a phase ``p``
    drawn from the seed. The class batches are spread evenly, make up ``r`` of any long stretch, and where
    each stream stands at ``m`` is computed without replaying the ones before (exact resume)."""

    def __init__(self, instance: BatchStream, classes: BatchStream | None, *, ratio: float, seed: int) -> None:
        self.instance = instance
        self.classes = classes
        self.ratio = ratio if classes is not None else 0.0
        self.phase = random.Random(f"{seed}-regularization").random()
        self.per_epoch = instance.per_epoch

    def _classes_before(self, index: int) -> int:
        return math.floor(index * self.ratio + self.phase)

    def is_class_batch(self, index: int) -> bool:
        return self._classes_before(index + 1) > self._classes_before(index)

    def share(self, index: int, *, rank: int, world: int) -> Share:
        before = self._classes_before(index)
        if not self.is_class_batch(index):
            return self.instance.share(index - before, rank=rank, world=world)
        share = self.classes.share(before, rank=rank, world=world)
        epoch = (index - before) // self.per_epoch  # the training images' epoch, as the log counts them
        return dataclasses.replace(share, epoch=epoch, prior=True)


@dataclass(frozen=True)
class Share:
    """One process's part of a global micro-batch.

    ``weight`` multiplies the sum of the part's per-sample losses: DDP averages the processes'
    gradients, so world / (global batch size) makes that average the gradient of the global batch's
    mean loss, whatever the split."""

    epoch: int
    items: list[TrainItem]
    positions: list[int]  # each item's place in the global micro-batch: it seeds the item's randomness
    weight: float
    prior: bool = False  # class images (regularization): their loss counts prior_loss_weight times


def step_seed(seed: int, step: int, micro: int = 0, sample: int = 0) -> int:
    digest = hashlib.sha256(f"{seed}/{step}/{micro}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class SampleRandom:
    """Random draws for a batch, one generator per sample: sample ``i`` of a draw of shape (B, ...) comes
    from generator ``i`` alone, so it does not depend on which or how many samples share the batch."""

    def __init__(self, seeds: Sequence[int]) -> None:
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    @classmethod
    def for_step(cls, seed: int, *, step: int, micro: int, positions: Sequence[int]) -> SampleRandom:
        return cls([step_seed(seed, step, micro, position) for position in positions])

    def _per_sample(self, draw, shape: Sequence[int]) -> torch.Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"a batch of {shape[0]} drawn from {len(self.generators)} sample generators")
        return torch.stack([draw(tuple(shape[1:]), generator) for generator in self.generators])

    def randn(self, shape: Sequence[int], *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._per_sample(lambda size, g: torch.randn(size, generator=g, dtype=dtype), shape)

    def rand(self, shape: Sequence[int]) -> torch.Tensor:
        return self._per_sample(lambda size, g: torch.rand(size, generator=g), shape)

    def randint(self, high: int, shape: Sequence[int]) -> torch.Tensor:
        return self._per_sample(lambda size, g: torch.randint(0, high, size, generator=g), shape)
