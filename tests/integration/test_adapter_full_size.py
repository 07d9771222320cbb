"""LoKr, LoHa and DoRA on full-size SDXL (U-Net and both CLIP encoders) and Flux.1 dev, built on the meta
device: peft's adapter attaches to the expected layers, the estimate counts its parameters exactly, and the
webui copy of a full-size main file names and shapes every layer as ComfyUI reads it, written and verified
layer by layer in bounded memory (a fresh process reports its peak resident memory above what it held).

The names ComfyUI accepts are written out here from its key map (comfy/lora.py ``model_lora_keys_unet`` /
``model_lora_keys_clip``, comfy/utils.py ``unet_to_diffusers`` / ``flux_to_diffusers``) and the shapes from its
adapters (comfy/weight_adapter/lokr.py, loha.py: the product reshaped to the target weight, which must hold as
many rows), not from this app's name tables."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from families import family as family_class
from families.adapter_configs import adapter_config, is_adapter_parameter
from modules.lora_training.estimate.memory import lora_parameter_count
from tests.conftest import ROOT
from tests.lora_files import full_size_flux

GIB = 2**30
TARGETS = "attention+feedforward"
# (family, network, rank, factor): LoKr with w2 split in two (rank 16), with both factors full (rank 64),
# with a fixed factor (8); LoHa; DoRA.
CASES = [
    (family, network, rank, factor)
    for family in ("sdxl", "flux")
    for network, rank, factor in (("lokr", 16, -1), ("lokr", 64, -1), ("lokr", 8, 8), ("loha", 8, -1), ("dora", 8, -1))
]
# Layers of full-size SDXL base: 70 transformer blocks x 10 linears + 11 attentions' proj_in/proj_out;
# CLIP-L 12 and CLIP-G 32 layers x 4 attention projections. Flux.1 dev: 19 double blocks x 12, 38 single x 5.
EXPECTED_LAYERS = {"unet": 722, "text_encoder": 48, "text_encoder_2": 128, "transformer": 418}


def meta_components(family: str, **overrides) -> dict[str, torch.nn.Module]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from families.sdxl_configs import SDXL_TEXT_ENCODER, SDXL_TEXT_ENCODER_2, SDXL_UNET

    if family == "flux":
        return {"transformer": full_size_flux(**overrides)}
    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel.from_config(SDXL_UNET),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2)),
        }


def adapted(case, **overrides) -> dict:
    """The full-size components with the adapter a run adds (the family's configs), on the meta device."""
    family, network, rank, factor = case
    kind = family_class(family)
    components = meta_components(family, **overrides)
    shapes = {k: tuple(v.shape) for k, v in components[kind.denoiser_attr].state_dict().items()}
    configs = {}
    with torch.device("meta"):
        for component, model in components.items():
            if component == kind.denoiser_attr:
                config = kind.denoiser_lora_config(
                    rank=rank, alpha=rank / 2, lora_targets=TARGETS, network=network, factor=factor
                )
            else:
                targets = list(kind.text_encoder_targets)
                config = adapter_config(network, rank=rank, alpha=rank / 2, targets=targets, factor=factor)
            model.add_adapter(config)
            configs[component] = config
    return {"components": components, "configs": configs, "shapes": shapes, "kind": kind}


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{n}{r}-f{k}" for f, n, r, k in CASES])
def case(request):
    return request.param, adapted(request.param)


def adapted_linears(model) -> dict[str, tuple[int, int]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        name: tuple(layer.get_base_layer().weight.shape)
        for name, layer in model.named_modules()
        if isinstance(layer, BaseTunerLayer)
    }


def expected_modules(component: str, model) -> set[str]:
    """The linears a user of the family expects adapted, by their diffusers/transformers names."""
    unet = r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2)"
    patterns = {
        "unet": rf"(down_blocks\.\d|mid_block|up_blocks\.\d)\.attentions\.\d\.(proj_in|proj_out|"
        rf"transformer_blocks\.\d+\.{unet})",
        "text_encoder": r"(text_model\.)?encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj",
        "transformer": r"(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|"
        r"add_v_proj|to_add_out)|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2)|"
        r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out))",
    }
    pattern = re.compile(patterns[component.removesuffix("_2")] + "$")
    return {name for name, _ in model.named_modules() if pattern.fullmatch(name)}


def test_the_adapter_attaches_to_the_expected_full_size_layers(case):
    (family, network, _, _), built = case
    for component, model in built["components"].items():
        layers = adapted_linears(model)
        assert len(layers) == EXPECTED_LAYERS[component], (component, len(layers))
        assert set(layers) == expected_modules(component, model), component
    assert all(p.device.type == "meta" for model in built["components"].values() for p in model.parameters()), (
        "nothing full-size was allocated"
    )


