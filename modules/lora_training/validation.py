"""Held-out validation: is the LoRA learning the subject, or only the training photos?

A stable share of the prepared images (chosen by content hash, so the same photos stay out across
runs and resumes) is kept out of training. At the start of a fresh run, at every checkpoint and at
the end, the denoising loss is measured on them and on as many training images, at fixed noise
levels with fixed noise per image: the same LoRA always gives the same numbers, the first figure
is the base model's (LoRA starts as a no-op), and the gap between the two shows overfitting.
``evaluation.json`` in the run's folder keeps the figures and the best checkpoint. A set too small
to hold images out (under 5) trains on every image and is not measured.

The figures measure what a run saves: with EMA saved as the main weights (``ema_weights`` "ema") the
averaged weights, else the trained ones; with masked loss on, each image's pixels weighted by its mask as
training weighs them, scaled to a mean weight of 1 (so "save best" and a sweep rank what the LoRA learns
where it is asked to, and a lower mask floor does not lower the figure by itself).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.atomic import write_text_atomic
from core.regular_files import UnreadableFile, read_json_bounded

NOISE_LEVELS = (0.25, 0.5, 0.75)  # fractions of the schedule (mid-range: where a subject is learned)
MIN_IMAGES_FOR_A_SPLIT = 5  # below this every photo trains; the training-image figure still shows
MAX_EVALUATION_BYTES = 64 * 2**20
MAX_PROBE_IMAGES = 8  # training images measured beside the held-out ones (bounds the cost)
# How the best checkpoint is chosen: the user picks the rule (evaluate --best-rule, the tab, the API).
BEST_RULES = {
    "validation_loss": "lowest validation loss",
    "subject_similarity": "highest CLIP subject similarity, prompt adherence within the margin of the base model's",
}
DEFAULT_RULE = "validation_loss"
DEFAULT_MARGIN = 0.02  # CLIP cosine units: how much prompt adherence a checkpoint may lose against the base


def _rank(item) -> str:
    return hashlib.sha256(f"validation:{item.sha256}".encode()).hexdigest()


def split_validation(items: list, share: float) -> tuple[list, list]:
    """(training items, held-out items): ``share`` of them (at least one), none below 5 images or at 0."""
    if share <= 0 or len(items) < MIN_IMAGES_FOR_A_SPLIT:
        return list(items), []
    count = min(len(items) - 1, max(1, round(share * len(items))))
    held = {id(item) for item in sorted(items, key=_rank)[:count]}
    return [i for i in items if id(i) not in held], [i for i in items if id(i) in held]


def training_probe(items: list, *, count: int) -> list:
    """A stable subset of the training images, as many as are held out (up to 8)."""
    return sorted(items, key=_rank)[: min(count, MAX_PROBE_IMAGES)]


def validation_weights(item, *, size: tuple[int, int], config) -> torch.Tensor | None:
    """How validation weighs ``item``'s latent pixels (1, 1, h, w): as training does with masked loss on and a
    mask prepared (the floor outside it), scaled to a mean of 1 so the figure stays a mean error per pixel
    (a lower floor does not lower it by itself); None otherwise (every pixel counts alike)."""
    if not config.masked_loss or item.mask_path is None:
        return None
    from modules.lora_training.dataset.masks import mask_weights

    weights = mask_weights(item.mask_path, size=tuple(size), flip=False, floor=config.mask_floor)
    mean = float(weights.mean())
    return weights / mean if mean > 0 else weights  # all black at floor 0: nothing to learn, as in training


def _noise_for(item, shape: tuple[int, ...], level: int) -> torch.Tensor:
    seed = int(hashlib.sha256(f"{item.sha256}:{level}".encode()).hexdigest()[:15], 16)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def fixed_noise_loss(
    family, items: list, *, inputs: Callable, config, should_stop: Callable[[], bool] = lambda: False
) -> float | None:
    """Mean denoising loss over ``items`` × :data:`NOISE_LEVELS`; ``inputs(item)`` gives the item's
    (unscaled latent mean, text embeddings) on the training device. Plain MSE (no min-SNR weights), each
    pixel weighted by :func:`validation_weights` (masked loss).
    Each image's noise levels go through the model as one batch. None when ``should_stop`` turned true
    on the way (checked between images)."""
    import dataclasses

    plain = dataclasses.replace(config, min_snr_gamma=0.0)
    levels = len(NOISE_LEVELS)
    losses = []
    for item in items:
        if should_stop():
            return None
        mean, text = inputs(item)
        latents = family.scale_latents(mean).expand(levels, *mean.shape[1:])
        noise = torch.cat([_noise_for(item, tuple(mean.shape), level) for level in range(levels)])
        weights = validation_weights(item, size=tuple(latents.shape[-2:]), config=config)
        loss = family.training_loss(
            latents=latents,
            text={key: value.expand(levels, *value.shape[1:]) for key, value in text.items()},
            items=[item] * levels,
            generator=None,  # noise and timesteps are given
            config=plain,
            fixed_t=torch.tensor(NOISE_LEVELS),
            noise=noise.to(latents.device, latents.dtype),
            loss_weights=None if weights is None else weights.expand(levels, -1, -1, -1).to(latents.device),
        )
        losses.append(float(loss.float().mean()))
    return sum(losses) / len(losses)


def describe_figures(step: int, *, validation_loss: float, training_images_loss: float) -> str:
    """The run log's line: "Validation at step 40: held-out images 0.1234, training images 0.1100"."""
    base = " (the base model: LoRA not trained yet)" if step == 0 else ""
    return (
        f"Validation at step {step}{base}: held-out images {validation_loss:.4f}, "
        f"training images {training_images_loss:.4f}"
    )


