"""ModelManager on the tiny demo models: generate, LoRAs, bad input, GPU hand-off."""

import os
import shutil

import numpy as np
import pytest

from core.errors import GpuBusyError, UserError
from core.model_manager import GenerationRequest, LoraChoice, ModelManager
from tests.lora_files import write_diffusers_lora


@pytest.fixture
def manager(tmp_path, models_dir):
    return ModelManager(models_dir=models_dir, loras_dir=tmp_path / "loras", device="cpu")


def _request(model, **changes):
    values = dict(model=model, prompt="a photo of a cat", steps=3, width=64, height=64, seed=7, guidance=5.0)
    values.update(changes)
    return GenerationRequest(**values)


def _pixels(result):
    return np.asarray(result.image, dtype=np.int16)


def test_generate_sdxl_single_file_and_flux(manager, demo_paths):
    sdxl = manager.generate(_request(demo_paths.sdxl_single_file.name))
    assert sdxl.image.size == (64, 64) and sdxl.family == "sdxl"
    again = manager.generate(_request(demo_paths.sdxl_single_file.name))
    assert np.array_equal(_pixels(sdxl), _pixels(again)), "same seed, same image"
    flux = manager.generate(_request(demo_paths.flux_folder.name, guidance=3.5))
    assert flux.image.size == (64, 64) and flux.family == "flux"
    assert manager.loaded_model == demo_paths.flux_folder.name
    assert flux.parameters["seed"] == 7


def test_lora_weight_changes_the_image_and_rewrites_are_reread(manager, demo_paths):
    model = demo_paths.sdxl_folder.name
    lora = write_diffusers_lora(demo_paths.sdxl_folder, manager.loras_dir / "style.safetensors", family="sdxl")
    assert manager.list_loras() == ["style.safetensors"]
    base = _pixels(manager.generate(_request(model)))
    full = _pixels(manager.generate(_request(model, loras=(LoraChoice("style.safetensors", 1.0),))))
    zero = _pixels(manager.generate(_request(model, loras=(LoraChoice("style.safetensors", 0.0),))))
    assert np.abs(full - base).max() > 10
    assert np.array_equal(zero, base)
    assert np.array_equal(_pixels(manager.generate(_request(model))), base), "no LoRA selected: base again"

    write_diffusers_lora(demo_paths.sdxl_folder, lora, family="sdxl", seed=1)
    rewritten = _pixels(manager.generate(_request(model, loras=(LoraChoice("style.safetensors", 1.0),))))
    assert np.abs(rewritten - full).max() > 10


def test_flux_lora_applies(manager, demo_paths):
    model = demo_paths.flux_folder.name
    write_diffusers_lora(demo_paths.flux_folder, manager.loras_dir / "flux.safetensors", family="flux", scale=0.5)
    base = _pixels(manager.generate(_request(model)))
    with_lora = _pixels(manager.generate(_request(model, loras=(LoraChoice("flux.safetensors", 1.0),))))
    assert np.abs(with_lora - base).max() > 5


def test_lora_for_another_family_is_refused_in_words(manager, demo_paths):
    model = demo_paths.sdxl_folder.name
    write_diffusers_lora(demo_paths.flux_folder, manager.loras_dir / "flux.safetensors", family="flux")
    base = _pixels(manager.generate(_request(model)))
    with pytest.raises(UserError, match="flux.safetensors"):
        manager.generate(_request(model, loras=(LoraChoice("flux.safetensors", 1.0),)))
    assert manager.loaded_model == model
    assert np.array_equal(_pixels(manager.generate(_request(model))), base)


def test_lora_with_another_rank_layout_is_refused(manager, demo_paths, tmp_path):
    """A LoRA whose shapes fit another SDXL (different widths) gives a message, not a crash."""
    from diffusers import UNet2DConditionModel

    config = dict(UNet2DConditionModel.load_config(demo_paths.sdxl_folder / "unet"))
    config["cross_attention_dim"] = 96
    wide = tmp_path / "wide"
    UNet2DConditionModel.from_config(config).save_pretrained(wide / "unet")
    write_diffusers_lora(wide, manager.loras_dir / "wide.safetensors", family="sdxl")
    model = demo_paths.sdxl_folder.name
    with pytest.raises(UserError, match="does not fit"):
        manager.generate(_request(model, loras=(LoraChoice("wide.safetensors", 1.0),)))
    assert manager.generate(_request(model)).image.size == (64, 64)


def test_missing_and_corrupt_models_keep_the_loaded_one(manager, demo_paths, tmp_path, models_dir):
    model = demo_paths.sdxl_folder.name
    manager.load_model(model)
    with pytest.raises(UserError, match="not found"):
        manager.load_model("nope.safetensors")
    corrupt = models_dir / "zz-corrupt.safetensors"
    shutil.copy(demo_paths.sdxl_single_file, corrupt)
    try:
        with open(corrupt, "r+b") as handle:
            handle.truncate(os.path.getsize(corrupt) // 2)
        with pytest.raises(UserError, match="zz-corrupt"):
            manager.load_model(corrupt.name)
    finally:
        corrupt.unlink()
    assert manager.loaded_model == model
    with pytest.raises(UserError, match="outside"):
        manager.load_model("../etc")


def test_release_blocks_generation_and_restore_reloads(manager, demo_paths):
    model = demo_paths.sdxl_folder.name
    manager.load_model(model)
    with manager.lent_to("training LoRA 'x'") as info:
        assert info.model == model
        assert manager.loaded_model is None
        with pytest.raises(GpuBusyError, match="training LoRA 'x'"):
            manager.generate(_request(model))
        with pytest.raises(GpuBusyError):
            manager.release("another job")
    assert manager.loaded_model == model
    assert manager.busy_reason is None
    assert manager.generate(_request(model)).image.size == (64, 64)


def test_loading_time_is_counted_apart_from_the_generation(manager):
    from tests.demo_names import DEMO_SDXL_NAME

    first = manager.generate(_request(DEMO_SDXL_NAME))
    again = manager.generate(_request(DEMO_SDXL_NAME))
    assert first.load_seconds > 0, "the first request built the pipeline"
    assert again.load_seconds < first.load_seconds, "the model was already loaded: nothing to load again"
