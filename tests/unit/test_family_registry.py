"""The family registry: names, lookups, LoRA detection, and an import that does no work."""

import subprocess
import sys

import pytest

from families import FAMILY_NAMES, all_families, family, family_of_pipeline, lora_family


def test_names_and_lookups():
    assert FAMILY_NAMES == ("sdxl", "flux")
    assert [f.name for f in all_families()] == list(FAMILY_NAMES)
    assert (family("sdxl").size_multiple, family("flux").size_multiple) == (8, 16)
    with pytest.raises(ValueError, match="unknown model family 'sd3'"):
        family("sd3")


def test_pipelines_are_recognised_by_class_name():
    assert family_of_pipeline("StableDiffusionXLPipeline") == "sdxl"
    assert family_of_pipeline("FluxPipeline") == "flux"
    assert family_of_pipeline("StableDiffusion3Pipeline") is None


@pytest.mark.parametrize(
    ("keys", "metadata", "expected"),
    [
        (["a.lora_down.weight"], {"lora_studio.family": "flux"}, "flux"),
        (["a.lora_down.weight"], {"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
        (["a.lora_down.weight"], {"ss_network_module": "networks.lora_flux"}, "flux"),
        # A Flux LoRA with CLIP layers also carries names SDXL's first encoder has: Flux markers win.
        (["transformer.x.lora_A.weight", "text_encoder.text_model.q.lora_A.weight"], {}, "flux"),
        (["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"], {}, "sdxl"),
        (["something.lora_down.weight"], {}, None),
    ],
)
def test_lora_family_from_metadata_then_names(keys, metadata, expected):
    assert lora_family(keys, metadata) == expected


def test_importing_the_registry_loads_no_model_code():
    code = "import sys, families; families.FAMILY_NAMES; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
