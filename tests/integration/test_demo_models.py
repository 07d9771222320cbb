"""The demo models load through the same code as real checkpoints, in both SDXL layouts."""

import pytest
import torch

from core.model_files import detect_family, list_models


def test_models_are_listed_with_their_family(models_dir, demo_paths):
    entries = {e.name: e for e in list_models(models_dir)}
    assert entries[demo_paths.sdxl_folder.name].family == "sdxl"
    assert entries[demo_paths.sdxl_single_file.name].family == "sdxl"
    assert entries[demo_paths.sdxl_single_file.name].single_file
    assert entries[demo_paths.flux_folder.name].family == "flux"
    assert detect_family(demo_paths.flux_folder) == "flux"
    assert entries[demo_paths.flux_single_file.name].family == "flux"
    assert entries[demo_paths.flux_single_file.name].single_file


def test_single_file_holds_the_same_weights_as_the_folder(demo_paths):
    from diffusers import StableDiffusionXLPipeline

    folder = StableDiffusionXLPipeline.from_pretrained(demo_paths.sdxl_folder)
    single = StableDiffusionXLPipeline.from_single_file(
        str(demo_paths.sdxl_single_file), config=str(demo_paths.sdxl_folder)
    )
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected = getattr(folder, component).state_dict()
        actual = getattr(single, component).state_dict()
        assert expected.keys() == actual.keys(), component
        for key, value in expected.items():
            assert torch.equal(value, actual[key]), f"{component}.{key}"


def test_flux_single_file_loads_the_same_transformer_with_the_folder_components(models_dir, demo_paths, tmp_path):
    import shutil

    from diffusers import FluxPipeline

    from core.errors import UserError
    from core.model_files import model_entry
    from families import load_pipeline

    folder = FluxPipeline.from_pretrained(demo_paths.flux_folder)
    single = load_pipeline(
        model_entry(models_dir, demo_paths.flux_single_file.name), models_dir=models_dir, dtype=torch.float32
    )
    expected, actual = folder.transformer.state_dict(), single.transformer.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(value, actual[key]) for key, value in expected.items())
    assert single.transformer.config.axes_dims_rope == folder.transformer.config.axes_dims_rope

    # Without the header's pointer, a Flux folder whose text encoders fit is found in models/.
    from safetensors.torch import load_file, save_file

    alone = tmp_path / "models"
    shutil.copytree(demo_paths.flux_folder, alone / demo_paths.flux_folder.name)
    save_file(load_file(str(demo_paths.flux_single_file)), str(alone / "flux1-dev.safetensors"))
    found = load_pipeline(model_entry(alone, "flux1-dev.safetensors"), models_dir=alone, dtype=torch.float32)
    assert torch.equal(found.transformer.x_embedder.weight, folder.transformer.x_embedder.weight)
    shutil.rmtree(alone / demo_paths.flux_folder.name)
    with pytest.raises(UserError, match="Flux diffusers folder"):
        load_pipeline(model_entry(alone, "flux1-dev.safetensors"), models_dir=alone, dtype=torch.float32)


def test_flux_all_in_one_fp8_file_loads_its_transformer(models_dir, demo_paths, tmp_path):
    """ComfyUI-style checkpoints: fp8 weights under model.diffusion_model., VAE and text encoders beside."""
    import shutil

    from diffusers import FluxPipeline
    from safetensors.torch import load_file, save_file

    from core.model_files import model_entry
    from families import load_pipeline

    models = tmp_path / "models"
    shutil.copytree(demo_paths.flux_folder, models / demo_paths.flux_folder.name)
    state = {
        f"model.diffusion_model.{k}": v.to(torch.float8_e4m3fn)
        for k, v in load_file(str(demo_paths.flux_single_file)).items()
    }
    state["vae.decoder.conv_in.weight"] = torch.zeros(4, 4)
    state["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.zeros(4)
    save_file(state, str(models / "flux1-dev-fp8.safetensors"))

    entry = model_entry(models, "flux1-dev-fp8.safetensors")
    assert entry.family == "flux"
    pipe = load_pipeline(entry, models_dir=models, dtype=torch.bfloat16)
    reference = FluxPipeline.from_pretrained(demo_paths.flux_folder).transformer.state_dict()
    loaded = pipe.transformer.state_dict()
    assert loaded.keys() == reference.keys()
    for key, value in reference.items():
        assert loaded[key].dtype == torch.bfloat16
        assert torch.allclose(loaded[key].float(), value, rtol=0.13, atol=0.02), key  # fp8 keeps ~2 significant digits


def test_sdxl_base_config_folder_describes_the_real_model(tmp_path):
    """The offline config for real single files builds SDXL base at its published size."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    from families.sdxl_configs import write_sdxl_base_config

    folder = write_sdxl_base_config(tmp_path / "sdxl-base")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    assert 2.55e9 < sum(p.numel() for p in unet.parameters()) < 2.58e9
    assert CLIPTextConfig.from_pretrained(folder / "text_encoder_2").hidden_size == 1280
