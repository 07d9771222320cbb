"""Flux LoRA training on the tiny Flux, CPU, through the same loop as SDXL."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modules.lora_training.config import TrainConfig, config_from_dict
from modules.lora_training.events import StepDone
from modules.lora_training.train import train
from tests.demo_names import DEMO_FLUX_NAME, DEMO_SD15_NAME, DEMO_SDXL_NAME


def _config(project_name, /, **options):
    values = {"project": project_name, "base_model": DEMO_FLUX_NAME, "steps": 4, "rank": 4, "alpha": 4.0}
    values.update(options)
    return config_from_dict(TrainConfig, values)


def test_flux_training_lowers_the_flow_matching_loss(project, models_dir, tmp_path):
    from modules.lora_training.evaluate import denoising_loss

    projects, name = project
    config = _config(name, steps=60, learning_rate=1e-2, rank=8, alpha=8.0)
    before = denoising_loss(config, projects_dir=projects, models_dir=models_dir)
    result = train(config, projects_dir=projects, models_dir=models_dir, loras_dir=tmp_path / "loras")
    after = denoising_loss(config, projects_dir=projects, models_dir=models_dir, lora_path=result.lora_path)
    assert after < 0.9 * before, (before, after)


def test_flux_stop_and_resume_equals_uninterrupted(project, models_dir, tmp_path):
    projects, name = project
    straight = train(
        _config(name, steps=5, timestep_sampling="shift", name="a"),
        projects_dir=projects,
        models_dir=models_dir,
        loras_dir=tmp_path / "a",
    )
    done = {"step": 0}

    def on_event(event):
        if isinstance(event, StepDone):
            done["step"] = event.step

    config = _config(name, steps=5, timestep_sampling="shift", name="b")
    stopped = train(
        config,
        projects_dir=projects,
        models_dir=models_dir,
        loras_dir=tmp_path / "b",
        on_event=on_event,
        should_stop=lambda: done["step"] >= 2,
    )
    assert stopped.status == "stopped" and stopped.step == 2
    resumed = train(config, projects_dir=projects, models_dir=models_dir, loras_dir=tmp_path / "b", resume=True)
    first = load_file(str(straight.checkpoint / "lora.safetensors"))
    final = load_file(str(resumed.checkpoint / "lora.safetensors"))
    assert first.keys() == final.keys()
    assert all(torch.equal(first[k], final[k]) for k in first)


def test_flux_lora_loads_with_alpha_and_generates_in_the_app(project, models_dir, demo_paths, tmp_path):
    from diffusers import FluxPipeline

    from core.model_manager import GenerationRequest, LoraChoice, ModelManager

    loras = tmp_path / "loras"
    result = train(
        _config(name := project[1], steps=6, alpha=2.0, learning_rate=1e-2, train_text_encoder=True),
        projects_dir=project[0],
        models_dir=models_dir,
        loras_dir=loras,
    )
    assert result.lora_path == loras / f"{name}.safetensors"
    pipe = FluxPipeline.from_pretrained(demo_paths.flux_folder)
    pipe.load_lora_weights(str(result.lora_path), adapter_name="trained")
    assert pipe.transformer.peft_config["trained"].lora_alpha == 2.0

    manager = ModelManager(models_dir=models_dir, loras_dir=loras, device="cpu")
    request = GenerationRequest(model=DEMO_FLUX_NAME, prompt="ohwx", steps=3, width=64, height=64, seed=2, guidance=3.5)
    base = np.asarray(manager.generate(request).image, dtype=np.int16)
    with_lora = GenerationRequest(**{**request.__dict__, "loras": (LoraChoice(result.lora_path.name, 1.0),)})
    assert np.abs(np.asarray(manager.generate(with_lora).image, dtype=np.int16) - base).max() > 0


def test_flux_transformer_single_file_trains_and_generates(project, models_dir, demo_paths, tmp_path):
    """A BFL-layout transformer file plus the Flux folder's VAE and text encoders, end to end."""
    from core.model_manager import GenerationRequest, LoraChoice, ModelManager

    single = demo_paths.flux_single_file.name
    loras = tmp_path / "loras"
    result = train(
        _config(project[1], base_model=single, steps=4, learning_rate=5e-2),
        projects_dir=project[0],
        models_dir=models_dir,
        loras_dir=loras,
    )
    assert result.status == "finished"
    manager = ModelManager(models_dir=models_dir, loras_dir=loras, device="cpu")
    request = GenerationRequest(model=single, prompt="ohwx", steps=2, width=64, height=64, seed=3, guidance=3.5)
    base = np.asarray(manager.generate(request).image, dtype=np.int16)
    folder = GenerationRequest(**{**request.__dict__, "model": DEMO_FLUX_NAME})
    same_weights = np.asarray(manager.generate(folder).image, dtype=np.int16)
    assert np.abs(same_weights - base).max() <= 2, "the file and the folder hold the same weights"
    with_lora = GenerationRequest(**{**request.__dict__, "loras": (LoraChoice(result.lora_path.name, 1.0),)})
    assert np.abs(np.asarray(manager.generate(with_lora).image, dtype=np.int16) - base).max() > 10


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_base_still_learns_and_the_lora_fits_the_full_precision_model(
    project, models_dir, demo_paths, tmp_path, quantization
):
    """QLoRA: the frozen transformer blocks in bitsandbytes 4/8-bit, the LoRA in fp32."""
    from diffusers import FluxPipeline

    from modules.lora_training.evaluate import denoising_loss
    from modules.lora_training.events import Log

    projects, name = project
    config = _config(name, steps=40, learning_rate=1e-2, rank=8, alpha=8.0, base_quantization=quantization)
    logs = []
    before = denoising_loss(config, projects_dir=projects, models_dir=models_dir)
    result = train(
        config,
        projects_dir=projects,
        models_dir=models_dir,
        loras_dir=tmp_path / "loras",
        on_event=lambda e: logs.append(e.message) if isinstance(e, Log) else None,
    )
    after = denoising_loss(config, projects_dir=projects, models_dir=models_dir, lora_path=result.lora_path)
    assert after < 0.9 * before, (before, after)
    assert any(f"base transformer in {quantization} (26 layers" in line for line in logs), logs
    # Every trained layer lands on a layer of the full-precision transformer (no bitsandbytes names).
    pipe = FluxPipeline.from_pretrained(demo_paths.flux_folder)
    pipe.load_lora_weights(str(result.lora_path), adapter_name="trained")
    trained = {key.split(".lora_A.")[0] for key in load_file(str(result.lora_path)) if ".lora_A." in key}
    loaded = [name for name, module in pipe.transformer.named_modules() if "trained" in getattr(module, "lora_A", {})]
    assert len(loaded) == len(trained) > 0


