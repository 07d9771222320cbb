"""Flux webui copies in the Black Forest Labs layout kohya sd-scripts and ComfyUI read, and inspect's alphas.

The expected names come from the project's own BFL converter applied to the full-size
Flux.1 dev transformer (on the meta device); the weight changes are recomputed here from
the diffusers file, independently of the export code.
"""

import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from families.flux_layout import diffusers_to_original
from modules.lora_training.export import export_lora, inspect_lora, read_lora
from tests.lora_files import (
    FLUX_ATTENTION,
    FLUX_DEV,
    FLUX_FEEDFORWARD,
    TEXT_ENCODER_TARGETS,
    _targeted_linears,
    full_size_flux,
    full_size_flux_linears,
    random_lora_layers,
    write_app_lora,
)

RANK, ALPHA = 4, 2.0
# Full block counts, narrow width: the names are the full-size model's, the tensors stay small.
NARROW = {"attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32}


@pytest.fixture(scope="module")
def bfl_modules() -> set[str]:
    """Every BFL weight name of the full-size transformer, by the project's own converter."""
    state = full_size_flux().state_dict()
    return {k[: -len(".weight")] for k in diffusers_to_original(state) if k.endswith(".weight")}


def _clip_l_linears() -> dict[str, tuple[int, int]]:
    from transformers import CLIPTextConfig, CLIPTextModel

    from families.sdxl_configs import SDXL_TEXT_ENCODER

    with torch.device("meta"):
        clip = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER))
    return _targeted_linears(clip, TEXT_ENCODER_TARGETS, "text_encoder")


def _narrow_flux_linears(targets) -> dict[str, tuple[int, int]]:
    return full_size_flux_linears(targets, **NARROW)


# diffusers' saver writes PEFT names for the denoiser and its older names for text encoders
_DOWN_UP = {
    ".lora_A.weight": ".lora_B.weight",
    ".lora.down.weight": ".lora.up.weight",
    ".lora_linear_layer.down.weight": ".lora_linear_layer.up.weight",
}


def _peft_name(key: str) -> str:
    # diffusers' kohya reader names CLIP layers the old attention-processor way (to_q_lora.down)
    key = re.sub(r"\.to_(q|k|v|out)_lora\.(down|up)\.weight$", r".\1_proj.lora_\2.weight", key)
    key = key.replace(".lora_down.weight", ".lora_A.weight").replace(".lora_up.weight", ".lora_B.weight")
    for down, up in _DOWN_UP.items():
        key = key.replace(down, ".lora_A.weight").replace(up, ".lora_B.weight")
    return key


def _source_deltas(path) -> dict[str, torch.Tensor]:
    """Per diffusers module, up @ down * alpha / rank, straight from the diffusers file."""
    import json

    deltas = {}
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["lora_adapter_metadata"])
        for key in handle.keys():  # noqa: SIM118
            down_suffix = next((s for s in _DOWN_UP if key.endswith(s)), None)
            if down_suffix is None:
                continue
            module = key[: -len(down_suffix)].replace(".text_model.", ".")
            component = module.split(".")[0]
            scale = meta[f"{component}.lora_alpha"] / meta[f"{component}.r"]
            up = handle.get_tensor(key[: -len(down_suffix)] + _DOWN_UP[down_suffix]).float()
            deltas[module] = up @ handle.get_tensor(key).float() * scale
    return deltas


_PARTS = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",),
    "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
}


def _expected_parts(name: str) -> list[str]:
    if m := re.fullmatch(r"lora_te1_text_model_encoder_layers_(\d+)_self_attn_(\w+)", name):
        return [f"text_encoder.encoder.layers.{m[1]}.self_attn.{m[2]}"]
    m = re.fullmatch(r"lora_unet_(double|single)_blocks_(\d+)_(\w+)", name)
    block = "transformer_blocks" if m[1] == "double" else "single_transformer_blocks"
    return [f"transformer.{block}.{m[2]}.{part}" for part in _PARTS[m[3]]]


