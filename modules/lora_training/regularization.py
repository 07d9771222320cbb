"""Regularization (prior-preservation) images: pictures of the subject's class, trained on beside the subject
so the LoRA does not turn every "dog" into the user's dog.

They come from a folder the user names (inside the app's IMAGE_ROOTS, like photos; read like photos:
regular image files only, within the size limits; each cropped to its nearest bucket, the crop kept under
the sha256 of the file's bytes and the resolution so a rerun reads the bytes but decodes nothing), or the base model renders them from the class prompt
before the LoRA exists. Both are kept under ``<projects>/.class_images/``: rendered sets in a folder
keyed by the model, the prompt, the count, the size and the sampling steps, so a second run (of any
project) with the same settings reuses them; a stopped rendering keeps the images already made.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from core.atomic import atomic_path, write_text_atomic
from core.errors import UserError
from core.regular_files import UnreadableFile, read_json_bounded
from modules.lora_training.data import TrainItem
from modules.lora_training.dataset.scan import never_stop
from modules.lora_training.events import EventSink, Log, PrepProgress

STORE = ".class_images"

MAX_RECORD_BYTES = 64 * 1024  # one crop record


def class_store(projects_dir: Path) -> Path:
    return Path(projects_dir) / STORE


def _item(path: Path, *, sha256: str, caption: str, size: tuple[int, int], crop=None) -> TrainItem:
    original, top_left, resized = crop or (size, (0, 0), size)
    return TrainItem(
        sha256=sha256,
        image_path=path,
        caption=caption,
        bucket=size,
        original_size=original,
        crop_top_left=top_left,
        resized_size=resized,
    )


def class_image_folder(reg_images_dir: str, *, roots: Iterable[Path] | None) -> Path:
    """The folder of class images a run reads, resolved (``~`` expanded, symlinks followed): inside ``roots``
    when given (the app's IMAGE_ROOTS, for runs started by the app and its sweeps), existing, a folder."""
    from modules.lora_training.dataset.scan import image_folder

    return image_folder(reg_images_dir, roots=roots)


def _cache_record(store: Path, *, sha256: str, resolution: int) -> Path:
    # The crop's geometry follows from the file's bytes and the resolution: both name the record.
    return store / f"{sha256}-r{resolution}.json"


def _cached_item(record: Path, *, sha256: str, caption: str) -> TrainItem | None:
    """The item a previous run cropped from these bytes at this resolution, when its record and crop are intact."""
    try:
        saved = read_json_bounded(record, max_bytes=MAX_RECORD_BYTES)
        name = str(saved["crop"])
        geometry = tuple(tuple(int(v) for v in saved[key]) for key in ("original", "top_left", "resized"))
        size = tuple(int(v) for v in saved["bucket"])
    except (UnreadableFile, KeyError, TypeError, ValueError):
        return None
    path = record.parent / name
    if Path(name).name != name or not path.is_file() or len(size) != 2 or any(len(pair) != 2 for pair in geometry):
        return None
    return _item(path, sha256=sha256, caption=caption, size=size, crop=geometry)


def _crop_and_keep(data: bytes, *, store: Path, resolution: int, caption: str) -> TrainItem:
    """Decode, crop to the nearest bucket, keep the crop and its record in ``store``."""
    from modules.lora_training.dataset.buckets import apply_crop, make_buckets, nearest_bucket, plan_crop
    from modules.lora_training.dataset.images import load_image

    loaded = load_image(data)
    crop = plan_crop(loaded.width, loaded.height, nearest_bucket(loaded.width, loaded.height, make_buckets(resolution)))
    size = (crop.bucket.width, crop.bucket.height)
    path = store / f"{loaded.sha256[:20]}-{size[0]}x{size[1]}.png"
    if not path.is_file():
        with atomic_path(path) as tmp:
            apply_crop(loaded.image, crop).save(tmp, format="PNG")
    geometry = ((loaded.width, loaded.height), (crop.top, crop.left), (crop.resized_width, crop.resized_height))
    record = {
        "crop": path.name,
        "bucket": size,
        **dict(zip(("original", "top_left", "resized"), geometry, strict=True)),
    }
    write_text_atomic(_cache_record(store, sha256=loaded.sha256, resolution=resolution), json.dumps(record))
    return _item(path, sha256=loaded.sha256, caption=caption, size=size, crop=geometry)


def folder_class_images(
    folder: Path,
    *,
    store: Path,
    caption: str,
    resolution: int,
    max_image_bytes: int,
    on_event: EventSink,
    should_stop: Callable[[], bool] = never_stop,
) -> list[TrainItem]:
    """The folder's images cropped to their buckets (kept in ``store``), captioned ``caption``. A file cropped
    before (the same bytes, the same resolution) is not decoded again. ``should_stop`` is asked before each
    file: a Stop returns the images read so far."""
    from modules.lora_training.dataset.images import RejectedImage
    from modules.lora_training.dataset.scan import RejectedFile, StopRequested, read_regular_file, scan_folder

    folder = Path(folder).expanduser()
    try:
        found = scan_folder(folder, should_stop=should_stop)
    except StopRequested:
        return []
    items, skipped = [], len(found.refused)
    for index, source in enumerate(found.files):
        if should_stop():
            return items
        try:
            data = read_regular_file(source.path, folder=folder.resolve(), max_bytes=max_image_bytes)
            digest = hashlib.sha256(data).hexdigest()
            record = _cache_record(store, sha256=digest, resolution=resolution)
            item = _cached_item(record, sha256=digest, caption=caption)
            items.append(item or _crop_and_keep(data, store=store, resolution=resolution, caption=caption))
        except (RejectedFile, RejectedImage):
            skipped += 1
        on_event(PrepProgress(stage="class_images", done=index + 1, total=len(found.files)))
    if skipped:
        on_event(Log(f"Class images: {skipped} file(s) of {folder} skipped (not readable images)", level="warning"))
    if not items:
        raise UserError(f"The class image folder {folder} holds no usable image: add some, or leave it empty.")
    return items


def rendered_set(store: Path, *, model_key: str, prompt: str, count: int, size: tuple[int, int], steps: int) -> Path:
    """The folder of a rendered set: one per model, prompt, count, size and sampling steps."""
    key = hashlib.sha256(json.dumps([model_key, prompt, count, list(size), steps]).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:40] or "class"
    return store / f"{slug}-{size[0]}x{size[1]}-{count}-{key}"


def render_class_images(
    family,
    *,
    folder: Path,
    prompt: str,
    count: int,
    size: tuple[int, int],
    steps: int,
    seed: int,
    on_event: EventSink,
    should_stop: Callable[[], bool],
) -> int:
    """Render the images of ``folder`` that are missing (the base model, no LoRA yet); returns how many."""
    import torch

    from modules.lora_training.samples import render_image

    missing = [index for index in range(count) if not (folder / f"{index:05d}.png").is_file()]
    if not missing:
        return 0
    family.place_encoders(family.device)
    family.place_denoiser()
    with torch.no_grad():
        text = family.encode_text([prompt])
    on_event(Log(f"Rendering {len(missing)} class image(s) of {prompt!r} with the base model (kept for reuse)"))
    for done, index in enumerate(missing):
        image = render_image(family, text=text, seed=seed + index, size=size, steps=steps, should_stop=should_stop)
        if image is None:
            break  # stopped: the images made so far are kept, a resumed run renders the rest
        with atomic_path(folder / f"{index:05d}.png") as tmp:
            image.save(tmp, format="PNG")
        on_event(PrepProgress(stage="class_images", done=done + 1, total=len(missing)))
    return len(missing)


def rendered_items(folder: Path, *, count: int, caption: str, size: tuple[int, int]) -> list[TrainItem]:
    """The rendered images present in ``folder`` (all of them unless a Stop cut the rendering short)."""
    items = []
    for index in range(count):
        path = folder / f"{index:05d}.png"
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            items.append(_item(path, sha256=digest, caption=caption, size=size))
    return items