@pytest.mark.parametrize("model", [DEMO_FLUX_NAME, DEMO_SDXL_NAME, DEMO_SD15_NAME])
def test_a_family_computes_the_loss_and_leaves_backward_and_the_update_to_the_loop(project, models_dir, model):
    """The family's part of a step: per-sample losses with a graph to the LoRA, no backward, no update."""
    from core.model_files import model_entry
    from families import family as family_class
    from modules.lora_training.data import SampleRandom, load_items
    from modules.lora_training.project import ProjectPaths
    from modules.lora_training.train import _load_pixels

    entry = model_entry(models_dir, model)
    family = family_class(entry.family)(entry, models_dir=models_dir, device="cpu", weight_dtype=torch.float32)
    family.place_denoiser()
    family.add_lora(rank=4, alpha=4.0, targets="auto", train_text_encoder=False)
    items = load_items(ProjectPaths.for_project(project[0], project[1]))[:2]
    generator = SampleRandom([1, 2])
    pixels = torch.stack([_load_pixels(item, flip=False) for item in items])
    latents = family.latents_from_moments(family.encode_image_moments(pixels), generator)
    with torch.no_grad():
        text = family.encode_text([item.caption for item in items])
    lora = family.lora_parameters()
    before = [param.detach().clone() for param in lora]
    config = _config(project[1], base_model=model)
    losses = family.training_loss(latents=latents, text=text, items=items, generator=generator, config=config)
    assert losses.shape == (2,) and losses.requires_grad
    assert all(param.grad is None for param in lora), "the family ran a backward pass"
    assert all(torch.equal(param, old) for param, old in zip(lora, before, strict=True)), "the family updated"
    losses.sum().backward()
    assert all(param.grad is not None for param in lora), "every LoRA weight is in the loss's graph"
    frozen = [param for param in family.denoiser.parameters() if not param.requires_grad]
    assert frozen and all(param.grad is None for param in frozen)
