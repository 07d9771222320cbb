"""LoKr, LoHa (peft's LyCORIS implementations) and DoRA on the tiny SDXL and Flux: one short training per
network and family, shared by every check: the loss goes down, the main file loads in a plain
diffusers + peft setup and changes the image, the webui copy (LyCORIS layout) changes each layer's weight
exactly as the main file does (computed here as ComfyUI computes it), and Generate applies it with the
weight slider."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from core.model_manager import GenerationRequest, LoraChoice, ModelManager
from modules.lora_training.config import TrainConfig, config_from_dict
from modules.lora_training.events import Log, StepDone
from modules.lora_training.train import train
from tests.demo_names import DEMO_FLUX_NAME, DEMO_SDXL_NAME
from tests.plain_pipelines import plain_image, plain_load, plain_pipeline

MODELS = {"sdxl": DEMO_SDXL_NAME, "flux": DEMO_FLUX_NAME}
CASES = [(family, network) for network in ("lokr", "loha", "dora") for family in ("sdxl", "flux")]
ADAPTER = "trained"


def _config(name: str, family: str, network: str, /, **options) -> TrainConfig:
    values = {"project": name, "base_model": MODELS[family], "steps": 6, "rank": 4, "alpha": 2.0, "seed": 3}
    values |= {"network": network, "learning_rate": 2e-2, "lora_targets": "attention+feedforward"}
    # The SDXL runs also train the text encoders: their layers go through both files too.
    values |= {"train_text_encoder": family == "sdxl", "factor": 4 if network == "lokr" else -1}
    return config_from_dict(TrainConfig, values | options)


@pytest.fixture(scope="module")
def base_losses() -> dict:
    """The base model's loss per family, measured once (the networks' configs share everything else)."""
    return {}


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{n}" for f, n in CASES])
def trained(request, sdxl_project, models_dir, tmp_path_factory, base_losses):
    """One short training per (family, network): (family, network, config, result, losses, logs, projects, loras)."""
    from modules.lora_training.evaluate import denoising_loss

    family, network = request.param
    root = tmp_path_factory.mktemp(f"{family}-{network}")
    projects, name = sdxl_project
    shutil.copytree(projects, root / "projects")
    shutil.rmtree(root / "projects" / name / "runs", ignore_errors=True)
    config = _config(name, family, network)
    losses, logs = [], []

    def on_event(event):
        if isinstance(event, StepDone):
            losses.append(event.loss)
        elif isinstance(event, Log):
            logs.append(event.message)

    common = {"projects_dir": root / "projects", "models_dir": models_dir}
    if family not in base_losses:
        base_losses[family] = denoising_loss(config, **common)
    before = base_losses[family]
    result = train(config, loras_dir=root / "loras", on_event=on_event, **common)
    after = denoising_loss(config, lora_path=result.lora_path, **common)
    return {
        "family": family,
        "network": network,
        "result": result,
        "losses": (before, after),
        "logs": logs,
        "loras": root / "loras",
        "projects": root / "projects",
    }


def test_training_lowers_the_loss(trained):
    before, after = trained["losses"]
    assert trained["result"].status == "finished"
    assert after < before, (trained["family"], trained["network"], before, after)


def test_main_file_loads_in_plain_diffusers_and_peft_and_changes_the_image(trained, models_dir):
    family, network, path = trained["family"], trained["network"], trained["result"].lora_path
    if network == "dora":
        pytest.skip("test_dora.py loads the DoRA main file in plain diffusers on both families")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["lora_studio.network"] == network
    pipe = plain_pipeline(models_dir, family)
    base = plain_image(pipe, family)
    plain_load(pipe, path, network, adapter_name=ADAPTER)
    denoiser = pipe.unet if family == "sdxl" else pipe.transformer
    assert type(denoiser.peft_config[ADAPTER]).__name__ == {"lokr": "LoKrConfig", "loha": "LoHaConfig"}.get(
        network, "LoraConfig"
    )
    assert np.abs(plain_image(pipe, family) - base).max() > 1, "the adapter changes the image"


# ----- the webui copy, read as ComfyUI reads it ----------------------------------------------------
def comfy_weight(tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The weight ComfyUI patches in at strength 1 (comfy/weight_adapter/{loha,lokr,lora}.py and
    base.weight_decompose), written out from reading it: LoHa (w1a·w1b)⊙(w2a·w2b)·alpha/rank(w1b); LoKr
    kron(w1, w2)·alpha/dim, dim the rank of a decomposed factor (scale 1 when both are full); LoRA
    up·down·alpha/rank; with dora_scale of one value per output row, (W + ΔW)·dora_scale/(‖W‖ row + eps)."""
    t = {k: v.double() for k, v in tensors.items()}
    alpha = t["alpha"].item() if "alpha" in t else None
    weight = weight.double()
    if "hada_w1_a" in t:
        diff = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return weight + diff * (alpha / t["hada_w1_b"].shape[0] if alpha is not None else 1.0)
    if "lokr_w1" in t or "lokr_w1_a" in t:
        dim = None
        w1 = t.get("lokr_w1")
        if w1 is None:
            dim, w1 = t["lokr_w1_b"].shape[0], t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t.get("lokr_w2")
        if w2 is None:
            dim, w2 = t["lokr_w2_b"].shape[0], t["lokr_w2_a"] @ t["lokr_w2_b"]
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        return weight + torch.kron(w1, w2).reshape(weight.shape) * scale
    diff = t["lora_up.weight"] @ t["lora_down.weight"] * (alpha / t["lora_down.weight"].shape[0])
    calc = weight + diff
    scale = t["dora_scale"]
    assert scale.shape[0] == weight.shape[0], "dora_scale has one value per output row"
    norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps
    return calc * (scale / norm)


