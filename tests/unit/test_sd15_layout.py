"""Stable Diffusion 1.5 at full size, on the meta device: the single-file layout and kohya LoRA names against
the real SD 1.5 U-Net and CLIP ViT-L, as diffusers, kohya sd-scripts, ComfyUI and A1111 name them."""

from __future__ import annotations

import pytest
import torch

from families.ldm_layout import unet_key_to_original
from families.sd15_configs import SD15_TEXT_ENCODER, SD15_UNET, SD15_VAE
from families.sd15_lora_names import sd15_kohya_name, sd15_module_from_kohya

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
FEEDFORWARD = ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT = ("q_proj", "k_proj", "v_proj", "out_proj")


@pytest.fixture(scope="module")
def full_size():
    """SD 1.5's U-Net, VAE and text encoder as published (block_out_channels 320-1280, context 768), no memory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SD15_UNET)
        vae = AutoencoderKL.from_config(SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER))
    return unet, vae, text


def _lora_layers(model, targets) -> dict[str, tuple[int, ...]]:
    """Module name → weight shape of the layers PEFT targets (Linear, and SD 1.5's 1x1-conv proj_in/out)."""
    return {
        name: tuple(module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and any(name.endswith("." + t) for t in targets)
    }


def _original(full_size) -> dict[str, tuple[int, ...]]:
    from families.ldm_layout import clip_state, unet_state, vae_state
    from families.sd15_layout import TEXT_PREFIX

    unet, vae, text = full_size
    state = {**unet_state(unet), **vae_state(vae), **clip_state(text, TEXT_PREFIX)}
    return {key: tuple(value.shape) for key, value in state.items()}


def test_the_single_file_has_sd15s_original_names_and_shapes(full_size):
    original = _original(full_size)
    expected = {
        "model.diffusion_model.time_embed.0.weight": (1280, 320),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),  # up block 0: no attention
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),  # diffusers' SD 1 marker
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.encoder.down.3.block.1.conv2.weight": (512, 512, 3, 3),
        "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight": (768, 768),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
    }
    assert {key: original.get(key) for key in expected} == expected
    assert not any(k.startswith(("conditioner.", "cond_stage_model.model.")) for k in original), "not SDXL or SD 2"
    assert sum(k.startswith("model.diffusion_model.") for k in original) == 686, "SD 1.5's U-Net tensor count"


