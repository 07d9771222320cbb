"""Generate applies LoKr and LoHa files in the LyCORIS (webui) layout that other tools write.

The files are built here as kohya sd-scripts + LyCORIS write them: webui module names written out by hand
(original SDXL block names, ``lora_te1_``/``lora_te2_`` CLIP names, Flux's ``lora_transformer_`` and kohya's
Black Forest Labs ``lora_unet_`` names), Kronecker factors shaped by LyCORIS' factorisation. The reference is
the base model with each layer's weight replaced by W + scale·ΔW, ΔW and scale as ComfyUI computes them
(re-implemented below), rendered by the same Generate; each adapted layer's change is also compared exactly.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from peft.tuners.lokr.layer import factorization
from safetensors.torch import save_file

from core.adapter_files import adapter_left, load_lora_file
from core.errors import UserError
from core.model_manager import GenerationRequest, LoraChoice, ModelManager
from tests.demo_names import DEMO_FLUX_NAME, DEMO_SD15_NAME, DEMO_SDXL_NAME

MODELS = {"sdxl": DEMO_SDXL_NAME, "flux": DEMO_FLUX_NAME, "sd15": DEMO_SD15_NAME}
# webui name -> (component, diffusers module), as ComfyUI's key map places them.
SDXL_NAMES = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (
        "unet",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    ),
    "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k": (
        "unet",
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
    ),
    "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj": (
        "unet",
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    ),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ("text_encoder", "encoder.layers.0.self_attn.q_proj"),
    "lora_te2_text_model_encoder_layers_0_mlp_fc1": ("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1"),
    "lora_unet_output_blocks_2_2_conv": ("unet", "up_blocks.0.upsamplers.0.conv"),  # a 3x3 convolution
    "lora_unet_input_blocks_1_0_in_layers_2": ("unet", "down_blocks.0.resnets.0.conv1"),
}
FLUX_NAMES = {
    "lora_transformer_transformer_blocks_0_attn_add_q_proj": ("transformer", "transformer_blocks.0.attn.add_q_proj"),
    "lora_unet_double_blocks_0_img_attn_proj": ("transformer", "transformer_blocks.0.attn.to_out.0"),
    "lora_unet_double_blocks_0_txt_mlp_2": ("transformer", "transformer_blocks.0.ff_context.net.2"),
    "lora_unet_single_blocks_1_linear2": ("transformer", "single_transformer_blocks.1.proj_out"),
    "lora_te1_text_model_encoder_layers_0_self_attn_v_proj": ("text_encoder", "encoder.layers.0.self_attn.v_proj"),
}
ATTENTION = tuple(f"attn.to_{x}" for x in "qkv")
FLUX_FUSED = {  # kohya's fused Black Forest Labs layers: the diffusers layers they stack, in row order
    "lora_unet_double_blocks_0_img_attn_qkv": ("transformer", tuple(f"transformer_blocks.0.{a}" for a in ATTENTION)),
    "lora_unet_single_blocks_0_linear1": (
        "transformer",
        (*(f"single_transformer_blocks.0.{a}" for a in ATTENTION), "single_transformer_blocks.0.proj_mlp"),
    ),
}

SD15_NAMES = {  # kohya's SD 1.x names are diffusers' own; proj_in is a 1x1 convolution there
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (
        "unet",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    ),
    "lora_unet_down_blocks_0_attentions_0_proj_in": ("unet", "down_blocks.0.attentions.0.proj_in"),
    "lora_te_text_model_encoder_layers_0_self_attn_k_proj": ("text_encoder", "encoder.layers.0.self_attn.k_proj"),
}
NAMES = {"sdxl": SDXL_NAMES, "flux": FLUX_NAMES | FLUX_FUSED, "sd15": SD15_NAMES}


# ----- files as LyCORIS writes them ----------------------------------------------------------------
def _targets(manager, name: str, names: dict) -> list[tuple[torch.nn.Module, slice]]:
    """(pipeline layer, its rows in the webui layer) of each layer a webui layer changes (a fused one: several)."""
    component, modules = names[name]
    out, start = [], 0
    for module in (modules,) if isinstance(modules, str) else modules:
        layer = getattr(manager._pipe, component).get_submodule(module)
        out.append((layer, slice(start, start + layer.weight.shape[0])))
        start += layer.weight.shape[0]
    return out


def _shape(manager, name: str, names: dict) -> tuple[int, ...]:
    targets = _targets(manager, name, names)
    return (targets[-1][1].stop, *targets[0][0].weight.shape[1:])


def lokr_layer(shape, *, kind: str, rank: int = 1, alpha=None, factor: int = -1, seed: int = 0, std: float = 0.5):
    """LyCORIS' LoKr tensors of one Linear or Conv layer (weight ``shape``): w1 (out_l, in_m) and w2 (out_k,
    in_n, *kernel), each full or a rank-``rank`` product (w2_b: (rank, in_n·kernel)); ``kind`` is "w2" (w2
    decomposed), "full" or "both"."""
    out_l, out_k = factorization(shape[0], factor)
    in_m, in_n = factorization(shape[1], factor)
    kernel = tuple(shape[2:])
    g = torch.Generator().manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, generator=g) * std

    t = (
        {"lokr_w1": rand(out_l, in_m)}
        if kind != "both"
        else {"lokr_w1_a": rand(out_l, rank), "lokr_w1_b": rand(rank, in_m)}
    )
    t |= (
        {"lokr_w2": rand(out_k, in_n, *kernel)}
        if kind == "full"
        else {"lokr_w2_a": rand(out_k, rank), "lokr_w2_b": rand(rank, in_n * math.prod(kernel))}
    )
    return t | ({} if alpha is None else {"alpha": torch.tensor(float(alpha))})


def loha_layer(shape, *, rank: int, alpha=None, seed: int = 0, std: float = 0.8):
    """LyCORIS' LoHa tensors of one layer (a convolution's flattened: (rank, in·kernel), no Tucker core)."""
    g = torch.Generator().manual_seed(seed)
    width = math.prod(shape[1:])
    t = {
        "hada_w1_a": torch.randn(shape[0], rank, generator=g) * std,
        "hada_w1_b": torch.randn(rank, width, generator=g) * std,
        "hada_w2_a": torch.randn(shape[0], rank, generator=g) * std,
        "hada_w2_b": torch.randn(rank, width, generator=g) * std,
    }
    return t | ({} if alpha is None else {"alpha": torch.tensor(float(alpha))})


def write_webui(path, layers: dict[str, dict], *, args: dict | None = None):
    tensors = {
        f"{name}.{suffix}": value.to(torch.float16 if suffix != "alpha" else torch.float32)
        for name, t in layers.items()
        for suffix, value in t.items()
    }
    metadata = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args or {})}
    save_file(tensors, str(path), metadata=metadata)
    return path


# ----- ComfyUI's reading, re-implemented ----------------------------------------------------------
def comfy_delta(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """ΔW·scale at strength 1: LoHa (w1a w1b)⊙(w2a w2b)·alpha/rank(w1b); LoKr kron(w1, w2)·alpha/dim, dim the
    rank of the decomposed factor (w2's when both are); scale 1 when there is no alpha or no decomposed factor."""
    t = {k: v.double() for k, v in t.items()}
    alpha = t["alpha"].item() if "alpha" in t else None
    if "hada_w1_a" in t:
        diff = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return diff * (alpha / t["hada_w1_b"].shape[0] if alpha is not None else 1.0)
    dim, w1, w2 = None, t.get("lokr_w1"), t.get("lokr_w2")
    if w1 is None:
        dim, w1 = t["lokr_w1_b"].shape[0], t["lokr_w1_a"] @ t["lokr_w1_b"]
    if w2 is None:
        dim, w2 = t["lokr_w2_b"].shape[0], t["lokr_w2_a"] @ t["lokr_w2_b"]
    if w2.dim() == 4:  # a convolution's full w2: w1 gets kernel dimensions of 1
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2) * (alpha / dim if alpha is not None and dim is not None else 1.0)


