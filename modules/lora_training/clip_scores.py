"""CLIP scores for judging a LoRA's images: how close they are to the subject's photos, how well they follow
their prompts, and (with an aesthetic head) how good they look.

The CLIP models live in ``models/clip/<name>/``, one folder each, in transformers' layout (``config.json``
with model_type "clip", ``model.safetensors``, the tokenizer files and ``preprocessor_config.json``; for
example a download of ``openai/clip-vit-large-patch14``) or in open_clip's (``open_clip_config.json`` and
``open_clip_model.safetensors``, converted here to transformers' names). Pickle weights (``.bin``, ``.pt``)
are never loaded. An optional ``aesthetic_head.safetensors`` beside the weights holds a LAION-style linear
aesthetic predictor (``weight`` [1, d], ``bias`` [1]) applied to the L2-normalised image embedding.

Nothing here opens a path it has not first ``lstat``-ed: only regular files and folders inside
``models/clip`` (links are followed only when they stay inside it), so a named pipe or a link to elsewhere
is never read.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import torch

from core.errors import UserError
from core.regular_files import UnreadableFile, load_safetensors_bounded, read_bounded

CLIP_FOLDER = "clip"  # models/clip/<name>/
AESTHETIC_HEAD = "aesthetic_head.safetensors"
BATCH_SIZE = 16
DEMO_STAMP = "lora_studio_demo.json"  # model_formats.demo_models stamps its random models with it
OPEN_CLIP_FILES = ("open_clip_config.json", "open_clip_model.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_JSON_BYTES = 4 * 2**20
_MAX_HEAD_BYTES = 64 * 2**20  # an aesthetic head is one linear layer


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _kind(path: Path, *, root: Path) -> int | None:
    """The ``st_mode`` of ``path`` (of its target for a link that stays inside ``root``), None otherwise."""
    try:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            target = path.resolve(strict=True)
            if not _inside(target, root.resolve()):
                return None
            info = os.stat(target)
    except (OSError, RuntimeError):
        return None
    return info.st_mode


def is_regular_file(path: Path, *, root: Path) -> bool:
    mode = _kind(path, root=root)
    return mode is not None and stat.S_ISREG(mode)


def is_folder(path: Path, *, root: Path) -> bool:
    mode = _kind(path, root=root)
    return mode is not None and stat.S_ISDIR(mode)


def read_json_file(path: Path, *, root: Path) -> dict:
    """A small JSON object from a regular file (checked before and after opening)."""
    if not is_regular_file(path, root=root):
        raise UserError(f"{path} is missing or not a regular file.")
    try:
        data = read_bounded(path, max_bytes=_MAX_JSON_BYTES)
    except UnreadableFile as exc:
        if exc.too_large:
            raise UserError(f"{path} does not hold a JSON object (or is larger than 4 MB).") from exc
        raise UserError(f"{path} is missing or not a regular file.") from exc
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}).") from exc
    if not isinstance(value, dict):
        raise UserError(f"{path} does not hold a JSON object (or is larger than 4 MB).")
    return value


def clip_format(folder: Path, *, root: Path) -> str:
    """``"transformers"`` or ``"open_clip"`` for a loadable CLIP folder; UserError saying what to fix otherwise."""
    if not is_folder(folder, root=root) or not _inside(Path(os.path.abspath(folder)), Path(os.path.abspath(root))):
        raise UserError(f"{folder} is not a folder inside {root} (links leaving it are not followed).")
    try:
        _check_transformers_folder(folder, root=root)
    except UserError:
        # Hub downloads of open_clip models often hold both layouts: transformers' is preferred when complete.
        if all(is_regular_file(folder / name, root=root) for name in OPEN_CLIP_FILES):
            return "open_clip"
        raise
    return "transformers"


def _check_transformers_folder(folder: Path, *, root: Path) -> None:
    _refuse_pickle_only(folder, root=root)
    if not is_regular_file(folder / "config.json", root=root):
        raise UserError(
            f"{folder} is not a CLIP model folder: it has neither config.json (transformers) nor "
            "open_clip_config.json with open_clip_model.safetensors (open_clip)."
        )
    model_type = read_json_file(folder / "config.json", root=root).get("model_type")
    if model_type != "clip":
        raise UserError(f"{folder / 'config.json'} is not a CLIP config (model_type {model_type!r}, expected 'clip').")
    if not is_regular_file(folder / "model.safetensors", root=root):
        raise UserError(f"{folder} has no model.safetensors: put the CLIP weights there in safetensors format.")
    if not is_regular_file(folder / "preprocessor_config.json", root=root):
        raise UserError(f"{folder} has no preprocessor_config.json (how CLIP resizes and normalises images).")
    has_json = is_regular_file(folder / "tokenizer.json", root=root)
    if not has_json and not all(is_regular_file(folder / n, root=root) for n in ("vocab.json", "merges.txt")):
        raise UserError(f"{folder} has no tokenizer files (tokenizer.json, or vocab.json and merges.txt).")


def _refuse_pickle_only(folder: Path, *, root: Path) -> None:
    weights = ("model.safetensors", OPEN_CLIP_FILES[1])
    if any(is_regular_file(folder / name, root=root) for name in weights):
        return
    try:
        names = sorted(entry.name for entry in os.scandir(folder))
    except OSError:
        return
    pickles = [name for name in names if name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise UserError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}), which are never loaded (a pickle file can "
            "run code). Convert them to model.safetensors (load them once where you trust them and save the state "
            "dict with safetensors.torch.save_file), then try again."
        )


def is_demo(folder: Path) -> bool:
    return os.path.lexists(folder / DEMO_STAMP)


def _loadable(folder: Path, *, root: Path) -> bool:
    try:
        clip_format(folder, root=root)
    except UserError:
        return False
    return True


def find_clip_folder(models_dir: Path, name: str = "") -> Path | None:
    """``models/clip/<name>`` (UserError with the fix when it is not a loadable CLIP folder); without a name the
    first loadable folder in ``models/clip`` by name, real weights before the random demo; None when there is none.
    """
    root = Path(models_dir) / CLIP_FOLDER
    if name:
        if Path(name).name != name or name in (".", ".."):
            raise UserError(f"CLIP model {name!r} must be the name of a folder in {root}, not a path.")
        if not os.path.lexists(root / name):
            raise UserError(
                f"No CLIP model {name!r} in {root}: put a CLIP folder there (config.json, model.safetensors, the "
                "tokenizer files and preprocessor_config.json, e.g. a download of openai/clip-vit-large-patch14), "
                "or leave the name empty to use the first one found."
            )
        clip_format(root / name, root=root)
        return root / name
    if not os.path.isdir(root):
        return None
    try:
        entries = sorted(os.scandir(root), key=lambda entry: entry.name)
    except OSError:
        return None
    found = [root / e.name for e in entries if not e.name.startswith(".") and _loadable(root / e.name, root=root)]
    real = [folder for folder in found if not is_demo(folder)]
    return (real or found or [None])[0]


def _features(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor in older transformers, an output holding it in ``pooler_output`` now."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _normalised(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.float(), dim=-1).cpu()


class ClipScorer:
    """A CLIP model with its tokenizer and image preprocessing, and the optional aesthetic head."""

    def __init__(self, *, name: str, model, tokenizer, processor, head=None, device: str = "cpu") -> None:
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.head = head  # (weight [1, d], bias [1]) on the CPU, or None
        self.device = device
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self.dim = int(model.config.projection_dim)

    @classmethod
    def load(cls, folder: Path, *, device: str = "cpu") -> ClipScorer:
        folder = Path(folder)
        root = folder.parent
        if clip_format(folder, root=root) == "open_clip":
            from modules.lora_training.clip_open_clip import load_open_clip

            model, tokenizer, processor = load_open_clip(folder, root=root)
        else:
            model, tokenizer, processor = _load_transformers(folder)
        model.to(device).eval()
        head = load_aesthetic_head(folder, root=root, dim=int(model.config.projection_dim))
        return cls(name=folder.name, model=model, tokenizer=tokenizer, processor=processor, head=head, device=device)

    def image_embeddings(self, images: list) -> torch.Tensor:
        """``(n, d)`` float32 L2-normalised image embeddings on the CPU."""
        chunks = [torch.zeros((0, self.dim))]
        for start in range(0, len(images), BATCH_SIZE):
            batch = [image.convert("RGB") for image in images[start : start + BATCH_SIZE]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            dtype = next(self.model.parameters()).dtype
            with torch.no_grad():
                output = self.model.get_image_features(pixel_values=pixels.to(self.device, dtype))
            chunks.append(_normalised(_features(output)))
        return torch.cat(chunks)

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """``(n, d)`` float32 L2-normalised text embeddings on the CPU (texts cut at the model's length)."""
        chunks = [torch.zeros((0, self.dim))]
        for start in range(0, len(texts), BATCH_SIZE):
            batch = list(texts[start : start + BATCH_SIZE])
            tokens = self.tokenizer(
                batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            with torch.no_grad():
                output = self.model.get_text_features(
                    input_ids=tokens["input_ids"].to(self.device),
                    attention_mask=tokens["attention_mask"].to(self.device),
                )
            chunks.append(_normalised(_features(output)))
        return torch.cat(chunks)

    def aesthetic(self, images: list) -> torch.Tensor | None:
        """``(n,)`` float32 aesthetic scores (the head on the normalised image embeddings), None without a head."""
        if self.head is None:
            return None
        weight, bias = self.head
        return self.image_embeddings(images) @ weight[0] + bias[0]


def _load_transformers(folder: Path):
    from transformers import CLIPModel, CLIPTokenizer

    from model_formats.demo_models import clip_image_processor_class

    model = CLIPModel.from_pretrained(str(folder), use_safetensors=True, local_files_only=True, dtype=torch.float32)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    processor = clip_image_processor_class().from_pretrained(str(folder), local_files_only=True)
    return model, tokenizer, processor


def load_aesthetic_head(folder: Path, *, root: Path, dim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``(weight [1, dim], bias [1])`` of ``aesthetic_head.safetensors`` in ``folder``, None when absent."""
    path = folder / AESTHETIC_HEAD
    if not os.path.lexists(path):
        return None
    if not is_regular_file(path, root=root):
        raise UserError(f"{path} is not a regular file; remove it or put the aesthetic head's safetensors file there.")
    try:
        tensors = load_safetensors_bounded(path, max_bytes=_MAX_HEAD_BYTES)
    except UnreadableFile as exc:
        raise UserError(f"{path} is not a readable safetensors file ({exc}).") from exc
    weight, bias = tensors.get("weight"), tensors.get("bias")
    if weight is None or bias is None or tuple(weight.shape) != (1, dim) or tuple(bias.shape) != (1,):
        shapes = {key: list(value.shape) for key, value in tensors.items()}
        raise UserError(
            f"{path} does not fit this CLIP: an aesthetic head needs 'weight' [1, {dim}] and 'bias' [1] (a linear "
            f"layer on the {dim}-wide image embedding), the file holds {shapes}."
        )
    return weight.float(), bias.float()


def _checked_pair(first: torch.Tensor, second: torch.Tensor) -> None:
    if first.ndim != 2 or second.ndim != 2 or first.shape[1] != second.shape[1]:
        raise UserError(f"Embeddings of shapes {list(first.shape)} and {list(second.shape)} cannot be compared.")
    if not len(first) or not len(second):
        raise UserError("There are no images or texts to compare: the score needs at least one of each.")


def subject_similarity(generated: torch.Tensor, references: torch.Tensor) -> float:
    """Mean cosine similarity of every generated image embedding to every reference image embedding."""
    _checked_pair(generated, references)
    return float((_normalised(generated) @ _normalised(references).T).mean())


def prompt_adherence(images: torch.Tensor, texts: torch.Tensor) -> float:
    """Mean cosine similarity of image ``i`` with text ``i`` (paired rows)."""
    _checked_pair(images, texts)
    if len(images) != len(texts):
        raise UserError(f"{len(images)} image(s) and {len(texts)} prompt(s): prompt adherence pairs them one to one.")
    return float((_normalised(images) * _normalised(texts)).sum(dim=-1).mean())
