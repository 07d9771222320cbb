"""Loss masks: what part of an image to learn (white) and what to learn only a little (black).

A mask comes from ``<name>.mask.png`` beside the photo (greyscale, 8 or 16 bits, the photo's size after EXIF
rotation; a mask with an alpha channel counts as shown over black: grey x alpha) or else from the photo's
alpha channel. It is read like a photo (regular files only, size
limits), cropped exactly as its photo (the same bucket resize and crop) and stored beside the crop in
the project's ``images/`` as ``<crop name>.mask.png``. A mask that cannot be used is skipped with a
note: the photo is still used, without a mask. Sources are only read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from modules.lora_training.dataset.images import MAX_PIXELS

MASK_SUFFIX = ".mask.png"
PREVIEW_DIM = 0.3  # the overlay keeps this share of the brightness where the mask is 0


def is_mask_name(name: str) -> bool:
    return name.lower().endswith(MASK_SUFFIX)


def mask_beside(image: Path) -> Path:
    """``photo.jpg`` → ``photo.mask.png`` in the same folder."""
    return image.with_name(image.stem + MASK_SUFFIX)


def alpha_mask(image):
    """The alpha channel of a decoded image (mode L), or None when it has none or is fully opaque."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode not in ("RGBA", "LA", "PA"):
        return None
    alpha = image.convert("RGBA").getchannel("A")
    return None if alpha.getextrema()[0] == 255 else alpha


def read_mask_beside(image: Path, *, folder: Path, max_bytes: int, size: tuple[int, int]):
    """The mask file beside ``image`` as a mode-L image of ``size``, or None; and a note when one was refused."""
    from modules.lora_training.dataset.scan import RejectedFile, read_regular_file

    candidate = mask_beside(image)
    if not os.path.lexists(candidate):
        return None, ""
    try:
        mask = _decode_mask(read_regular_file(candidate, folder=folder, max_bytes=max_bytes))
    except RejectedFile as exc:
        return None, f"mask {candidate.name} ignored: {exc}"
    if mask.size != tuple(size):
        return None, (
            f"mask {candidate.name} ignored: it is {mask.width}x{mask.height}, the image {size[0]}x{size[1]} "
            "(a mask must have the image's size)"
        )
    return mask, ""


def _decode_mask(data: bytes):
    import io
    import warnings

    from PIL import Image, ImageOps

    from modules.lora_training.dataset.scan import RejectedFile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                if opened.width * opened.height > MAX_PIXELS:
                    raise RejectedFile(f"too large ({opened.width}x{opened.height})")
                opened.load()
                return _mask_levels(ImageOps.exif_transpose(opened))
    except RejectedFile:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RejectedFile(f"not a readable image ({exc})") from exc


def _mask_levels(image):
    """The mask's grey levels (mode L): 16-bit greys scaled as photos' are; a mask with transparency counts
    as shown over black (grey x alpha: a transparent part is not learned, an opaque one by its grey)."""
    from PIL import ImageChops

    from modules.lora_training.dataset.images import eight_bit_grey

    alpha = alpha_mask(image)
    grey = eight_bit_grey(image).convert("L")
    return grey if alpha is None else ImageChops.multiply(grey, alpha)


def mask_weights(path: Path, *, size: tuple[int, int], flip: bool, floor: float):
    """A stored mask as loss weights (1, 1, H, W) at ``size`` (height, width): ``floor`` where it is black,
    1 where it is white; averaged over each latent pixel's area."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    with Image.open(path) as opened:
        array = np.asarray(opened.convert("L"), dtype=np.float32) / 255.0
    mask = torch.from_numpy(array)[None, None]
    if flip:
        mask = mask.flip(-1)
    mask = F.interpolate(mask, size=tuple(size), mode="area")
    return floor + (1.0 - floor) * mask


def overlay_preview(image_path: Path, mask_path: Path):
    """The crop with its masked-out part darkened: what the gallery shows for a masked image."""
    from PIL import Image

    with Image.open(image_path) as image, Image.open(mask_path) as mask:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
        weight = np.asarray(mask.convert("L"), dtype=np.float32)[..., None] / 255.0
    shown = rgb * (PREVIEW_DIM + (1.0 - PREVIEW_DIM) * weight)
    return Image.fromarray(shown.round().astype(np.uint8), mode="RGB")


def gallery_image(image_path: Path, mask_path: Path | None, *, previews: Path) -> Path:
    """What the prepared gallery shows for a crop: the crop itself, or for a masked one its overlay, kept
    in ``previews`` under the crop's own name (made again when the mask is newer)."""
    from core.atomic import atomic_path

    if mask_path is None or not mask_path.is_file():
        return image_path
    preview = previews / image_path.name
    newest = max(image_path.stat().st_mtime, mask_path.stat().st_mtime)
    if not preview.is_file() or preview.stat().st_mtime < newest:
        with atomic_path(preview) as tmp:
            overlay_preview(image_path, mask_path).save(tmp, format="PNG")
    return preview
