"""Sample images during training: fixed prompts and seeds, rendered with the LoRA being trained."""

from __future__ import annotations

from pathlib import Path

import torch

from core.atomic import atomic_path


def render_samples(
    family, *, prompts: list[str], seed: int, size: tuple[int, int], steps: int, folder: Path, step: int, device: str
):
    """Yield ``(path, prompt)`` for each saved sample; encoders visit the GPU only for this."""
    pipe = family.sample_pipeline()
    denoiser = family.denoiser
    placed = {module: next(module.parameters()).device for module in (family.vae, *family.text_encoders())}
    was_training = denoiser.training
    denoiser.eval()
    try:
        family.place_encoders(device)
        folder = Path(folder)
        for index, prompt in enumerate(prompts):
            generator = torch.Generator(device="cpu").manual_seed(seed + index)
            with torch.no_grad():
                image = pipe(
                    prompt=prompt,
                    width=size[0],
                    height=size[1],
                    num_inference_steps=steps,
                    generator=generator,
                    **family.sample_kwargs(),
                ).images[0]
            path = folder / f"step-{step:06d}-{index}.png"
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
            yield path, prompt
    finally:
        for module, where in placed.items():
            module.to(where)
        denoiser.train(was_training)