def test_diffusers_single_file_reader_rebuilds_the_full_size_unet(full_size):
    """diffusers' own LDM → diffusers converter (what from_single_file runs) maps every tensor back."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, infer_diffusers_model_type

    from families.ldm_layout import unet_state

    unet = full_size[0]
    checkpoint = unet_state(unet)
    assert infer_diffusers_model_type(checkpoint) == "v1"
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in unet.state_dict().items()
    }


def test_kohya_names_are_sd_scripts_names_on_the_full_size_layers(full_size):
    """sd-scripts trains SD 1.x on a U-Net with diffusers' module names (library/original_unet.py) and names each
    LoRA module ``lora_unet_`` + that path with dots as underscores (networks/lora.py create_modules); its one
    CLIP encoder gets ``lora_te_`` (``lora_te1_``/``lora_te2_`` are SDXL's)."""
    unet, _, text = full_size
    layers = _lora_layers(unet, ATTENTION + FEEDFORWARD)
    assert len(layers) == 16 * (4 * 2 + 2) + 16 * 2, "16 transformer blocks: 2 attentions, 2 FF layers, proj in/out"
    original = _original(full_size)
    for module, shape in layers.items():
        name = sd15_kohya_name(f"unet.{module}")
        assert name == "lora_unet_" + module.replace(".", "_")
        # A1111 and ComfyUI (comfy/utils.py unet_to_diffusers) map it onto the original block; that tensor exists.
        ldm = unet_key_to_original(f"{module}.weight", SD15_UNET["layers_per_block"])
        assert original["model.diffusion_model." + ldm] == shape, module
        # diffusers' reader (StableDiffusionPipeline.lora_state_dict) names it back.
        assert sd15_module_from_kohya(name) == f"unet.{module}"
    text_layers = _lora_layers(text, TEXT)
    assert len(text_layers) == 12 * 4
    for module in text_layers:
        name = sd15_kohya_name(f"text_encoder.{module}")
        layer = module.removeprefix("text_model.")
        assert name == "lora_te_text_model_" + layer.replace(".", "_")  # ComfyUI: lora_te_text_model_encoder_layers_
        assert "cond_stage_model.transformer.text_model." + layer + ".weight" in original


@pytest.mark.parametrize(
    ("module", "kohya", "ldm"),
    [
        (
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        ),
        (
            "down_blocks.2.attentions.1.proj_out",
            "lora_unet_down_blocks_2_attentions_1_proj_out",
            "input_blocks.8.1.proj_out",
        ),
        (
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0",
            "middle_block.1.transformer_blocks.0.attn2.to_out.0",
        ),
        (
            "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2",
            "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2",
            "output_blocks.11.1.transformer_blocks.0.ff.net.2",
        ),
    ],
)
def test_known_names_and_their_original_blocks(module, kohya, ldm):
    assert sd15_kohya_name(f"unet.{module}") == kohya
    assert unet_key_to_original(f"{module}.weight", 2) == f"{ldm}.weight"
    # Files that spell the original blocks (``lora_unet_input_blocks_1_1_...``) read as the same module.
    assert sd15_module_from_kohya("lora_unet_" + ldm.replace(".", "_")) == f"unet.{module}"


def test_kohya_header_is_what_sd_scripts_writes_for_sd1():
    from families.sd15 import SD15Family

    assert SD15Family.kohya_identity() == {"ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora"}
    assert SD15Family.modelspec_identity() == {
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
    }
    assert SD15Family.modelspec_prediction_type({}) == "epsilon"
    assert SD15Family.kohya_extra_metadata({}) == {
        "ss_v2": "False",
        "ss_v_parameterization": "False",
        "ss_zero_terminal_snr": "False",
    }
    v_pred = {"lora_studio.prediction_type": "v_prediction"}
    assert SD15Family.modelspec_prediction_type(v_pred) == "v"
    assert SD15Family.kohya_extra_metadata(v_pred)["ss_base_model_version"] == "sd_v1_v"


def test_comfyui_key_map_consumes_every_tensor_of_a_full_size_main_file(full_size, tmp_path):
    """The main LoRA file of SD 1.5's full-size layers, every target, read by ComfyUI's rules (the key map
    model_lora_keys_unet / model_lora_keys_clip build; see tests/integration/test_main_lora_file.py)."""
    from peft import LoraConfig
    from safetensors import safe_open

    from families.sd15 import SD15Family
    from modules.lora_training.main_file import write_main_lora
    from tests.integration.test_main_lora_file import _comfy_consumes, _comfy_key_map

    unet, _, text = full_size
    shapes = {f"unet.{k}": v[:2] for k, v in _lora_layers(unet, ATTENTION + FEEDFORWARD).items()}
    shapes |= {f"text_encoder.{k}": v[:2] for k, v in _lora_layers(text, TEXT).items()}
    layers: dict[str, dict] = {}
    for name, (out_features, in_features) in shapes.items():
        component, _, module = name.partition(".")
        conv = (1, 1) if module.endswith(("proj_in", "proj_out")) else ()
        part = layers.setdefault(component, {})
        part[f"{module}.lora_A.weight"] = torch.zeros(1, in_features, *conv)
        part[f"{module}.lora_B.weight"] = torch.zeros(out_features, 1, *conv)
    configs = {c: LoraConfig(r=1, lora_alpha=1, target_modules=["q_proj"]).to_dict() for c in layers}
    path = tmp_path / "full.safetensors"
    write_main_lora(path, layers, configs, metadata={}, keys=SD15Family.main_file_keys)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    consumed = _comfy_consumes(_comfy_key_map("sd15", shapes), tensors)
    assert len(tensors) == 2 * len(shapes) == 2 * (192 + 48)
    assert sorted(set(tensors) - consumed) == [], "ComfyUI leaves these keys unloaded"


def test_an_inpainting_single_file_is_refused_in_words(tmp_path):
    from safetensors.torch import save_file

    from core.errors import UserError
    from families.sd15_loading import require_text_to_image

    keys = {"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(1)}
    plain, inpainting = tmp_path / "plain.safetensors", tmp_path / "inpainting.safetensors"
    save_file({**keys, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, str(plain))
    save_file({**keys, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3)}, str(inpainting))
    require_text_to_image(plain)
    with pytest.raises(UserError, match="takes 9 input channels"):
        require_text_to_image(inpainting)
