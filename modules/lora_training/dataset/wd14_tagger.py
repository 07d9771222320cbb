"""A WD14 tagger (SmilingWolf's wd-v1-4 / v3 SwinV2, ConvNeXt, ViT, EVA02 taggers) run with onnxruntime.

A tagger folder holds the files these taggers are published with: ``model.onnx`` (NHWC float input,
one sigmoid score per tag) and ``selected_tags.csv`` (``tag_id,name,category,count``; category 9 is a
rating, 0 a general tag, 4 a character). Images are prepared as the taggers were trained: alpha
composited on white, padded to a square on white (centred), resized with bicubic filtering to the
model's input size (read from the model), channels in BGR order, float32 values 0..255 without
normalisation. :class:`TagSettings` turns the scores into a caption: thresholds, a cap, exclusions,
tags always included, the rating tag, underscores and brackets.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from modules.lora_training.dataset.captions import plain_tag

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
RATING, GENERAL, CHARACTER = 9, 0, 4
MAX_TAGS_CSV_BYTES = 32 * 1024 * 1024
# Tags that are faces drawn with underscores: they keep them when underscores become spaces.
KAOMOJIS = frozenset(
    ("0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@", "^_^")
    + ("o_o", "u_u", "x_x", "|_|", "||_||")
)


@dataclass(frozen=True)
class TagSettings:
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    max_tags: int = 0  # 0: no cap; else the highest-scoring general and character tags
    rating: bool = False
    underscores_to_spaces: bool = True
    escape_brackets: bool = True
    exclude: tuple[str, ...] = ()
    include: tuple[str, ...] = ()


def format_tag(name: str, settings: TagSettings) -> str:
    if settings.underscores_to_spaces and name not in KAOMOJIS:
        name = name.replace("_", " ")
    if settings.escape_brackets:
        name = re.sub(r"(?<!\\)([()])", r"\\\1", name)
    return name


@dataclass(frozen=True)
class TagTable:
    names: tuple[str, ...]
    categories: tuple[int, ...]


def _parse_tags_csv(text: str) -> TagTable:
    rows = csv.DictReader(io.StringIO(text))
    if not rows.fieldnames or not {"name", "category"} <= {f.strip() for f in rows.fieldnames}:
        raise ValueError("the header needs the columns name and category")
    names, categories = [], []
    for number, row in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if not row["name"] or not row["category"].lstrip("-").isdigit():
            raise ValueError(f"line {number} has no name or a category that is not a whole number")
        names.append(row["name"])
        categories.append(int(row["category"]))
    if not names:
        raise ValueError("it lists no tag")
    return TagTable(names=tuple(names), categories=tuple(categories))


def read_tags_csv(path: Path) -> TagTable:
    """``selected_tags.csv`` → the tag names and categories, in the model's output order."""
    from model_formats.safetensors_header import require_regular_file

    require_regular_file(path)
    if path.stat().st_size > MAX_TAGS_CSV_BYTES:
        raise UserError(f"{path} is larger than {MAX_TAGS_CSV_BYTES // 2**20} MB: it is not a tag list.")
    try:
        return _parse_tags_csv(path.read_bytes().decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path} does not parse as a tagger's tag list (tag_id,name,category,count): {exc}") from exc


def _on_white(image):
    """RGB, transparent parts composited on white."""
    from PIL import Image

    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if "transparency" in image.info or image.mode in ("LA", "PA") else "RGB")
    if image.mode == "RGBA":
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        canvas.alpha_composite(image)
        image = canvas.convert("RGB")
    return image


def preprocess(image, size: int):
    """One PIL image → the tagger's input (``size`` x ``size`` x 3, BGR, float32 0..255)."""
    import numpy as np
    from PIL import Image

    image = _on_white(image)
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.BICUBIC)
    return np.ascontiguousarray(np.asarray(square, dtype=np.float32)[:, :, ::-1])


def _kept(indices, scores, table: TagTable, excluded: set[str]) -> list[int]:
    return [i for i in indices if plain_tag(table.names[i]) not in excluded and math.isfinite(scores[i])]