# ----- rendering ----------------------------------------------------------------------------------
def render(manager, family: str, loras=()) -> np.ndarray:
    request = GenerationRequest(
        model=MODELS[family], prompt="ohwx, a photo", steps=3, width=64, height=64, seed=5, loras=loras
    )
    return np.asarray(manager.generate(request).image, dtype=np.float32)


def reference(manager, family: str, layers: dict, names: dict) -> np.ndarray:
    """The base model with each layer's weight replaced by W + ComfyUI's ΔW, rendered; weights restored."""
    saved = []
    with torch.no_grad():
        for name, tensors in layers.items():
            half = {k: v.to(torch.float16).float() if k != "alpha" else v for k, v in tensors.items()}
            delta = comfy_delta(half).reshape(_shape(manager, name, names))
            for layer, rows in _targets(manager, name, names):
                layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
                saved.append((layer, layer.weight.detach().clone()))
                layer.weight += delta[rows].to(layer.weight.dtype)
    try:
        return render(manager, family)
    finally:
        with torch.no_grad():
            for layer, weight in saved:
                layer.weight.copy_(weight)


def check_layers(manager, lora: str, layers: dict, names: dict) -> None:
    """Each adapted layer's change, as peft computes it, is ComfyUI's."""
    adapter = manager.loaded_adapter(lora)
    for name, tensors in layers.items():
        half = {k: v.to(torch.float16).float() if k != "alpha" else v for k, v in tensors.items()}
        delta = comfy_delta(half).reshape(_shape(manager, name, names))
        for layer, rows in _targets(manager, name, names):
            got = layer.get_delta_weight(adapter).double()
            assert torch.allclose(got, delta[rows], atol=1e-6, rtol=1e-5), name


