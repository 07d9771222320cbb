"""The family registry: names, lookups, LoRA detection, and an import that does no work."""

import subprocess
import sys

import pytest

from families import FAMILY_NAMES, all_families, family, family_of_pipeline, lora_family


def test_names_and_lookups():
    assert FAMILY_NAMES == ("sdxl", "flux", "sd15")
    assert [f.name for f in all_families()] == list(FAMILY_NAMES)
    assert [family(name).size_multiple for name in FAMILY_NAMES] == [8, 16, 8]
    with pytest.raises(ValueError, match="unknown model family 'sd3'"):
        family("sd3")


def test_pipelines_are_recognised_by_class_name():
    assert family_of_pipeline("StableDiffusionXLPipeline") == "sdxl"
    assert family_of_pipeline("StableDiffusionPipeline") == "sd15"
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
        # SD 1.5 from its header: sd-scripts' ss_base_model_version, modelspec's architecture.
        (["a.lora_down.weight"], {"ss_base_model_version": "sd_v1"}, "sd15"),
        (["a.lora_down.weight"], {"modelspec.architecture": "stable-diffusion-v1/lora"}, "sd15"),
        (["lora_te1_x.lora_down.weight"], {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
        # ... and from names SDXL LoRAs never have: one text encoder's lora_te_, attention in SD 1.5-only blocks.
        (
            [
                "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight",
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
            ],
            {},
            "sd15",
        ),
        (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], {}, "sd15"),
        (["lora_unet_output_blocks_11_1_proj_in.lora_down.weight"], {}, "sd15"),
        (["unet.up_blocks.3.attentions.2.proj_out.lora.down.weight"], {}, "sd15"),
        (
            [
                "lora_unet_output_blocks_1_1_proj_in.lora_down.weight",
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
            ],
            {},
            "sdxl",
        ),
        (["unet.down_blocks.1.attentions.0.proj_in.lora.down.weight", "text_encoder_2.x.lora_A.weight"], {}, "sdxl"),
    ],
)
def test_lora_family_from_metadata_then_names(keys, metadata, expected):
    assert lora_family(keys, metadata) == expected


def test_checkpoints_are_told_apart_by_their_text_encoder_names():
    from families import family_of_state_keys

    unet = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    sd15 = [unet, "cond_stage_model.transformer.text_model.final_layer_norm.weight"]
    sdxl = [unet, "conditioner.embedders.0.transformer.text_model.x", "conditioner.embedders.1.model.ln_final.weight"]
    sd2 = [unet, "cond_stage_model.model.ln_final.weight"]
    assert [family_of_state_keys(keys) for keys in (sd15, sdxl, sd2)] == ["sd15", "sdxl", None]


def test_a_stable_diffusion_2_folder_is_refused_by_name(tmp_path):
    import json

    from core.errors import UserError
    from families import detect

    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 768}))
    assert detect(tmp_path) == "sd15"
    (tmp_path / "unet" / "config.json").write_text(
        json.dumps({"cross_attention_dim": 1024, "use_linear_projection": True})
    )
    with pytest.raises(UserError, match="Stable Diffusion 2.x is not supported"):
        detect(tmp_path)


def test_importing_the_registry_loads_no_model_code():
    code = "import sys, families; families.FAMILY_NAMES; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