def test_the_estimate_counts_the_full_size_adapter_exactly(case):
    (_, network, rank, factor), built = case
    kind = built["kind"]
    denoiser = built["components"][kind.denoiser_attr]
    trained = sum(p.numel() for name, p in denoiser.named_parameters() if is_adapter_parameter(name))
    counted = lora_parameter_count(built["shapes"], kind.target_modules(TARGETS), rank, network=network, factor=factor)
    assert counted == trained > 0


# ----- the webui copy of a full-size main file -------------------------------------------------------
_EXPORT = r"""
import json, sys
from pathlib import Path
import torch
from modules.lora_training.lycoris_copy import export_lycoris_copy

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

shapes = json.loads(Path(sys.argv[3]).read_text())

def base_weight(part):  # a full-size base weight, one layer at a time (DoRA's copy needs it)
    return torch.full(shapes[part], 0.02) + torch.linspace(0, 0.01, shapes[part][0])[:, None]

try:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current resident size
except OSError:
    pass
before = status("VmRSS")
check = export_lycoris_copy(Path(sys.argv[1]), Path(sys.argv[2]), base_weight=base_weight)
print(json.dumps({"extra": status("VmHWM") - before, "layers": check.layers, "ok": check.ok}))
"""


def write_main_file(path, built, case) -> dict[str, tuple[int, int]]:
    """The main file as the trainer writes it, random values in the adapter's shapes (small: no full-size
    tensor); returns each adapted layer's (out, in) by ``<component>.<module>``."""
    from peft.utils import get_peft_model_state_dict

    from families.clip_names import without_clip_level
    from modules.lora_training.main_file import write_main_lora

    family, network, rank, _ = case
    generator = torch.Generator().manual_seed(0)
    layers, linears = {}, {}
    for component, model in built["components"].items():
        state = get_peft_model_state_dict(model)
        layers[component] = {k: torch.randn(v.shape, generator=generator) * 0.05 for k, v in state.items()}
        # Named as the main file's layers are (CLIP modules without transformers 4's ``text_model.`` level).
        linears |= {without_clip_level(f"{component}.{n}"): shape for n, shape in adapted_linears(model).items()}
    configs = {component: config.to_dict() for component, config in built["configs"].items()}
    metadata = {"lora_studio.family": family, "lora_studio.rank": str(rank), "lora_studio.alpha": f"{rank / 2:g}"}
    write_main_lora(
        path, layers, configs, metadata=metadata | {"lora_studio.network": network}, keys=built["kind"].main_file_keys
    )
    return linears


def comfy_names(family: str, part: str) -> set[str]:
    """The module names ComfyUI maps onto ``part`` (``<component>.<module>``) of full-size SDXL or Flux."""
    component, module = part.split(".", 1)
    if component.startswith("text_encoder"):
        layer = re.search(r"encoder\.layers\.(\d+)\.self_attn\.(\w+)$", module)
        te = "te2" if component == "text_encoder_2" else "te1"
        return {f"lora_{te}_text_model_encoder_layers_{layer[1]}_self_attn_{layer[2]}"}
    if family == "flux":
        flat = module.replace(".", "_")
        return {f"lora_transformer_{flat}", f"lycoris_{flat}", f"transformer.{module}"}
    # SDXL: diffusers' attention j of down level i is input block 3i+j+1 (two res blocks a level), the middle
    # one middle block 1, up level i's attention j output block 3i+j (three a level); then the same names.
    original = re.sub(
        r"^down_blocks\.(\d)\.attentions\.(\d)", lambda m: f"input_blocks.{3 * int(m[1]) + int(m[2]) + 1}.1", module
    )
    original = re.sub(
        r"^up_blocks\.(\d)\.attentions\.(\d)", lambda m: f"output_blocks.{3 * int(m[1]) + int(m[2])}.1", original
    )
    original = original.replace("mid_block.attentions.0", "middle_block.1")
    return {"lora_unet_" + original.replace(".", "_"), "lora_unet_" + module.replace(".", "_")}


