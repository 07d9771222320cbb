"""Stable Diffusion 1.5 end to end on the tiny demo model, CPU: prepare → train → save → webui export →
generate through the Generate tab's ModelManager, from the diffusers folder and the single file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from core.model_manager import GenerationRequest, LoraChoice, ModelManager
from tests.demo_names import DEMO_SD15_NAME, DEMO_SDXL_NAME

pytestmark = pytest.mark.slow
RANK, ALPHA = 4, 2.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory, models_dir):
    """A project prepared for SD 1.5 and a LoRA trained on it (text encoder too), with samples and the webui copy."""
    from modules.lora_training.config import PrepareConfig, TrainConfig, config_from_dict
    from modules.lora_training.dataset.prepare import prepare
    from modules.lora_training.train import train
    from tests.image_folders import noise_image

    root = tmp_path_factory.mktemp("sd15")
    photos = root / "photos"
    photos.mkdir()
    for index in range(3):
        noise_image(80 + 16 * index, 64, seed=300 + index).save(photos / f"photo{index}.png")
    values = {"project": "cat", "images_dir": str(photos), "trigger": "ohwx", "resolution": 64, "captioner": "none"}
    prepare(
        config_from_dict(PrepareConfig, {**values, "family": "sd15"}), projects_dir=root / "p", models_dir=models_dir
    )
    options = {
        "project": "cat",
        "base_model": DEMO_SD15_NAME,
        "name": "sd15-lora",
        "steps": 6,
        "rank": RANK,
        "alpha": ALPHA,
        "learning_rate": 1e-2,
        "train_text_encoder": True,
        "lora_targets": "attention+feedforward",
        "sample_every_steps": 6,
        "sample_steps": 2,
    }
    events = []
    result = train(
        config_from_dict(TrainConfig, options),
        projects_dir=root / "p",
        models_dir=models_dir,
        loras_dir=root / "loras",
        on_event=events.append,
    )
    assert result.status == "finished", result.message
    return root / "loras", result, events, root / "p"


def _render(manager, model, loras=(), guidance=7.5):
    request = GenerationRequest(
        model=model, prompt="ohwx, a photo", steps=3, width=64, height=64, seed=5, guidance=guidance, loras=loras
    )
    return np.asarray(manager.generate(request).image, dtype=np.float32) / 255.0


def test_training_saves_a_diffusers_lora_with_samples(trained):
    from modules.lora_training.events import SampleSaved
    from modules.lora_training.export import read_lora

    _, result, events, _ = trained
    assert [e for e in events if isinstance(e, SampleSaved)], "a sample was rendered"
    lora = read_lora(result.lora_path)
    assert (lora.family, lora.format) == ("sd15", "diffusers")
    parts = lora.parts()
    assert any(p.startswith("unet.down_blocks.0.attentions.0.") for p in parts)
    assert any(p.endswith(".proj_in") for p in parts), "SD 1.5's 1x1-convolution projections get LoRA too"
    assert any(p.startswith("text_encoder.") for p in parts) and not any("text_encoder_2" in p for p in parts)
    assert all(m.alpha == ALPHA and m.rank == RANK for m in lora.modules)


def test_webui_copy_has_sd_scripts_names_and_sd1_metadata(trained, models_dir):
    from families.sd15_lora_names import sd15_kohya_name
    from modules.lora_training.export import compare, read_lora

    loras, result, _, _ = trained
    webui = loras / "webui" / "sd15-lora.safetensors"
    with safe_open(str(webui), framework="pt") as handle:
        keys, meta = list(handle.keys()), handle.metadata()
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    expected = {sd15_kohya_name(part) for part in read_lora(result.lora_path).parts()}
    assert names == expected
    assert any(n.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q") for n in names)
    assert any(n.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for n in names)
    assert not any(n.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks")) for n in names)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_network_module"] == "networks.lora"
    assert meta["ss_v2"] == "False" and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["modelspec.resolution"] == "64x64"
    assert meta["lora_studio.family"] == "sd15"
    exported = read_lora(webui)
    assert (exported.family, exported.format) == ("sd15", "kohya")
    assert compare(read_lora(result.lora_path), exported).ok


def test_generate_tab_lists_and_renders_sd15_with_and_without_the_lora(trained, models_dir, demo_paths):
    from core.errors import UserError
    from modules.generate.tab import GenerateTab

    loras, result, _, _ = trained
    manager = ModelManager(models_dir=models_dir, loras_dir=loras, device="cpu")
    families = {entry.name: entry.family for entry in manager.list_models()}
    assert families[DEMO_SD15_NAME] == families[demo_paths.sd15_single_file.name] == "sd15"
    details = {info.name: info for info in manager.lora_details()}
    assert (details["sd15-lora.safetensors"].family, details["sd15-lora.safetensors"].trigger_word) == ("sd15", "ohwx")
    tab = GenerateTab(model_manager=manager, config=object(), translations={})
    assert tab.model_family(DEMO_SD15_NAME) == "sd15"

    base = _render(manager, DEMO_SD15_NAME)
    ours = _render(manager, DEMO_SD15_NAME, (LoraChoice("sd15-lora.safetensors", 1.0),))
    exported = _render(manager, DEMO_SD15_NAME, (LoraChoice("webui/sd15-lora.safetensors", 1.0),))
    single = _render(manager, demo_paths.sd15_single_file.name, (LoraChoice("sd15-lora.safetensors", 1.0),))
    assert np.abs(ours - base).max() > 1e-3, "the LoRA changes the image"
    assert np.abs(ours - exported).max() < 1e-3, "the webui copy applies the same change"
    assert np.abs(ours - single).max() < 1e-3, "the single file is the same model"
    with pytest.raises(UserError, match="the selected model is SDXL"):
        _render(manager, DEMO_SDXL_NAME, (LoraChoice("sd15-lora.safetensors", 1.0),), guidance=5.0)


def test_samples_use_the_encoded_empty_prompt_as_negative(models_dir):
    from core.model_files import model_entry
    from families.sd15 import SD15Family

    family = SD15Family(
        model_entry(models_dir, DEMO_SD15_NAME), models_dir=models_dir, device="cpu", weight_dtype=torch.float32
    )
    kwargs = family.sample_text_kwargs(family.encode_text(["ohwx"]))
    with torch.no_grad():
        prompt_embeds, negative = family.pipe.encode_prompt("ohwx", "cpu", 1, True, negative_prompt=None)
    assert torch.allclose(kwargs["prompt_embeds"], prompt_embeds, atol=1e-6)
    assert torch.allclose(kwargs["negative_prompt_embeds"], negative, atol=1e-6)


def _estimated_and_real_lora(models_dir, name: str, targets: str):
    from core.model_files import model_entry
    from families.sd15 import SD15Family
    from modules.lora_training.estimate.memory import estimate_memory

    entry = model_entry(models_dir, name)
    family = SD15Family(entry, models_dir=models_dir, device="cpu", weight_dtype=torch.float32)
    weights = sum(p.numel() * p.element_size() for p in family.denoiser.parameters())
    family.add_lora(rank=4, alpha=4.0, targets=targets, train_text_encoder=False)
    estimate = estimate_memory(
        entry=entry,
        rank=4,
        targets=family.target_modules(targets),
        optimizer="adamw",
        resolution=64,
        batch_size=1,
        gradient_checkpointing=False,
        weight_bytes=4,
        quantization="none",
        device="cpu",
        device_bytes=None,
    )
    assert estimate.parts["weights"] == weights
    return estimate.parts["LoRA + gradients"], sum(p.numel() for p in family.lora_parameters()) * 8


@pytest.mark.parametrize("layout", ["sd15_folder", "sd15_single_file"])
def test_memory_estimate_counts_sd15_weights_and_lora_exactly(models_dir, demo_paths, layout):
    estimated, real = _estimated_and_real_lora(models_dir, getattr(demo_paths, layout).name, "attention")
    assert estimated == real


def test_memory_estimate_counts_lora_on_sd15_convolution_projections(models_dir, demo_paths):
    estimated, real = _estimated_and_real_lora(models_dir, demo_paths.sd15_folder.name, "attention+feedforward")
    assert estimated == real


def test_half_precision_training_samples_and_exports(trained, models_dir):
    """fp16 frozen weights beside the fp32 VAE (the GPU path), on the CPU: samples decode, the LoRA saves."""
    from modules.lora_training.config import TrainConfig, config_from_dict
    from modules.lora_training.events import SampleSaved
    from modules.lora_training.train import train

    loras, _, _, projects = trained
    options = {"project": "cat", "base_model": DEMO_SD15_NAME, "name": "sd15-fp16", "steps": 2, "rank": RANK}
    options |= {"mixed_precision": "fp16", "cache_latents": False, "sample_every_steps": 2, "sample_steps": 2}
    events = []
    result = train(
        config_from_dict(TrainConfig, options),
        projects_dir=projects,
        models_dir=models_dir,
        loras_dir=loras,
        on_event=events.append,
    )
    assert result.status == "finished", result.message
    samples = [e.path for e in events if isinstance(e, SampleSaved)]
    assert samples and np.asarray(Image.open(samples[0]), dtype=np.float32).std() > 0
    assert (loras / "webui" / "sd15-fp16.safetensors").is_file()


def test_main_file_applies_every_module_in_a_plain_diffusers_pipeline(trained, models_dir, caplog):
    """diffusers' StableDiffusionPipeline.load_lora_weights puts a LoRA on each module the file holds, and no
    other: U-Net attention, feed-forward and 1x1-conv projections, and the text encoder."""
    import logging

    from diffusers import StableDiffusionPipeline

    from modules.lora_training.export import read_lora

    _, result, _, _ = trained
    expected = set(read_lora(result.lora_path).parts())
    pipe = StableDiffusionPipeline.from_pretrained(str(models_dir / DEMO_SD15_NAME))
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(result.lora_path), adapter_name="main")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    with_lora = {
        f"{component}.{name.removeprefix('text_model.')}"
        for component in ("unet", "text_encoder")
        for name, layer in getattr(pipe, component).named_modules()
        if hasattr(layer, "lora_A") and "main" in layer.lora_A
    }
    assert with_lora == expected


def test_training_lowers_the_denoising_loss(trained, models_dir):
    from modules.lora_training.config import TrainConfig, config_from_dict
    from modules.lora_training.evaluate import denoising_loss
    from modules.lora_training.train import train

    loras, _, _, projects = trained
    options = {"project": "cat", "base_model": DEMO_SD15_NAME, "name": "sd15-fit", "steps": 15, "rank": 8}
    config = config_from_dict(TrainConfig, {**options, "alpha": 8.0, "learning_rate": 1e-2})
    before = denoising_loss(config, projects_dir=projects, models_dir=models_dir)
    result = train(config, projects_dir=projects, models_dir=models_dir, loras_dir=loras)
    after = denoising_loss(config, projects_dir=projects, models_dir=models_dir, lora_path=result.lora_path)
    assert after < 0.92 * before, (before, after)
