"""Aspect-ratio buckets and the resize + crop that fits an image into one, never stretching it."""

from __future__ import annotations

import math
from dataclasses import dataclass

BUCKET_STEP = 64
MAX_ASPECT = 4.0
AREA_TOLERANCE = 0.10


@dataclass(frozen=True)
class Bucket:
    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class Crop:
    bucket: Bucket
    resized_width: int
    resized_height: int
    left: int
    top: int


def make_buckets(resolution: int) -> list[Bucket]:
    """Buckets of about ``resolution``² pixels, sides multiples of 64, aspect at most 4:1."""
    if resolution % BUCKET_STEP:
        raise ValueError(f"resolution must be a multiple of {BUCKET_STEP}, got {resolution}")
    target = resolution * resolution
    buckets = set()
    for width in range(BUCKET_STEP, resolution * 4 + 1, BUCKET_STEP):
        height = (target // width) // BUCKET_STEP * BUCKET_STEP
        if height < BUCKET_STEP:
            continue
        if max(width / height, height / width) > MAX_ASPECT:
            continue
        if abs(width * height - target) / target > AREA_TOLERANCE:
            continue
        buckets.add(Bucket(width, height))
    return sorted(buckets, key=lambda b: b.aspect)


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.aspect) - aspect), -b.width * b.height))


def plan_crop(width: int, height: int, bucket: Bucket) -> Crop:
    """Scale to cover the bucket (keeping the aspect), then centre-crop the overflow."""
    scale = max(bucket.width / width, bucket.height / height)
    resized_width = max(bucket.width, round(width * scale))
    resized_height = max(bucket.height, round(height * scale))
    left = (resized_width - bucket.width) // 2
    top = (resized_height - bucket.height) // 2
    return Crop(bucket, resized_width, resized_height, left, top)


def apply_crop(image, crop: Crop):
    from PIL import Image

    resized = image.resize((crop.resized_width, crop.resized_height), Image.Resampling.LANCZOS)
    return resized.crop((crop.left, crop.top, crop.left + crop.bucket.width, crop.top + crop.bucket.height))