@pytest.fixture(scope="module")
def managers(models_dir, tmp_path_factory):
    """A ModelManager per family over one loras folder, its base image rendered once."""
    loras = tmp_path_factory.mktemp("lycoris-loras")
    out = {}
    for family in MODELS:
        manager = ModelManager(models_dir=models_dir, loras_dir=loras, device="cpu")
        out[family] = (manager, render(manager, family))
    return loras, out


def sdxl_files(manager) -> dict[str, tuple[dict, dict]]:
    """{file: (layers, ss_network_args)}: LoKr w1 full + w2 decomposed, both full, a text-encoder layer each."""
    n = list(SDXL_NAMES)
    shape = {name: _shape(manager, name, SDXL_NAMES) for name in n}
    lokr = {
        n[0]: lokr_layer(shape[n[0]], kind="w2", rank=2, alpha=1.0, seed=1),
        n[1]: lokr_layer(shape[n[1]], kind="w2", rank=3, alpha=4.5, seed=2),
        n[2]: lokr_layer(shape[n[2]], kind="full", alpha=7.0, seed=3, std=0.2),  # alpha ignored: both full
        n[3]: lokr_layer(shape[n[3]], kind="w2", rank=1, seed=4),  # no alpha: scale 1
        n[4]: lokr_layer(shape[n[4]], kind="full", seed=5, std=0.2),
        n[5]: lokr_layer(shape[n[5]], kind="full", alpha=2.0, seed=12, std=0.2),  # 3x3 conv, w2 (8, 8, 3, 3)
        n[6]: lokr_layer(shape[n[6]], kind="w2", rank=2, alpha=1.0, seed=13),  # 3x3 conv, w2_b (2, 8 * 9)
    }
    factor4 = {  # decompose_both and a factor of 4 (the balanced split of 64 is 8 x 8)
        n[0]: lokr_layer(shape[n[0]], kind="both", rank=1, alpha=0.5, factor=4, seed=6, std=0.6),
        n[1]: lokr_layer(shape[n[1]], kind="full", factor=4, seed=7, std=0.2),
        n[2]: lokr_layer(shape[n[2]], kind="w2", rank=3, alpha=3.0, factor=4, seed=8),
    }
    loha = {
        n[0]: loha_layer(shape[n[0]], rank=2, alpha=1.0, seed=9),
        n[1]: loha_layer(shape[n[1]], rank=3, alpha=6.0, seed=10),
        n[3]: loha_layer(shape[n[3]], rank=2, seed=11),  # no alpha: scale 1
        n[5]: loha_layer(shape[n[5]], rank=2, alpha=1.0, seed=14, std=0.4),  # 3x3 conv
    }
    return {
        "sdxl_lokr.safetensors": (lokr, {"algo": "lokr"}),
        "sdxl_lokr_factor4.safetensors": (factor4, {"algo": "lokr", "factor": "4"}),
        "sdxl_loha.safetensors": (loha, {"algo": "loha"}),
    }


