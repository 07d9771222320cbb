"""EMA of the adapter weights: the average's formula, exact resume, and the two LoRA files it writes."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from core.errors import UserError
from modules.lora_training.config import TrainConfig, config_from_dict
from modules.lora_training.ema import AdapterEMA
from modules.lora_training.estimate import estimate_run
from modules.lora_training.events import StepDone
from modules.lora_training.export import inspect_lora
from modules.lora_training.train import train
from tests.demo_names import DEMO_SDXL_NAME

EMA = {"ema": True, "ema_decay": 0.8, "ema_start_step": 1}


def _config(name, /, **options):
    values = {"project": name, "base_model": DEMO_SDXL_NAME, "steps": 6, "rank": 4, "alpha": 4.0}
    values.update({"learning_rate": 1e-2, **EMA, **options})
    return config_from_dict(TrainConfig, values)


def test_average_follows_the_weights_until_the_start_step_then_decays():
    weight = torch.nn.Parameter(torch.zeros(3))
    ema = AdapterEMA({"w": weight}, decay=0.75, start_step=1)
    with torch.no_grad():
        weight.fill_(4.0)
    ema.update(1)  # up to the start step: the weights themselves
    assert torch.equal(ema.shadow["w"], torch.full((3,), 4.0)) and ema.updates == 0
    with torch.no_grad():
        weight.fill_(8.0)
    ema.update(2)
    assert torch.allclose(ema.shadow["w"], torch.full((3,), 0.75 * 4 + 0.25 * 8)) and ema.updates == 1
    with ema.applied():
        assert torch.equal(weight.detach(), ema.shadow["w"])
    assert torch.equal(weight.detach(), torch.full((3,), 8.0)), "the trained weights come back"


def test_a_resume_without_a_saved_average_restarts_it_from_the_loaded_weights():
    weight = torch.nn.Parameter(torch.zeros(3))
    ema = AdapterEMA({"w": weight}, decay=0.9, start_step=0)  # made before the checkpoint's weights load
    with torch.no_grad():
        weight.fill_(5.0)  # the checkpoint's weights
    ema.restart_from_weights()
    ema.update(4)
    assert torch.equal(ema.shadow["w"], torch.full((3,), 5.0)) and ema.updates == 1, "not pulled toward 0"


@pytest.mark.parametrize("decay", [0.0, 1.0, float("nan")])
def test_decay_must_lie_strictly_between_0_and_1(decay):
    with pytest.raises(UserError, match="ema_decay"):
        _config("x", ema_decay=decay)


def _tensors(path):
    return load_file(str(path))


def _header(path):
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def test_stop_and_resume_gives_the_same_average_as_an_uninterrupted_run(project, models_dir, tmp_path):
    projects, name = project
    loras = tmp_path / "loras"
    straight = train(_config(name, name="straight"), projects_dir=projects, models_dir=models_dir, loras_dir=loras)
    assert straight.status == "finished"
    reached = {"step": 0}

    def on_event(event):
        if isinstance(event, StepDone):
            reached["step"] = event.step

    config = _config(name, name="resumed", ema_weights="ema")
    kwargs = {"projects_dir": projects, "models_dir": models_dir, "loras_dir": loras}
    stopped = train(config, new_run=True, on_event=on_event, should_stop=lambda: reached["step"] >= 3, **kwargs)
    assert stopped.status == "stopped" and (stopped.checkpoint / "ema.safetensors").is_file()
    resumed = train(config, resume=True, **kwargs)
    assert resumed.status == "finished" and resumed.step == 6

    first, second = _tensors(straight.checkpoint / "ema.safetensors"), _tensors(resumed.checkpoint / "ema.safetensors")
    assert first.keys() == second.keys() and first
    assert all(torch.equal(first[k], second[k]) for k in first), "resumed average = uninterrupted average"
    raw = _tensors(straight.checkpoint / "lora.safetensors")
    pairs = zip((raw[k] for k in sorted(raw)), (first[k] for k in sorted(first)), strict=True)
    assert not all(torch.equal(a, b) for a, b in pairs), "the average differs from the trained weights"
    estimate = estimate_run(config, models_dir=models_dir, resolution=64, timing=False).memory
    assert estimate.parts["EMA copy"] == sum(t.numel() * 4 for t in first.values()), "the estimate's EMA copy"

    # The straight run's main file holds the trained weights and its .ema file the average; the resumed run
    # chose the average for its main file and wrote the trained weights beside it.
    assert _header(loras / "straight.safetensors")["lora_studio.weights"] == "raw"
    assert _header(loras / "straight.ema.safetensors")["lora_studio.weights"] == "ema"
    assert "5 averaging updates" in _header(loras / "resumed.safetensors")["lora_studio.ema"]
    shown = inspect_lora(loras / "resumed.safetensors")
    assert "  weights (trained or EMA): ema" in shown and "  EMA: decay 0.8, from step 1, 5 averaging updates" in shown
    from modules.lora_training.checkpoint_lora import save_checkpoint_as_lora

    # A kept checkpoint written as a LoRA holds the weights the run chose: here the average.
    save_checkpoint_as_lora(name, **kwargs, name="kept", step=6, webui_copy=False)
    assert _header(loras / "kept.safetensors")["lora_studio.weights"] == "ema"
    for mine, theirs in (("straight.ema", "resumed"), ("straight", "resumed.raw"), ("kept", "resumed")):
        a, b = _tensors(loras / f"{mine}.safetensors"), _tensors(loras / f"{theirs}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (mine, theirs)


def test_the_estimate_counts_the_average_as_one_fp32_copy_of_the_adapter(models_dir):
    config = _config("x", lora_targets="attention")
    memory = estimate_run(config, models_dir=models_dir, resolution=64, timing=False).memory
    plain = estimate_run(_config("x", ema=False), models_dir=models_dir, resolution=64, timing=False).memory
    assert "EMA copy" not in plain.parts
    assert memory.total_bytes - plain.total_bytes == memory.parts["EMA copy"]
    assert memory.parts["EMA copy"] * 2 == memory.parts["LoRA + gradients"]
