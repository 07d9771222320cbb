"""The main ``loras/<name>.safetensors``: every tensor applied by diffusers and by ComfyUI's naming rules,
and still read by our own export/inspect."""

from __future__ import annotations

import json
import logging
import re
import warnings

import pytest
import torch
from safetensors import safe_open

from modules.lora_training.lora_layouts import split_down_key
from tests.demo_names import DEMO_FLUX_NAME, DEMO_SDXL_NAME

RANK, ALPHA = 4, 2.0
MODELS = {"sdxl": DEMO_SDXL_NAME, "flux": DEMO_FLUX_NAME}
HEADER = {"lora_studio.family": None, "lora_studio.trigger_word": "ohwx", "lora_studio.rank": "4"}


def _saved_family_lora(models_dir, family: str, path):
    """A family's LoRA on every target (text encoders included) with random non-zero A and B, saved."""
    from core.model_files import model_entry
    from families.flux import FluxFamily
    from families.sdxl import SDXLFamily

    cls = SDXLFamily if family == "sdxl" else FluxFamily
    trainer = cls(
        model_entry(models_dir, MODELS[family]), models_dir=models_dir, device="cpu", weight_dtype=torch.float32
    )
    trainer.add_lora(rank=RANK, alpha=ALPHA, targets="attention+feedforward", train_text_encoder=True)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in trainer.lora_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    trainer.save_lora(path, metadata={**HEADER, "lora_studio.family": family})
    return path


def _file_modules(path) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """{(component, module as the model names it): (down, up)} read back with our layout reader."""
    modules = {}
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        for key in keys:
            split = split_down_key(key)
            if split is None:
                continue
            component, _, module = split[2].partition(".")
            modules[(component, module)] = (handle.get_tensor(key).float(), handle.get_tensor(split[1]).float())
    return modules


