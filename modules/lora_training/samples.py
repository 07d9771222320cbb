"""Sample images during training: fixed prompts and seeds, rendered with the LoRA being trained.

The prompts' text embeddings are computed once, at the start of the run (unless the text
encoders are being trained), so no text encoder visits the GPU for a sample. The pipeline
stops at the latents and the family decodes them in the VAE's own dtype: the VAE stays fp32
beside a half-precision denoiser. A sample that fails is reported and skipped: it never ends
the run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from core.atomic import atomic_path


def render_samples(
    family,
    *,
    prompts: list[str],
    text_for: Callable[[str], dict[str, torch.Tensor]],
    seed: int,
    size: tuple[int, int],
    steps: int,
    folder: Path,
    step: int,
    device: str,
    on_failure: Callable[[str, Exception], None],
):
    """Yield ``(path, prompt)`` for each saved sample; ``on_failure(prompt, error)`` for each that failed."""
    denoiser = family.denoiser
    vae_device = next(family.vae.parameters()).device
    was_training = denoiser.training
    denoiser.eval()
    try:
        # Pipelines run on the device of their first module, the VAE; it also decodes there.
        family.vae.to(device)
        for index, prompt in enumerate(prompts):
            path = Path(folder) / f"step-{step:06d}-{index}.png"
            try:
                _render_one(family, text=text_for(prompt), seed=seed + index, size=size, steps=steps, path=path)
            except Exception as exc:  # noqa: BLE001 - whatever breaks a sample, training goes on
                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
                on_failure(prompt, exc)
                continue
            yield path, prompt
    finally:
        family.vae.to(vae_device)
        denoiser.train(was_training)


def _render_one(family, *, text: dict[str, torch.Tensor], seed: int, size: tuple[int, int], steps: int, path: Path):
    image = render_image(family, text=text, seed=seed, size=size, steps=steps)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def render_image(
    family,
    *,
    text: dict[str, torch.Tensor],
    seed: int,
    size: tuple[int, int],
    steps: int,
    should_stop: Callable[[], bool] | None = None,
):
    """One image (PIL) of the family's pipeline as it stands (with whatever LoRA it holds): the same seed and
    text give the same image. The VAE must be on the pipeline's device (:func:`render_samples` moves it).
    ``should_stop`` is asked between denoising steps: when it says stop, the rest is skipped and None returned."""
    width, height = size
    generator = torch.Generator(device="cpu").manual_seed(seed)
    extra = {}
    if should_stop is not None:

        def interrupt(pipe, step, timestep, tensors):
            if should_stop():
                pipe._interrupt = True  # diffusers' own flag: the remaining steps are skipped
            return tensors

        extra["callback_on_step_end"] = interrupt
    with torch.no_grad():
        latents = family.sample_pipeline()(
            width=width,
            height=height,
            num_inference_steps=steps,
            generator=generator,
            output_type="latent",
            **family.sample_kwargs(),
            **family.sample_text_kwargs(text),
            **extra,
        ).images
        if should_stop is not None and should_stop():
            return None
        return family.decode_latents(latents, width=width, height=height)
