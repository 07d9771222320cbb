"""The demo models load through the same code as real checkpoints, in both SDXL layouts."""

import torch

from core.model_files import detect_family, list_models


def test_models_are_listed_with_their_family(models_dir, demo_paths):
    entries = {e.name: e for e in list_models(models_dir)}
    assert entries[demo_paths.sdxl_folder.name].family == "sdxl"
    assert entries[demo_paths.sdxl_single_file.name].family == "sdxl"
    assert entries[demo_paths.sdxl_single_file.name].single_file
    assert entries[demo_paths.flux_folder.name].family == "flux"
    assert detect_family(demo_paths.flux_folder) == "flux"


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


def test_sdxl_base_config_folder_describes_the_real_model(tmp_path):
    """The offline config for real single files builds SDXL base at its published size."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    from core.model_configs import write_sdxl_base_config

    folder = write_sdxl_base_config(tmp_path / "sdxl-base")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    assert 2.55e9 < sum(p.numel() for p in unet.parameters()) < 2.58e9
    assert CLIPTextConfig.from_pretrained(folder / "text_encoder_2").hidden_size == 1280