def _layer(pipe, component: str, module: str):
    """The module as the model names it: transformers 5 keeps ``text_model.`` in CLIPTextModelWithProjection only."""
    model = getattr(pipe, component)
    return model.get_submodule(
        module if hasattr(model, "get_submodule") and module in dict(model.named_modules()) else f"text_model.{module}"
    )


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_main_file_applies_every_tensor_in_a_plain_diffusers_pipeline(models_dir, tmp_path, family, caplog):
    from diffusers import FluxPipeline, StableDiffusionXLPipeline

    path = _saved_family_lora(models_dir, family, tmp_path / "main.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata, keys = handle.metadata(), list(handle.keys())
        assert {handle.get_slice(k).get_dtype() for k in keys} == {"F16"}
    packed = json.loads(metadata["lora_adapter_metadata"])
    denoiser = "unet" if family == "sdxl" else "transformer"
    assert packed[f"{denoiser}.r"] == RANK and packed[f"{denoiser}.lora_alpha"] == ALPHA
    assert packed["text_encoder.lora_alpha"] == ALPHA
    assert metadata["lora_studio.family"] == family and metadata["format"] == "pt"
    assert all(".text_model." in k for k in keys if k.startswith("text_encoder")), "the spelling ComfyUI maps"
    modules = _file_modules(path)
    assert len(modules) * 2 == len(keys), "every tensor is one half of a down/up pair"
    assert {c for c, _ in modules} >= {denoiser, "text_encoder"}

    pipe = (StableDiffusionXLPipeline if family == "sdxl" else FluxPipeline).from_pretrained(
        str(models_dir / MODELS[family])
    )
    before = {key: _layer(pipe, *key).weight.detach().clone() for key in modules}
    caplog.clear()
    with warnings.catch_warnings(record=True) as raised, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        pipe.load_lora_weights(str(path), adapter_name="main")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert not [w for w in raised if "key" in str(w.message).lower()], [str(w.message) for w in raised]
    with_lora = {
        (component, name.removeprefix("text_model."))
        for component in (denoiser, "text_encoder", "text_encoder_2")
        if getattr(pipe, component, None) is not None
        for name, layer in getattr(pipe, component).named_modules()
        if hasattr(layer, "lora_A") and "main" in layer.lora_A
    }
    assert with_lora == set(modules), "each module of the file got a LoRA layer, and no other module did"
    pipe.fuse_lora(
        components=[denoiser, "text_encoder", "text_encoder_2"][: 3 if family == "sdxl" else 2], adapter_names=["main"]
    )
    for key, (down, up) in modules.items():
        layer = _layer(pipe, *key)
        change = getattr(layer, "base_layer", layer).weight.detach().float() - before[key].float()
        expected = up @ down * (ALPHA / RANK)
        assert torch.allclose(change, expected, atol=1e-5, rtol=1e-3), key


def test_export_and_inspect_read_the_main_file(models_dir, tmp_path):
    from modules.lora_training.export import export_lora, inspect_lora, read_lora

    path = _saved_family_lora(models_dir, "sdxl", tmp_path / "main.safetensors")
    lora = read_lora(path)
    assert lora.family == "sdxl" and lora.format == "diffusers"
    assert all(module.parts and module.alpha == ALPHA for module in lora.modules)
    parts = lora.parts()
    assert any(p.endswith(".attn1.to_out.0") for p in parts) and any(p.endswith(".ff.net.2") for p in parts)
    assert any(p.startswith("text_encoder_2.encoder.layers.") for p in parts)
    report = inspect_lora(path)
    assert f"SDXL LoRA, diffusers format, {len(lora.modules)} layers" in report
    assert "trigger words: ohwx" in report and "cannot map" not in report
    result = export_lora(path, fmt="kohya", out=tmp_path / "webui.safetensors")
    assert result.verification.ok and result.verification.layers == len(parts)


# ----- ComfyUI's key map, as read in Comfy-Org/ComfyUI comfy/lora.py and comfy/utils.py ----------------------------
# model_lora_keys_unet (SDXL): for each U-Net weight that unet_to_diffusers lists, "unet." + its diffusers name with
# ".to_" → ".processor.to_" and a trailing ".to_out.0" → ".to_out" (also without "unet.", and lora_unet_<a_b_c>).
# model_lora_keys_unet (Flux): "transformer." + every diffusers name flux_to_diffusers lists (blocks' linears).
# model_lora_keys_clip: "text_encoder.text_model.encoder.layers.N.<self_attn.q_proj|...|mlp.fc1|mlp.fc2>" for clip_l,
# "text_encoder_2.text_model..." for clip_g when clip_l is present.
# weight_adapter/lora.py LoRAAdapter.load: a module x is read from x.lora_up/x.lora_down, x_lora.up/x_lora.down,
# x.lora_B/x.lora_A, x.lora.up/x.lora.down or x.lora_linear_layer.up/.down (".weight" each); x.alpha when present.
COMFY_PAIRS = (
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
)
CLIP_MODULES = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")
SDXL_UNET_MAPPED = re.compile(
    r"(?:down_blocks|up_blocks|mid_block)\..*attentions\.\d+\.(?:proj_in|proj_out|transformer_blocks\.\d+\.(?:attn[12]\.(?:to_[qkv]|to_out\.0)|ff\.net\.(?:0\.proj|2)))$"
)
FLUX_MAPPED = re.compile(
    r"transformer_blocks\.\d+\.(?:attn\.(?:to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|norm1(?:_context)?\.linear"
    r"|ff(?:_context)?\.net\.(?:0\.proj|2))|single_transformer_blocks\.\d+\.(?:attn\.to_[qkv]|proj_mlp|proj_out|norm\.linear)"
)


def _comfy_key_map(family: str, shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """LoRA module name → (out, in) of the weight ComfyUI patches, for the full-size modules in ``shapes``."""
    key_map = {}
    for name, shape in shapes.items():
        component, _, module = name.partition(".")
        if component == "unet" and SDXL_UNET_MAPPED.fullmatch(module):
            comfy = "unet." + module.replace(".to_", ".processor.to_")
            key_map[comfy[: -len(".0")] if comfy.endswith(".to_out.0") else comfy] = shape
        elif component == "transformer" and FLUX_MAPPED.fullmatch(module):
            key_map[name] = shape
        elif component in ("text_encoder", "text_encoder_2"):
            layer = re.fullmatch(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(.+)", module)
            if layer and layer[2] in CLIP_MODULES and int(layer[1]) < 32:
                key_map[f"{component}.text_model.encoder.layers.{layer[1]}.{layer[2]}"] = shape
    return key_map


def _comfy_consumes(key_map: dict[str, tuple[int, int]], tensors: dict[str, tuple[int, ...]]) -> set[str]:
    consumed = set()
    for module, (out_features, in_features) in key_map.items():
        for up, down in COMFY_PAIRS:
            if module + up in tensors:
                assert tensors[module + up][0] == out_features and tensors[module + down][1] == in_features, module
                consumed |= {module + up, module + down}
                break
    return consumed


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_comfyui_key_map_consumes_every_tensor_of_a_full_size_main_file(tmp_path, family):
    from peft import LoraConfig

    from modules.lora_training.main_file import write_main_lora
    from tests.lora_files import (
        FLUX_ATTENTION,
        FLUX_FEEDFORWARD,
        SDXL_ATTENTION,
        SDXL_FEEDFORWARD,
        full_size_flux_linears,
        full_size_sdxl_linears,
    )

    if family == "sdxl":
        shapes = full_size_sdxl_linears(SDXL_ATTENTION + SDXL_FEEDFORWARD, text_encoders=True)
    else:
        from transformers import CLIPTextConfig, CLIPTextModel

        from families.sdxl_configs import SDXL_TEXT_ENCODER  # Flux's CLIP is SDXL's first encoder (CLIP-L)

        shapes = full_size_flux_linears((*FLUX_ATTENTION, *FLUX_FEEDFORWARD, "single.proj_out"))
        with torch.device("meta"):
            clip = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER))
        for name, layer in clip.named_modules():
            if name.endswith(("q_proj", "k_proj", "v_proj", "out_proj")):
                shapes[f"text_encoder.{name}"] = (layer.out_features, layer.in_features)
    layers: dict[str, dict] = {}
    for name, (out_features, in_features) in shapes.items():
        component, _, module = name.partition(".")
        part = layers.setdefault(component, {})
        part[f"{module}.lora_A.weight"] = torch.zeros(1, in_features)
        part[f"{module}.lora_B.weight"] = torch.zeros(out_features, 1)
    configs = {c: LoraConfig(r=1, lora_alpha=1, target_modules=["q_proj"]).to_dict() for c in layers}
    path = tmp_path / "full.safetensors"
    from families import family as model_family

    write_main_lora(path, layers, configs, metadata={}, keys=model_family(family).main_file_keys)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    consumed = _comfy_consumes(_comfy_key_map(family, shapes), tensors)
    assert len(tensors) == 2 * len(shapes)
    assert sorted(set(tensors) - consumed) == [], "ComfyUI leaves these keys unloaded"
    text_layers = 12 if family == "flux" else 12 + 32
    assert sum(k.startswith("text_encoder") for k in consumed) == 2 * 4 * text_layers
