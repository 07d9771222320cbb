"""Decode an image file's bytes into a clean RGB image, or a reason why not; compare images."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import numpy as np

# Larger than any photo a camera takes (~100 MP), far below what exhausts memory.
MAX_PIXELS = 120_000_000
NEUTRAL_BACKGROUND = (128, 128, 128)


@dataclass
class LoadedImage:
    image: object  # PIL.Image.Image, RGB
    sha256: str
    width: int
    height: int
    alpha: object = None  # PIL.Image.Image, mode L: the alpha channel when the file has one that is not all opaque


class RejectedImage(Exception):
    """Why a file cannot be used; the message is the per-file reason shown to the user."""


def eight_bit_grey(image):
    """A 16- or 32-bit integer greyscale image as mode L with its levels scaled (65535 → 255; values that
    all fit in 8 bits are kept as they are); any other image unchanged."""
    from PIL import Image

    if image.mode not in ("I;16", "I;16B", "I;16L", "I"):
        return image
    array = np.asarray(image, dtype=np.int64).clip(0, 65535)
    peak = 65535 if array.max() > 255 else 255
    return Image.fromarray((array * 255 // peak).astype(np.uint8), mode="L")


def _to_rgb(image):
    from PIL import Image

    image = eight_bit_grey(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, NEUTRAL_BACKGROUND)
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def load_image(data: bytes) -> LoadedImage:
    """Decode an image file's bytes fully, apply EXIF orientation, first frame only, convert to RGB."""
    import io

    from PIL import Image, ImageOps, UnidentifiedImageError

    from modules.lora_training.dataset.masks import alpha_mask

    if not data:
        raise RejectedImage("empty file (0 bytes)")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                if opened.width * opened.height > MAX_PIXELS:
                    raise RejectedImage(
                        f"too large ({opened.width}x{opened.height}); possible decompression bomb, "
                        f"limit is {MAX_PIXELS // 1_000_000} megapixels"
                    )
                opened.seek(0)
                opened.load()
                image = ImageOps.exif_transpose(opened)
                alpha = alpha_mask(image)
                image = _to_rgb(image)
    except RejectedImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RejectedImage("too large; possible decompression bomb") from exc
    except UnidentifiedImageError as exc:
        raise RejectedImage("not an image (unrecognised format)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise RejectedImage(f"corrupt or truncated image ({exc})") from exc
    digest = hashlib.sha256(data).hexdigest()
    return LoadedImage(image=image, sha256=digest, width=image.width, height=image.height, alpha=alpha)


def difference_hash(image, *, size: int = 8) -> int:
    """A 64-bit perceptual hash: nearby images differ in few bits."""
    gray = np.asarray(image.convert("L").resize((size + 1, size)), dtype=np.int16)
    bits = (gray[:, 1:] > gray[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def brightness_and_spread(image) -> tuple[float, float]:
    """Mean and standard deviation of the luminance (0-255), on a small copy."""
    gray = np.asarray(image.convert("L").resize((64, 64)), dtype=np.float32)
    return float(gray.mean()), float(gray.std())