@pytest.mark.parametrize("targets", [FLUX_ATTENTION, FLUX_ATTENTION + FLUX_FEEDFORWARD + ("single.proj_out",)])
def test_flux_webui_copy_uses_bfl_names_fused_layout_and_same_changes(tmp_path, bfl_modules, targets):
    shapes = {**_narrow_flux_linears(targets), **_clip_l_linears()}
    source = write_app_lora(
        tmp_path / "flux.safetensors", random_lora_layers(shapes, rank=RANK), family="flux", rank=RANK, alpha=ALPHA
    )
    result = export_lora(source, fmt="kohya")
    assert result.verification.ok and result.verification.layers == len(shapes)

    with safe_open(str(result.path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        meta = handle.metadata()
    names = {k.split(".")[0] for k in tensors}
    unet = {n for n in names if n.startswith("lora_unet_")}
    assert unet <= {"lora_unet_" + b.replace(".", "_") for b in bfl_modules}
    wanted = {"img_attn_qkv", "img_attn_proj", "txt_attn_qkv", "txt_attn_proj", "linear1"}
    if "ff.net.2" in targets:
        wanted |= {"img_mlp_0", "img_mlp_2", "txt_mlp_0", "txt_mlp_2", "linear2"}
    assert unet == {
        "lora_unet_" + b.replace(".", "_")
        for b in bfl_modules
        if re.sub(r"^(double|single)_blocks\.\d+\.", "", b).replace(".", "_") in wanted
    }
    assert len([n for n in names if n.startswith("lora_te1_text_model_encoder_layers_")]) == 12 * 4
    assert meta["ss_network_module"] == "networks.lora_flux" and meta["ss_base_model_version"] == "flux1"
    assert meta["ss_network_dim"] == str(RANK) and meta["ss_network_alpha"] == f"{ALPHA:g}"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"

    deltas = _source_deltas(source)
    for name in sorted(names):
        down, up = tensors[f"{name}.lora_down.weight"].float(), tensors[f"{name}.lora_up.weight"].float()
        alpha = tensors[f"{name}.alpha"].item()
        parts = _expected_parts(name)
        assert down.shape[0] == RANK * len(parts) and alpha == ALPHA * len(parts), name
        widths = [deltas[p].shape[0] if p in deltas else None for p in parts]
        widths = [w if w is not None else up.shape[0] - sum(x for x in widths if x) for w in widths]
        expected = torch.cat([deltas.get(p, torch.zeros(w, down.shape[1])) for p, w in zip(parts, widths, strict=True)])
        torch.testing.assert_close(up @ down * alpha / down.shape[0], expected, atol=2e-4, rtol=2e-3)
        start = 0
        for index, width in enumerate(widths):  # block-diagonal: part i's rows only use part i's rank
            block = up[start : start + width]
            assert not block[:, : index * RANK].any() and not block[:, (index + 1) * RANK :].any(), name
            start += width
    single = "lora_unet_single_blocks_0_linear1"
    assert tensors[f"{single}.lora_up.weight"].shape == (7 * 32, 4 * RANK)
    if "proj_mlp" not in targets:
        assert not tensors[f"{single}.lora_up.weight"][3 * 32 :].any(), "absent MLP part: zero rows"


def test_bfl_copy_reads_back_and_converts_to_diffusers(tmp_path):
    shapes = _narrow_flux_linears(FLUX_ATTENTION + FLUX_FEEDFORWARD)
    source = write_app_lora(
        tmp_path / "flux.safetensors", random_lora_layers(shapes, rank=RANK), family="flux", rank=RANK, alpha=ALPHA
    )
    webui = export_lora(source, fmt="kohya").path
    back = export_lora(webui, fmt="diffusers", out=tmp_path / "back.safetensors")
    assert back.verification.ok and back.verification.layers == len(shapes)
    deltas = _source_deltas(source)
    with safe_open(str(back.path), framework="pt") as handle:
        for module, delta in deltas.items():
            up = handle.get_tensor(f"{module}.lora_B.weight").float()
            torch.testing.assert_close(
                up @ handle.get_tensor(f"{module}.lora_A.weight").float(), delta, atol=2e-4, rtol=2e-3
            )
            assert handle.get_slice(f"{module}.lora_A.weight").get_shape()[0] == RANK, "fused ranks split back"


def test_onetrainer_and_comfyui_flux_names_read_in(tmp_path, bfl_modules):
    shapes = _narrow_flux_linears(("to_q", "to_k", "proj_mlp"))
    layers = random_lora_layers(shapes, rank=RANK)
    onetrainer, comfy = {}, {}
    for key, value in layers.items():
        module, kind = key.rsplit(".lora_", 1)
        down = "lora_down" if kind.startswith("A") else "lora_up"
        name = "lora_transformer_" + module[len("transformer.") :].replace(".", "_")
        onetrainer[f"{name}.{down}.weight"] = value
        onetrainer[f"{name}.alpha"] = torch.tensor(ALPHA)
    save_file(onetrainer, str(tmp_path / "onetrainer.safetensors"))
    lora = read_lora(tmp_path / "onetrainer.safetensors")
    assert lora.family == "flux" and lora.format == "kohya" and set(lora.parts()) == set(shapes)
    webui = export_lora(tmp_path / "onetrainer.safetensors", fmt="kohya")
    assert webui.verification.ok and webui.verification.layers == len(shapes)
    dotted = {"lora_unet_" + b.replace(".", "_"): b for b in bfl_modules}
    with safe_open(str(webui.path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            name, _, suffix = key.partition(".")
            comfy[f"diffusion_model.{dotted[name]}.{suffix}"] = handle.get_tensor(key)
    assert "diffusion_model.single_blocks.0.linear1.alpha" in comfy
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    lora = read_lora(tmp_path / "comfy.safetensors")
    assert lora.format == "comfyui" and {m.kind for m in lora.modules} == {"fused"}
    assert export_lora(tmp_path / "comfy.safetensors", fmt="diffusers").verification.layers == len(shapes)


def test_inspect_prints_the_alphas_written_in_kohya_files(tmp_path):
    shapes = _narrow_flux_linears(FLUX_ATTENTION)
    source = write_app_lora(
        tmp_path / "flux.safetensors", random_lora_layers(shapes, rank=RANK), family="flux", rank=RANK, alpha=ALPHA
    )
    report = inspect_lora(export_lora(source, fmt="kohya").path)
    assert "Flux LoRA, kohya format" in report
    assert "rank 12, alpha 6: 38 layers (fused q/k/v), alpha/rank 0.5" in report  # img and txt qkv of 19 blocks
    assert "rank 16, alpha 8: 38 layers (fused q/k/v/MLP), alpha/rank 0.5" in report
    assert "rank 4, alpha 2: 38 layers, alpha/rank 0.5" in report  # img_attn_proj and txt_attn_proj
    assert "alpha missing" not in report and "WARNING" not in report

    rows = {}
    for index, alpha in enumerate((1.0, 3.0)):
        name = f"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_{'kv'[index]}"
        rows[f"{name}.lora_down.weight"] = torch.randn(8, 2048)
        rows[f"{name}.lora_up.weight"] = torch.randn(640, 8)
        rows[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(rows, str(tmp_path / "sdxl.safetensors"))
    report = inspect_lora(tmp_path / "sdxl.safetensors")
    assert "SDXL LoRA, kohya format, 2 layers" in report
    assert "rank 8, alpha 1: 1 layers, alpha/rank 0.125" in report
    assert "rank 8, alpha 3: 1 layers, alpha/rank 0.375" in report


@pytest.mark.slow
def test_diffusers_reads_the_full_size_bfl_copy_as_the_source(tmp_path):
    """Diffusers' own kohya-Flux converter (full width only) gives back every layer's change."""
    from diffusers import FluxPipeline

    shapes = full_size_flux_linears(FLUX_ATTENTION + FLUX_FEEDFORWARD + ("single.proj_out",))
    shapes.update(_clip_l_linears())
    layers = random_lora_layers(shapes, rank=RANK)
    source = write_app_lora(tmp_path / "flux.safetensors", layers, family="flux", rank=RANK, alpha=ALPHA)
    webui = export_lora(source, fmt="kohya").path
    with safe_open(str(webui), framework="pt") as handle:
        converted = FluxPipeline.lora_state_dict({k: handle.get_tensor(k) for k in handle.keys()})  # noqa: SIM118
    converted = {_peft_name(k.replace(".text_model.", ".")): v for k, v in converted.items()}
    probe = torch.Generator().manual_seed(1)
    checked = 0
    for key in converted:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        down, up = converted[key].float(), converted[f"{module}.lora_B.weight"].float()
        x = torch.randn(down.shape[1], 3, generator=probe)
        got = up @ (down @ x)  # the change applied to random inputs: equal maps, equal products
        if f"{module}.lora_A.weight" in layers:
            src_down, src_up = layers[f"{module}.lora_A.weight"].float(), layers[f"{module}.lora_B.weight"].float()
            expected = src_up @ (src_down @ x) * ALPHA / RANK
            checked += 1
        else:
            expected = torch.zeros_like(got)  # a part the LoRA does not change (zero block)
        torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)
    assert checked == len(shapes)
    assert FLUX_DEV["num_single_layers"] == 38
