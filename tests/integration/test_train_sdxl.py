"""SDXL LoRA training on the tiny model, CPU: correct, deterministic, resumable, loadable."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from core.errors import UserError
from modules.lora_training.config import TrainConfig, config_from_dict
from modules.lora_training.events import CheckpointSaved, Finished, SampleSaved, StepDone, Stopped
from modules.lora_training.project import ProjectPaths
from modules.lora_training.runs import latest_run
from modules.lora_training.train import train
from tests.demo_names import DEMO_SDXL_NAME


def _latest_run(project):
    return latest_run(ProjectPaths.for_project(*project))


def _config(project_name, /, **options):
    values = {"project": project_name, "base_model": DEMO_SDXL_NAME, "steps": 4, "rank": 4, "alpha": 4.0}
    values.update(options)
    return config_from_dict(TrainConfig, values)


def _run(project, models_dir, loras, *, new_run=False, **options):
    projects, name = project
    events = []
    result = train(
        _config(name, **options),
        projects_dir=projects,
        models_dir=models_dir,
        loras_dir=loras,
        on_event=events.append,
        new_run=new_run,
    )
    return result, events


def test_training_lowers_the_denoising_loss(project, models_dir, tmp_path):
    from modules.lora_training.evaluate import denoising_loss

    projects, name = project
    config = _config(name, steps=60, learning_rate=1e-2, rank=8, alpha=8.0)
    before = denoising_loss(config, projects_dir=projects, models_dir=models_dir)
    result = train(config, projects_dir=projects, models_dir=models_dir, loras_dir=tmp_path / "loras")
    assert result.status == "finished"
    after = denoising_loss(config, projects_dir=projects, models_dir=models_dir, lora_path=result.lora_path)
    assert after < 0.92 * before, (before, after)


def _final_lora(result):
    return load_file(str(result.checkpoint / "lora.safetensors"))


def test_same_seed_same_lora_and_stop_resume_equals_uninterrupted(project, models_dir, tmp_path):
    projects, name = project
    straight, _ = _run(project, models_dir, tmp_path / "a", steps=6, save_every_steps=2, name="straight")
    torch.manual_seed(999)  # the run's own seed decides, not the global RNG
    again, _ = _run(project, models_dir, tmp_path / "b", steps=6, name="again")
    first, second = _final_lora(straight), _final_lora(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first), "same seed, same LoRA"

    stop_at = {"step": 0}
    events = []

    def on_event(event):
        events.append(event)
        if isinstance(event, StepDone):
            stop_at["step"] = event.step

    config = _config(name, steps=6, name="resumed")
    stopped = train(
        config,
        projects_dir=projects,
        models_dir=models_dir,
        loras_dir=tmp_path / "c",
        on_event=on_event,
        should_stop=lambda: stop_at["step"] >= 3,
    )
    assert stopped.status == "stopped" and stopped.step == 3
    assert any(isinstance(e, Stopped) and e.step == 3 for e in events)
    assert not (tmp_path / "c" / "resumed.safetensors").exists()
    resumed = train(config, projects_dir=projects, models_dir=models_dir, loras_dir=tmp_path / "c", resume=True)
    assert resumed.status == "finished" and resumed.step == 6
    final = _final_lora(resumed)
    assert all(torch.equal(final[k], first[k]) for k in first), "resumed run = uninterrupted run"


def test_saved_lora_loads_in_a_fresh_pipeline_with_its_alpha(project, models_dir, demo_paths, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    result, events = _run(project, models_dir, tmp_path / "loras", steps=8, rank=4, alpha=2.0, learning_rate=5e-3)
    assert isinstance(events[-1], Finished)
    with safe_open(str(result.lora_path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["lora_studio.trigger_word"] == "ohwx"
    assert metadata["lora_studio.base_model"] == DEMO_SDXL_NAME
    assert metadata["lora_studio.steps"] == "8"
    assert len(metadata["lora_studio.base_model_sha256"]) == 64
    assert '"optimizer": "adamw"' in metadata["lora_studio.training_config"]

    pipe = StableDiffusionXLPipeline.from_pretrained(demo_paths.sdxl_folder)
    pipe.set_progress_bar_config(disable=True)

    def render():
        generator = torch.Generator().manual_seed(3)
        return pipe("ohwx", num_inference_steps=3, width=64, height=64, generator=generator, output_type="np").images

    base = render()
    pipe.load_lora_weights(str(result.lora_path), adapter_name="trained")
    assert pipe.unet.peft_config["trained"].lora_alpha == 2.0
    assert pipe.unet.peft_config["trained"].r == 4
    assert np.abs(render() - base).max() > 1e-3


@pytest.mark.parametrize(
    "options",
    [
        {"optimizer": "adamw8bit"},
        {"optimizer": "lion8bit"},
        {"optimizer": "paged_adamw8bit"},
        {"optimizer": "lion", "learning_rate": 1e-5},
        {"optimizer": "prodigy", "learning_rate": 1.0},
        {"mixed_precision": "bf16"},
        {"mixed_precision": "fp16"},
        {
            "lr_scheduler": "cosine_with_restarts",
            "lr_warmup_steps": 1,
            "gradient_accumulation": 2,
            "gradient_checkpointing": True,
            "min_snr_gamma": 5.0,
            "noise_offset": 0.05,
            "multires_noise_iterations": 2,
            "caption_dropout": 0.5,
            "flip": True,
            "train_text_encoder": True,
            "lora_targets": "attention+feedforward",
            "prediction_type": "v_prediction",
            "batch_size": 2,
        },
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())[:60],
)
def test_optimizers_and_precisions_complete_steps(project, models_dir, tmp_path, options):
    result, events = _run(project, models_dir, tmp_path / "loras", steps=3, **options)
    assert result.status == "finished", result.message
    losses = [e.loss for e in events if isinstance(e, StepDone)]
    assert len(losses) == 3 and all(np.isfinite(losses))


def test_cached_latents_mean_no_vae_encoding_during_training(project, models_dir, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    calls = {"n": 0}
    original = AutoencoderKL.encode

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    seen = []

    def on_event(event):
        if isinstance(event, StepDone):
            seen.append((event.epoch, calls["n"]))

    projects, name = project
    config = _config(name, epochs=3, steps=None, batch_size=2)
    train(config, projects_dir=projects, models_dir=models_dir, loras_dir=tmp_path / "loras", on_event=on_event)
    assert seen[-1][0] == 2, "three epochs ran"
    encoded_before_training = seen[0][1]
    assert encoded_before_training == 4
    assert all(count == encoded_before_training for _, count in seen), "no VAE call in epochs 1 and 2"

    calls["n"] = 0
    train(
        _config(name, steps=2, name="second"),
        projects_dir=projects,
        models_dir=models_dir,
        loras_dir=tmp_path / "loras",
    )
    assert calls["n"] == 0, "a second run reuses the on-disk cache"


def test_checkpoints_rotate_and_existing_lora_is_protected(project, models_dir, tmp_path):
    loras = tmp_path / "loras"
    result, events = _run(
        project,
        models_dir,
        loras,
        steps=6,
        save_every_steps=1,
        keep_checkpoints=2,
        sample_every_steps=3,
        sample_steps=2,
    )
    assert [e.step for e in events if isinstance(e, CheckpointSaved)] == [1, 2, 3, 4, 5, 6]
    samples = [e for e in events if isinstance(e, SampleSaved)]
    assert [(e.step, e.prompt) for e in samples] == [(3, "ohwx"), (6, "ohwx")], "fixed prompt, trigger filled in"
    assert all(Path(e.path).is_file() and Path(e.path).name.startswith(f"step-{e.step:06d}") for e in samples)
    remaining = sorted(p.name for p in _latest_run(project).checkpoints.iterdir())
    assert remaining == ["step-000005", "step-000006"]
    before = result.lora_path.read_bytes()
    with pytest.raises(UserError, match="already exists"):
        _run(project, models_dir, loras, steps=2)
    assert result.lora_path.read_bytes() == before
    (_latest_run(project).logs / "loss.png").stat()


def test_bad_training_options_are_named(project, models_dir, tmp_path):
    projects, name = project
    with pytest.raises(UserError, match="optimizer must be one of"):
        _config(name, optimizer="sgd")
    with pytest.raises(UserError, match="rank must be between 1 and 1024"):
        _config(name, rank=0)
    with pytest.raises(UserError, match="unknown option.*learnin_rate"):
        config_from_dict(TrainConfig, {"project": name, "base_model": "x", "learnin_rate": 1})
    with pytest.raises(UserError, match="not found"):
        train(_config(name, base_model="nope"), projects_dir=projects, models_dir=models_dir, loras_dir=tmp_path)
    with pytest.raises(UserError, match="no prepared images"):
        train(_config("other"), projects_dir=projects, models_dir=models_dir, loras_dir=tmp_path)
    with pytest.raises(UserError, match="no stopped run to resume"):
        train(_config(name), projects_dir=projects, models_dir=models_dir, loras_dir=tmp_path, resume=True)


def test_text_encoder_lora_generates_through_model_manager(project, models_dir, demo_paths, tmp_path):
    from core.model_manager import GenerationRequest, LoraChoice, ModelManager

    loras = tmp_path / "loras"
    result, _ = _run(project, models_dir, loras, steps=4, train_text_encoder=True, learning_rate=1e-2)
    with safe_open(str(result.lora_path), framework="pt") as handle:
        keys = list(handle.keys())
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("text_encoder_2.") for k in keys)
    manager = ModelManager(models_dir=models_dir, loras_dir=loras, device="cpu")
    request = GenerationRequest(model=DEMO_SDXL_NAME, prompt="ohwx", steps=3, width=64, height=64, seed=1)
    base = np.asarray(manager.generate(request).image, dtype=np.int16)
    lora = GenerationRequest(**{**request.__dict__, "loras": (LoraChoice(result.lora_path.name, 1.0),)})
    assert np.abs(np.asarray(manager.generate(lora).image, dtype=np.int16) - base).max() > 0


def test_out_of_memory_and_nan_end_with_a_clear_failure(project, models_dir, tmp_path, monkeypatch):
    """Faults injected into the loss: the run ends with advice and the last checkpoint survives."""
    from families.sdxl import SDXLFamily
    from modules.lora_training.checkpoints import latest_checkpoint, load_checkpoint
    from modules.lora_training.events import Failed

    real_loss = SDXLFamily.training_loss
    calls = {"n": 0}

    def out_of_memory_on_third(self, **kwargs):
        calls["n"] += kwargs.get("fixed_t") is None  # training steps, not validation
        if calls["n"] == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_loss(self, **kwargs)

    monkeypatch.setattr(SDXLFamily, "training_loss", out_of_memory_on_third)
    result, events = _run(project, models_dir, tmp_path / "loras", steps=5, save_every_steps=2, name="oom")
    assert result.status == "failed"
    failure = next(e for e in events if isinstance(e, Failed))
    assert "Out of GPU memory" in failure.message and "gradient checkpointing" in failure.message
    checkpoint = latest_checkpoint(_latest_run(project).checkpoints)
    assert load_checkpoint(checkpoint).step == 2
    assert not (tmp_path / "loras" / "oom.safetensors").exists()

    monkeypatch.setattr(SDXLFamily, "training_loss", lambda self, **kw: real_loss(self, **kw) * float("nan"))
    result, events = _run(project, models_dir, tmp_path / "loras", steps=20, name="nan", new_run=True)
    assert result.status == "failed" and "not finite for 5 tries in a row" in result.message
    assert isinstance(events[-1], Failed)
