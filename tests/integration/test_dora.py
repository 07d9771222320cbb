"""DoRA (peft's weight-decomposed LoRA) on the tiny SDXL and Flux: training, the main file in a plain diffusers
pipeline, Generate with the weight slider, exact resume."""

from __future__ import annotations

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
from tests.plain_pipelines import plain_image, plain_pipeline

MODELS = {"sdxl": DEMO_SDXL_NAME, "flux": DEMO_FLUX_NAME}
MAGNITUDE = ".lora_magnitude_vector.weight"


def _config(name: str, family: str, /, **options) -> TrainConfig:
    values = {"project": name, "base_model": MODELS[family], "steps": 4, "rank": 4, "alpha": 4.0}
    values |= {"network": "dora", "learning_rate": 1e-2, "seed": 3, **options}
    return config_from_dict(TrainConfig, values)


def _render(manager, family: str, loras=()) -> np.ndarray:
    request = GenerationRequest(
        model=MODELS[family], prompt="ohwx, a photo", steps=3, width=64, height=64, seed=5, loras=loras
    )
    return np.asarray(manager.generate(request).image, dtype=np.float32)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_dora_trains_saves_loads_and_generates(project, models_dir, tmp_path, family):
    projects, name = project
    logs, losses = [], []

    def on_event(event):
        if isinstance(event, Log):
            logs.append(event.message)
        elif isinstance(event, StepDone):
            losses.append(event.loss)

    config = _config(name, family, steps=5, train_text_encoder=family == "sdxl", also_save_webui=True)
    loras = tmp_path / "loras"
    result = train(config, projects_dir=projects, models_dir=models_dir, loras_dir=loras, on_event=on_event)
    assert result.status == "finished" and all(np.isfinite(losses)), losses
    assert any(line.startswith("Webui copy (kohya + dora_scale layout)") for line in logs), logs
    assert (loras / "webui" / result.lora_path.name).is_file(), "the LyCORIS-layout copy (test_adapter_types checks it)"
    trained = load_file(str(result.checkpoint / "lora.safetensors"))
    magnitudes = {k: v for k, v in trained.items() if k.endswith("lora_magnitude_vector")}
    assert magnitudes and all(v.dtype == torch.float32 for v in trained.values())

    with safe_open(str(result.lora_path), framework="pt") as handle:
        meta, keys = handle.metadata(), list(handle.keys())
        saved = {k: handle.get_tensor(k).float() for k in keys if k.endswith(MAGNITUDE)}
    assert meta["lora_studio.network"] == "dora" and '"unet.use_dora": true' in meta["lora_adapter_metadata"].replace(
        "transformer.", "unet."
    )
    assert len(saved) == len(magnitudes), "every trained magnitude vector is in the main file"

    pipe = plain_pipeline(models_dir, family)
    base = plain_image(pipe, family)
    pipe.load_lora_weights(str(result.lora_path), adapter_name="dora")
    denoiser = pipe.unet if family == "sdxl" else pipe.transformer
    assert denoiser.peft_config["dora"].use_dora
    loaded = {n.replace(".dora.", ".default."): p for n, p in denoiser.named_parameters() if "magnitude" in n}
    ours = {k.removeprefix("denoiser/") + ".default.weight": v for k, v in magnitudes.items() if "denoiser/" in k}
    assert loaded.keys() == ours.keys()
    assert all(torch.allclose(loaded[k].float(), ours[k].half().float()) for k in ours), "fp16 of the trained ones"
    assert np.abs(plain_image(pipe, family) - base).max() > 1, "the DoRA changes the image"

    from modules.lora_training.export import inspect_lora

    assert "DoRA (weight-decomposed LoRA), diffusers format" in inspect_lora(result.lora_path)
    manager = ModelManager(models_dir=models_dir, loras_dir=loras, device="cpu")
    plain = _render(manager, family)
    full = _render(manager, family, (LoraChoice(result.lora_path.name, 1.0),))
    zero = _render(manager, family, (LoraChoice(result.lora_path.name, 0.0),))
    assert np.abs(full - plain).max() > 1
    assert np.array_equal(zero, plain), "weight 0 gives the base image"


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_dora_stop_and_resume_equals_uninterrupted(project, models_dir, tmp_path, family):
    projects, name = project
    straight = train(
        _config(name, family, steps=4, name="a"), projects_dir=projects, models_dir=models_dir, loras_dir=tmp_path / "a"
    )
    done = {"step": 0}

    def on_event(event):
        if isinstance(event, StepDone):
            done["step"] = event.step

    config = _config(name, family, steps=4, name="b")
    common = {"projects_dir": projects, "models_dir": models_dir, "loras_dir": tmp_path / "b"}
    stopped = train(config, on_event=on_event, should_stop=lambda: done["step"] >= 2, **common)
    assert stopped.status == "stopped" and stopped.step == 2
    resumed = train(config, resume=True, **common)
    first = load_file(str(straight.checkpoint / "lora.safetensors"))
    final = load_file(str(resumed.checkpoint / "lora.safetensors"))
    assert first.keys() == final.keys() and any(k.endswith("lora_magnitude_vector") for k in first)
    assert all(torch.equal(first[k], final[k]) for k in first)


def test_resuming_a_dora_run_as_lora_keeps_dora(project, models_dir, tmp_path):
    projects, name = project
    done = {"step": 0}

    def on_event(event):
        if isinstance(event, StepDone):
            done["step"] = event.step

    common = {"projects_dir": projects, "models_dir": models_dir, "loras_dir": tmp_path}
    train(_config(name, "sdxl"), on_event=on_event, should_stop=lambda: done["step"] >= 1, **common)
    logs = []
    resumed = train(_config(name, "sdxl", network="lora"), resume=True, on_event=logs.append, **common)
    assert resumed.status == "finished"
    assert any(isinstance(e, Log) and "network" in e.message for e in logs)
    with safe_open(str(resumed.lora_path), framework="pt") as handle:
        assert handle.metadata()["lora_studio.network"] == "dora"