@dataclass
class Evaluation:
    """The figures of one run, as ``evaluation.json`` holds them. ``clip`` describes the CLIP figures when they
    were measured (model, prompts, seed, the base model's raw figures); ``grid`` names the comparison grid."""

    validation_images: list[str] = field(default_factory=list)
    training_images: list[str] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)  # step, validation_loss, training_images_loss, checkpoint
    rule: str = DEFAULT_RULE
    margin: float = DEFAULT_MARGIN
    clip: dict | None = None
    grid: str | None = None

    @classmethod
    def read(cls, path: Path, *, up_to_step: int) -> Evaluation:
        """The run's figures up to ``up_to_step`` (a resumed run drops what came after its checkpoint)."""
        try:
            # files of earlier versions hold NaN figures as NaN: read, then cleaned
            raw = read_json_bounded(path, max_bytes=MAX_EVALUATION_BYTES, allow_nan=True)
            records = [_clean(r) for r in raw.get("records", []) if _is_record(r) and r["step"] <= up_to_step]
            evaluation = cls(raw.get("validation_images", []), raw.get("training_images", []), records)
        except (UnreadableFile, AttributeError, TypeError):
            return cls()
        evaluation.choose(raw.get("rule_id", DEFAULT_RULE), raw.get("margin", DEFAULT_MARGIN), strict=False)
        evaluation.clip = raw.get("clip") if isinstance(raw.get("clip"), dict) else None
        evaluation.grid = raw.get("grid") if isinstance(raw.get("grid"), str) else None
        return evaluation

    def choose(self, rule: str, margin: float, *, strict: bool = True) -> None:
        """Set the best-checkpoint rule; a rule or margin out of range is refused (``strict``) or ignored."""
        good_margin = isinstance(margin, (int, float)) and not isinstance(margin, bool) and 0 <= margin <= 1
        if rule not in BEST_RULES or not good_margin:
            if strict:
                from core.errors import UserError

                raise UserError(
                    f"best rule must be one of {', '.join(BEST_RULES)} and margin a number from 0 to 1; "
                    f"got {rule!r} and {margin!r}"
                )
            return
        self.rule, self.margin = rule, float(margin)

    def add(self, record: dict) -> None:
        """Keep ``record`` (a figure that came out NaN or infinite, e.g. an fp16 overflow, is kept as None)."""
        record = _clean(record)
        others = [r for r in self.records if r["step"] != record["step"]]
        self.records = sorted([*others, record], key=lambda r: r["step"])

    def best(self) -> dict | None:
        """The checkpointed record the rule picks; None when no record has the figures it needs."""
        candidates = [r for r in self.records if r.get("checkpoint")]
        if self.rule == "subject_similarity":
            base = (self.clip or {}).get("base_prompt_adherence", 0.0)
            floor = (base if _finite(base) else 0.0) - self.margin
            kept = [
                r for r in candidates if _finite(r.get("subject_similarity")) and _finite(r.get("prompt_adherence"))
            ]
            kept = [r for r in kept if r["prompt_adherence"] >= floor]
            return max(kept, key=lambda r: (r["subject_similarity"], r["step"])) if kept else None
        # min/max keep a NaN that comes first: only finite figures compete
        candidates = [r for r in candidates if _finite(r.get("validation_loss"))]
        return min(candidates, key=lambda r: (r["validation_loss"], -r["step"])) if candidates else None

    def write(self, path: Path) -> None:
        document = {
            "rule": BEST_RULES[self.rule],
            "rule_id": self.rule,
            "margin": self.margin,
            "noise_levels": list(NOISE_LEVELS),
            "validation_images": self.validation_images,
            "training_images": self.training_images,
            "clip": self.clip,
            "grid": self.grid,
            "records": self.records,
            "best": self.best(),
        }
        write_text_atomic(path, json.dumps(document, indent=2))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_record(record) -> bool:
    step = record.get("step") if isinstance(record, dict) else None
    return isinstance(step, int) and not isinstance(step, bool) and 0 <= step <= 10**12


def _clean(record: dict) -> dict:
    """The record with every non-finite number (NaN, infinity) as None: it is no figure to compare."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