def flux_files(manager) -> dict[str, tuple[dict, dict]]:
    n = list(FLUX_NAMES)
    shape = {name: _shape(manager, name, FLUX_NAMES) for name in n}
    lokr = {
        n[0]: lokr_layer(shape[n[0]], kind="w2", rank=2, alpha=1.0, seed=1),
        n[1]: lokr_layer(shape[n[1]], kind="full", alpha=2.0, seed=2, std=0.2),
        n[2]: lokr_layer(shape[n[2]], kind="w2", rank=3, alpha=3.0, seed=3),
        n[3]: lokr_layer(shape[n[3]], kind="full", seed=4, std=0.2),
        n[4]: lokr_layer(shape[n[4]], kind="w2", rank=2, alpha=2.0, seed=5),
    }
    n += list(FLUX_FUSED)  # LoHa only: a Hadamard product splits along rows, a Kronecker product does not
    shape = {name: _shape(manager, name, FLUX_NAMES | FLUX_FUSED) for name in n}
    loha = {name: loha_layer(shape[name], rank=2, alpha=1.0 + i, seed=10 + i) for i, name in enumerate(n)}
    return {"flux_lokr.safetensors": (lokr, {"algo": "lokr"}), "flux_loha.safetensors": (loha, {"algo": "loha"})}


def sd15_files(manager) -> dict[str, tuple[dict, dict]]:
    n = list(SD15_NAMES)
    shape = {name: _shape(manager, name, SD15_NAMES) for name in n}
    loha = {name: loha_layer(shape[name], rank=2, alpha=1.0 + i, seed=20 + i) for i, name in enumerate(n)}
    return {"sd15_loha.safetensors": (loha, {"algo": "loha"})}


FILES = {"sdxl": sdxl_files, "flux": flux_files, "sd15": sd15_files}


@pytest.mark.parametrize("family", list(MODELS))
def test_generate_applies_webui_lokr_and_loha_as_comfyui_does(managers, family):
    folder, by_family = managers
    manager, base = by_family[family]
    names = NAMES[family]
    files = FILES[family](manager)
    for file, (layers, args) in files.items():
        write_webui(folder / file, layers, args=args)
        info = manager.lora_info(file)
        assert info.family == family and not info.problem, info
        expected = reference(manager, family, layers, names)
        got = render(manager, family, (LoraChoice(file, 1.0),))
        check_layers(manager, file, layers, names)
        change, error = np.abs(expected - base), np.abs(got - expected)
        assert change.max() > 3 and change.mean() > 10 * error.mean(), f"{file}: the reference changes the image"
        assert error.max() <= 2, f"{file}: Generate renders the reference"
    zero = render(manager, family, (LoraChoice(file, 0.0),))
    assert np.array_equal(zero, base), "weight 0 gives the base image"
    half = render(manager, family, (LoraChoice(file, 0.5),))
    assert np.abs(half - base).max() > 1 and np.abs(half - got).max() > 1, "the weight slider scales it"


def test_the_factor_is_inferred_without_the_header(managers):
    """A LoKr with a non-default factor and no ss_network_args: the factor comes from the tensors' shapes."""
    from core.lycoris_files import lycoris_adapter

    manager = managers[1]["sdxl"][0]
    layers, _ = sdxl_files(manager)["sdxl_lokr_factor4.safetensors"]
    state = {f"{name}.{k}": v for name, t in layers.items() for k, v in t.items()}
    _, configs = lycoris_adapter(manager._pipe, state, {}, file="x.safetensors")
    assert configs["unet"].decompose_factor == 4 and configs["unet"].decompose_both