def select_tags(scores, table: TagTable, settings: TagSettings) -> list[str]:
    """One image's scores → its tags: always-included, then characters, then general tags (each by score,
    highest first; the cap keeps the highest-scoring of both), then the rating when asked."""
    excluded = {plain_tag(tag) for tag in settings.exclude}
    by_category = {c: [i for i, cat in enumerate(table.categories) if cat == c] for c in (RATING, GENERAL, CHARACTER)}
    found = [i for i in by_category[CHARACTER] if scores[i] > settings.character_threshold]
    found += [i for i in by_category[GENERAL] if scores[i] > settings.general_threshold]
    found = sorted(_kept(found, scores, table, excluded), key=lambda i: -scores[i])
    if settings.max_tags:
        found = found[: settings.max_tags]
    found.sort(key=lambda i: (table.categories[i] != CHARACTER, -scores[i]))
    names = [*settings.include, *(table.names[i] for i in found)]
    ratings = _kept(by_category[RATING], scores, table, excluded)
    if settings.rating and ratings:
        names.append(table.names[max(ratings, key=lambda i: scores[i])])
    tags, seen = [], set()
    for name in names:
        if plain_tag(name) not in seen:
            seen.add(plain_tag(name))
            tags.append(format_tag(name, settings))
    return tags


def _never() -> bool:
    return False


def _session(model_path: Path, device: str):
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the CUDA provider's notices are not the user's business
    try:
        return ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for a damaged file
        raise UserError(f"{model_path} is not a readable ONNX model: {str(exc)[:300]}") from exc


def _input_size(session, model_path: Path) -> int:
    shape = session.get_inputs()[0].shape
    if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
        raise UserError(f"{model_path} does not take square NHWC colour images (input shape {shape}).")
    return shape[1]


class WD14Tagger:
    """A WD14 tagger folder behind the Captioner interface: ``caption`` returns one comma-separated tag
    list per image; ``scores`` the raw sigmoid scores (images x tags)."""

    name = "tags"

    def __init__(
        self, folder: str | Path, *, settings: TagSettings, device: str | None = None, batch_size: int = 8
    ) -> None:
        from model_formats.safetensors_header import require_regular_file

        folder = Path(folder)
        if not (folder / MODEL_FILE).exists() or not (folder / TAGS_FILE).exists():
            raise UserError(
                f"WD14 tagger not found at {folder}: a tagger folder holds {MODEL_FILE} and {TAGS_FILE} "
                "(e.g. a download of SmilingWolf/wd-swinv2-tagger-v3 in models/captioners/)."
            )
        require_regular_file(folder / MODEL_FILE)
        self.table = read_tags_csv(folder / TAGS_FILE)
        self.settings = settings
        self.batch_size = batch_size
        self.device = device or _default_device()
        self.session = _session(folder / MODEL_FILE, self.device)
        self.size = _input_size(self.session, folder / MODEL_FILE)
        outputs = self.session.get_outputs()[0].shape
        if isinstance(outputs[-1], int) and outputs[-1] != len(self.table.names):
            raise UserError(
                f"{folder / MODEL_FILE} scores {outputs[-1]} tags but {TAGS_FILE} lists {len(self.table.names)}."
            )

    def scores(self, images: list):
        import numpy as np

        batch = np.stack([preprocess(image, self.size) for image in images])
        name = self.session.get_inputs()[0].name
        return np.asarray(self.session.run(None, {name: batch})[0], dtype=np.float64)

    def caption(self, images: list, *, should_stop: Callable[[], bool] = _never) -> list[str]:
        captions: list[str] = []
        for start in range(0, len(images), self.batch_size):
            if should_stop():
                break
            for row in self.scores(images[start : start + self.batch_size]):
                captions.append(", ".join(select_tags(row, self.table, self.settings)))
        return captions

    def close(self) -> None:
        self.session = None


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def is_tagger_folder(folder: Path) -> bool:
    return (folder / MODEL_FILE).is_file() and (folder / TAGS_FILE).is_file()


def resolve_tagger_folder(value: str | None, models_dir: Path, *, demo_name: str = "") -> Path:
    """The tagger folder ``value`` names (a path, or a folder of ``models/captioners/``); without one, the
    first tagger folder there, a real one before the demo (``demo_name``)."""
    captioners = Path(models_dir) / "captioners"
    if value:
        for candidate in (Path(value), captioners / value):
            if candidate.is_dir():
                return candidate
        raise UserError(f"WD14 tagger {value!r} not found: put its folder ({MODEL_FILE}, {TAGS_FILE}) in {captioners}.")
    found = sorted(p for p in captioners.glob("*") if p.is_dir() and is_tagger_folder(p)) if captioners.is_dir() else []
    found.sort(key=lambda p: p.name == demo_name)
    if not found:
        raise UserError(
            f"No WD14 tagger in {captioners}: put one there (a folder with {MODEL_FILE} and {TAGS_FILE}, "
            "e.g. SmilingWolf/wd-swinv2-tagger-v3), or choose another captioner."
        )
    return found[0]