def _webui_modules(path) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        name, _, suffix = key.partition(".")
        modules.setdefault(name, {})[suffix] = value
    return modules


def _webui_name(family: str, component: str, module: str) -> str:
    """ComfyUI's key map: OneTrainer's ``lora_transformer_`` for Flux, kohya's original SDXL block names,
    ``lora_te1_``/``lora_te2_`` + ``text_model`` for CLIP."""
    from families.clip_names import with_clip_level
    from families.sdxl_lora_names import sdxl_kohya_name

    if component == "transformer":
        return "lora_transformer_" + module.replace(".", "_")
    if component.startswith("text_encoder") and family == "flux":
        return "lora_te1_" + with_clip_level(module).replace(".", "_")
    return sdxl_kohya_name(f"{component}.{module}")


def test_webui_copy_changes_each_layer_as_the_main_file(trained, models_dir):
    from peft.tuners.tuners_utils import BaseTunerLayer

    family, network = trained["family"], trained["network"]
    path = trained["result"].lora_path
    copy = trained["loras"] / "webui" / path.name
    assert copy.is_file(), trained["logs"]
    with safe_open(str(copy), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == {"dora": "lora"}.get(network, network)
    assert network != "dora" or args["dora_wd"] == "True"
    webui = _webui_modules(copy)
    pipe = plain_pipeline(models_dir, family)
    plain_load(pipe, path, network, adapter_name=ADAPTER)
    checked = 0
    for component in ("unet", "transformer", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        for name, layer in model.named_modules() if model is not None else ():
            if not isinstance(layer, BaseTunerLayer) or ADAPTER not in layer.active_adapters:
                continue
            base = layer.get_base_layer().weight.detach().clone()
            layer.merge(adapter_names=[ADAPTER])
            merged = layer.get_base_layer().weight.detach().double()
            layer.unmerge()
            tensors = webui.pop(_webui_name(family, component, name.removeprefix("text_model.")))
            expected = merged - base.double()
            got = comfy_weight(tensors, base) - base.double()
            assert torch.allclose(got, expected, atol=2e-3 * expected.abs().max().item(), rtol=0), name
            checked += 1
    assert checked > 10 and not webui, f"modules of the copy no layer matched: {list(webui)[:3]}"


def _render(manager, family: str, loras=()) -> np.ndarray:
    request = GenerationRequest(
        model=MODELS[family], prompt="ohwx, a photo", steps=3, width=64, height=64, seed=5, loras=loras
    )
    return np.asarray(manager.generate(request).image, dtype=np.float32)


def test_generate_applies_it_with_the_weight_slider(trained, models_dir):
    family, path = trained["family"], trained["result"].lora_path
    if trained["network"] == "dora":
        pytest.skip("test_dora.py renders a DoRA through Generate at weights 0 and 1 on both families")
    manager = ModelManager(models_dir=models_dir, loras_dir=trained["loras"], device="cpu")
    plain = _render(manager, family)
    full = _render(manager, family, (LoraChoice(path.name, 1.0),))
    half = _render(manager, family, (LoraChoice(path.name, 0.5),))
    zero = _render(manager, family, (LoraChoice(path.name, 0.0),))
    assert np.abs(full - plain).max() > 1 and np.abs(half - full).max() > 0
    assert np.array_equal(zero, plain), "weight 0 gives the base image"
    again = _render(manager, family, (LoraChoice(path.name, 1.0),))
    assert np.array_equal(again, full), "weight 1 after 0 is the trained LoRA again"


def test_inspect_names_the_network(trained):
    from modules.lora_training.export import NETWORK_NAMES, inspect_lora

    path = trained["result"].lora_path
    kind = NETWORK_NAMES[trained["network"]]
    assert kind in inspect_lora(path)
    webui = inspect_lora(trained["loras"] / "webui" / path.name)
    assert kind in webui and "lycoris.kohya" in webui


@pytest.mark.parametrize(("family", "network"), [("sdxl", "loha"), ("flux", "lokr")])
def test_stop_and_resume_equals_uninterrupted(project, models_dir, tmp_path, family, network):
    projects, name = project
    config = dict(steps=4, train_text_encoder=False, lora_targets="auto")
    straight = train(
        _config(name, family, network, name="a", **config),
        projects_dir=projects,
        models_dir=models_dir,
        loras_dir=tmp_path / "a",
    )
    done = {"step": 0}

    def on_event(event):
        if isinstance(event, StepDone):
            done["step"] = event.step

    resumable = _config(name, family, network, name="b", **config)
    common = {"projects_dir": projects, "models_dir": models_dir, "loras_dir": tmp_path / "b"}
    stopped = train(resumable, on_event=on_event, should_stop=lambda: done["step"] >= 2, **common)
    assert stopped.status == "stopped" and stopped.step == 2
    resumed = train(resumable, resume=True, **common)
    first = load_file(str(straight.checkpoint / "lora.safetensors"))
    final = load_file(str(resumed.checkpoint / "lora.safetensors"))
    assert first.keys() == final.keys() and any((".hada_" if network == "loha" else ".lokr_") in k for k in first)
    assert all(torch.equal(first[k], final[k]) for k in first)


def test_a_checkpoint_saved_as_a_lora_gets_the_same_files(trained, models_dir):
    """The checkpoint-as-LoRA path rebuilds the adapter from the checkpoint: same main file, verified copy."""
    from modules.lora_training.checkpoint_lora import save_checkpoint_as_lora

    if trained["network"] == "loha":
        pytest.skip("LoKr (peft layout) and DoRA (base weights for the copy) cover this path")
    result = trained["result"]
    path = save_checkpoint_as_lora(
        "tiny",
        projects_dir=trained["projects"],
        models_dir=models_dir,
        loras_dir=trained["loras"],
        name="from_checkpoint",
        step=result.step,
    )
    first, again = load_file(str(result.lora_path)), load_file(str(path))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    copies = [load_file(str(trained["loras"] / "webui" / p.name)) for p in (result.lora_path, path)]
    assert copies[0].keys() == copies[1].keys()
    assert all(torch.allclose(copies[0][k].float(), copies[1][k].float(), atol=1e-6) for k in copies[0])


def test_generate_applies_the_webui_copy_as_the_main_file(trained, models_dir, tmp_path):
    """Our LyCORIS-layout copy, read back by Generate as a file of another tool, renders as the main file."""
    if trained["network"] == "dora":
        pytest.skip("a DoRA copy is in kohya's LoRA layout, which diffusers reads")
    family, path = trained["family"], trained["result"].lora_path
    loras = tmp_path / "loras"
    loras.mkdir()
    shutil.copy(path, loras / "main.safetensors")
    shutil.copy(trained["loras"] / "webui" / path.name, loras / "from_webui.safetensors")
    manager = ModelManager(models_dir=models_dir, loras_dir=loras, device="cpu")
    plain = _render(manager, family)
    main = _render(manager, family, (LoraChoice("main.safetensors", 1.0),))
    copy = _render(manager, family, (LoraChoice("from_webui.safetensors", 1.0),))
    assert np.abs(main - plain).max() > 1, "the LoRA changes the image"
    assert np.abs(copy - main).max() <= 2, "the webui copy (fp16 weights) renders as the main file"
    assert np.array_equal(_render(manager, family, (LoraChoice("from_webui.safetensors", 0.0),)), plain)