def comfy_shape(network: str, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    """The (out, in) of the weight change ComfyUI builds from a module's tensors."""
    if network == "dora":
        assert shapes["dora_scale"] == (shapes["lora_up.weight"][0], 1), "one dora_scale a row"
        return shapes["lora_up.weight"][0], shapes["lora_down.weight"][1]
    if network == "loha":
        assert shapes["hada_w1_a"] == shapes["hada_w2_a"] and shapes["hada_w1_b"] == shapes["hada_w2_b"]
        return shapes["hada_w1_a"][0], shapes["hada_w1_b"][1]
    w1 = shapes.get("lokr_w1") or (shapes["lokr_w1_a"][0], shapes["lokr_w1_b"][1])
    w2 = shapes.get("lokr_w2") or (shapes["lokr_w2_a"][0], shapes["lokr_w2_b"][1])
    return w1[0] * w2[0], w1[1] * w2[1]


# A full-size copy is verified layer by layer: LoKr in seconds; LoHa (larger factors) and DoRA (one dense base
# weight per layer) take minutes on two busy cores.
SLOW = pytest.mark.slow
EXPORTS = [
    ("flux", "lokr", 16, -1),
    ("sdxl", "lokr", 64, -1),
    pytest.param(("sdxl", "lokr", 16, -1), marks=SLOW),
    pytest.param(("flux", "lokr", 8, 8), marks=SLOW),
    pytest.param(("sdxl", "loha", 8, -1), marks=SLOW),
    pytest.param(("flux", "loha", 8, -1), marks=SLOW),
    pytest.param(("sdxl", "dora", 8, -1), marks=SLOW),
    pytest.param(("flux", "dora", 8, -1), marks=SLOW),
]


@pytest.mark.parametrize("export", EXPORTS, ids=lambda c: f"{c[0]}-{c[1]}{c[2]}-f{c[3]}")
def test_the_full_size_webui_copy_names_and_shapes_every_layer_as_comfyui_reads_it(export, tmp_path):
    from model_formats.safetensors_stream import SafetensorsReader

    family, network, rank, factor = export
    main, copy = tmp_path / "main.safetensors", tmp_path / "webui.safetensors"
    linears = write_main_file(main, adapted(export), export)
    (tmp_path / "shapes.json").write_text(json.dumps(linears))
    args = [sys.executable, "-c", _EXPORT, str(main), str(copy), str(tmp_path / "shapes.json")]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{family} {network}: peak extra RSS {report['extra'] / GIB:.3f} GiB")
    assert report["ok"] and report["layers"] == len(linears)
    assert report["extra"] <= GIB
    with SafetensorsReader(copy) as reader:
        modules: dict[str, dict[str, tuple[int, ...]]] = {}
        for key, info in reader.tensors.items():
            name, _, suffix = key.partition(".")
            modules.setdefault(name, {})[suffix] = info.shape
    for part, shape in linears.items():
        name = next((n for n in comfy_names(family, part) if n in modules), None)
        assert name is not None, f"{part}: none of {sorted(comfy_names(family, part))} in the copy"
        tensors = modules.pop(name)
        assert comfy_shape(network, tensors) == shape, (part, tensors)
        decomposed = any(suffix.endswith("_b") for suffix in tensors) or network == "dora"
        assert ("alpha" in tensors) == decomposed, (part, tensors)
    assert not modules, f"modules no layer maps to: {list(modules)[:3]}"


@pytest.mark.parametrize("network", ["lokr", "loha", "dora"])
def test_a_copy_that_changes_one_layer_differently_is_refused(network, tmp_path):
    """The probe check sees a change in one value of one layer (a narrow Flux: every layer kind, small)."""
    from safetensors.torch import load_file, save_file

    from model_formats.safetensors_stream import SafetensorsReader
    from modules.lora_training.lycoris_copy import export_lycoris_copy, verify_copy

    case = ("flux", network, 4, -1)
    narrow = {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16}
    narrow |= {"joint_attention_dim": 64, "pooled_projection_dim": 32, "axes_dims_rope": [4, 6, 6]}
    main, copy = tmp_path / "main.safetensors", tmp_path / "webui.safetensors"
    linears = write_main_file(main, adapted(case, **narrow), case)
    bases, saved = {}, load_file(str(main))
    for part, shape in linears.items():  # rows as long as their DoRA magnitude, as peft starts them
        rows = torch.nn.functional.normalize(torch.randn(shape, generator=torch.Generator().manual_seed(1)), dim=1)
        magnitude = saved.get(f"{part}.lora_magnitude_vector.weight", torch.ones(shape[0]))
        bases[part] = rows * magnitude.float().abs().unsqueeze(1)
    assert export_lycoris_copy(main, copy, base_weight=bases.__getitem__).ok
    tensors = load_file(str(copy))
    with SafetensorsReader(copy) as reader:
        metadata = reader.metadata
    key = next(k for k in sorted(tensors) if k.endswith((".lokr_w2_b", ".hada_w2_a", ".dora_scale")))
    tensors[key][0, 0] += 0.1 * tensors[key].abs().max()
    save_file(tensors, str(copy), metadata=metadata)
    check = verify_copy(main, copy, network=network, family_name="flux", base_weight=bases.__getitem__)
    assert not check.ok, check
