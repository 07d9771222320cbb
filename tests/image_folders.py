"""Build folders of real and broken image files for preparation tests."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image


def noise_image(width: int, height: int, *, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels, mode=mode) if mode != "RGB" else Image.fromarray(pixels)


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` (a decompression bomb's header), with no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def folder_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def make_messy_folder(folder: Path) -> dict[str, str]:
    """Good images of several aspect ratios plus every kind of bad file. Returns expected skips."""
    folder.mkdir(parents=True, exist_ok=True)
    noise_image(300, 300, seed=1).save(folder / "square.png")
    noise_image(480, 280, seed=2).save(folder / "landscape.jpg", quality=92)
    noise_image(260, 460, seed=3).save(folder / "portrait.webp")
    sub = folder / "more"
    sub.mkdir()
    noise_image(560, 200, seed=4).save(sub / "panorama.png")
    (sub / "panorama.txt").write_text("a wide view of a valley")
    # EXIF orientation 6: stored 360x240, shown rotated to 240x360.
    exif = Image.Exif()
    exif[0x0112] = 6
    (folder / "rotated.jpg").write_bytes(jpeg_bytes(noise_image(360, 240, seed=5), exif=exif))
    noise_image(300, 260, seed=6, mode="RGBA").save(folder / "transparent.png")
    (folder / "print.jpg").write_bytes(jpeg_bytes(noise_image(280, 320, seed=7, mode="CMYK")))
    noise_image(320, 320, seed=10).save(folder / "café 🌅 Soleil.PNG")
    (folder / "portrait.txt").write_text(", ".join(f"detail number {i}" for i in range(40)))

    outside = folder.parent / "outside.png"
    noise_image(300, 300, seed=11).save(outside)
    (folder / "link-out.png").symlink_to(outside)
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "bomb.png").write_bytes(png_header_only(20000, 20000))

    (folder / "truncated.jpg").write_bytes(jpeg_bytes(noise_image(300, 300, seed=8))[:2000])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is a text file, not a photo")
    noise_image(50, 50, seed=9).save(folder / "tiny.png")
    (folder / "zz copy of square.png").write_bytes((folder / "square.png").read_bytes())
    return {
        "truncated.jpg": "corrupt or truncated",
        "empty.png": "empty file",
        "notes.jpg": "not an image",
        "tiny.png": "too small",
        "zz copy of square.png": "duplicate of",
        "link-out.png": "symlink points outside",
        "loop.png": "broken or looping symlink",
        "bomb.png": "too large",
    }


GOOD_SOURCES = {
    "square.png",
    "landscape.jpg",
    "portrait.webp",
    "more/panorama.png",
    "rotated.jpg",
    "transparent.png",
    "print.jpg",
    "café 🌅 Soleil.PNG",
}