# ----- bad files: a clear UserError, nothing left injected -----------------------------------------
def _hostile(manager) -> dict[str, tuple[dict, str]]:
    n = list(SDXL_NAMES)
    shape = _shape(manager, n[0], SDXL_NAMES)
    good = lokr_layer(shape, kind="w2", rank=2, alpha=1.0)
    huge = lokr_layer(shape, kind="w2", rank=1)
    huge |= {"lokr_w2_a": torch.zeros(8, 5000), "lokr_w2_b": torch.zeros(5000, 8)}
    return {
        "nan_alpha": ({n[0]: good | {"alpha": torch.tensor(float("nan"))}}, "NaN or infinite"),
        "huge_alpha": ({n[0]: good | {"alpha": torch.tensor(1e9)}}, "alpha is not one number"),
        "two_alphas": ({n[0]: good | {"alpha": torch.ones(2)}}, "alpha is not one number"),
        "huge_rank": ({n[0]: huge}, "rank 5000"),
        "odd_shapes": ({n[0]: good | {"lokr_w2_b": torch.zeros(2, 3, 4)}}, "not matrices"),
        "wrong_size": ({n[0]: lokr_layer((48, 64), kind="w2", rank=2)}, "not a factorisation peft can build"),
        "loha_wrong_size": ({n[0]: loha_layer((64, 32), rank=2)}, "this model's layer needs"),
        "unknown_layer": ({"lora_unet_nowhere_to_q": good}, "no place in this SDXL model"),
        "mixed": (
            {n[0]: good, n[1]: {"lora_down.weight": torch.zeros(2, 80), "lora_up.weight": torch.zeros(64, 2)}},
            "mixes plain LoRA",
        ),
        "other_family": ({"lora_unet_double_blocks_0_img_attn_proj": good}, "Flux LoRA and the model is SDXL"),
        "many_tensors": (
            {n[0]: good} | {f"lora_unet_x{i}": {"alpha": torch.ones(())} for i in range(20_000)},
            "more than any LoRA for the loaded model",
        ),
        "many_layers": (
            {n[0]: good} | {f"lora_unet_x{i}": {"alpha": torch.ones(())} for i in range(300)},
            "more than this SDXL model's",
        ),
    }


def test_bad_webui_files_are_refused_clearly(managers, tmp_path):
    manager = managers[1]["sdxl"][0]
    for label, (layers, message) in _hostile(manager).items():
        path = write_webui(tmp_path / f"{label}.safetensors", layers)
        with pytest.raises(UserError, match=message) as caught:
            load_lora_file(manager._pipe, path, adapter_name="hostile")
        assert f"{label}.safetensors" in str(caught.value)
        assert not adapter_left(manager._pipe, "hostile"), label


def test_a_fused_flux_lokr_layer_is_refused_clearly(managers, tmp_path):
    manager = managers[1]["flux"][0]
    good = lokr_layer((96, 32), kind="w2", rank=2, alpha=1.0)
    path = write_webui(tmp_path / "fused.safetensors", {"lora_unet_double_blocks_0_img_attn_qkv": good})
    with pytest.raises(UserError, match="holds 3 layers of this model at once"):
        load_lora_file(manager._pipe, path, adapter_name="fused")
    assert not adapter_left(manager._pipe, "fused")
    twice = {
        name: loha_layer(shape, rank=2)
        for name, shape in (
            ("lora_unet_double_blocks_0_img_attn_qkv", (96, 32)),
            ("lora_transformer_transformer_blocks_0_attn_to_k", (32, 32)),
        )
    }
    path = write_webui(tmp_path / "twice.safetensors", twice)
    with pytest.raises(UserError, match="change the same layer"):
        load_lora_file(manager._pipe, path, adapter_name="twice")
    assert not adapter_left(manager._pipe, "twice")
    assert math.isfinite(render(manager, "flux").mean()), "the model stays usable"
