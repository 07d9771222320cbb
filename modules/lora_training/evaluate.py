"""Denoising loss on the prepared set at fixed timesteps and fixed noise: comparable across runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from core.model_files import model_entry
from families import family as model_family
from modules.lora_training.config import TrainConfig
from modules.lora_training.data import load_items
from modules.lora_training.project import ProjectPaths
from modules.lora_training.train import _load_pixels

DEFAULT_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)


@torch.no_grad()
def denoising_loss(
    config: TrainConfig,
    *,
    projects_dir: Path,
    models_dir: Path,
    lora_path: Path | None = None,
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> float:
    """Mean loss of the base model (plus ``lora_path`` when given) over every image × fraction."""
    entry = model_entry(models_dir, config.base_model)
    family = model_family(entry.family)(entry, models_dir=models_dir, device="cpu", weight_dtype=torch.float32)
    family.configure(config)
    family.place_denoiser()
    if lora_path is not None:
        family.pipe.load_lora_weights(str(lora_path))
    plain = dataclasses.replace(config, min_snr_gamma=0.0)
    losses = []
    for index, item in enumerate(load_items(ProjectPaths.for_project(projects_dir, config.project))):
        mean, _ = family.encode_image_moments(_load_pixels(item, flip=False)[None]).chunk(2, dim=1)
        latents = family.scale_latents(mean)
        text = family.encode_text([item.caption])
        for position, fraction in enumerate(fractions):
            generator = torch.Generator().manual_seed(seed * 10_000 + index * 100 + position)
            noise = torch.randn(latents.shape, generator=generator)
            loss = family.training_loss(
                latents=latents,
                text=text,
                items=[item],
                generator=None,  # noise and timestep are given
                config=plain,
                fixed_t=torch.tensor([fraction]),
                noise=noise,
            )
            losses.append(loss.item())
    return sum(losses) / len(losses)
