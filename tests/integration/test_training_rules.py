"""Training rules on the tiny models: steps with non-finite gradients are not applied (in every
precision), a failing sample never ends a run, settings that cannot help are reported, the
LoRA targets reach what they name, v-prediction and zero terminal SNR come from the model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from families.flux import FluxFamily
from modules.lora_training.config import TrainConfig, config_from_dict
from modules.lora_training.events import Log, SampleSaved, StepDone
from modules.lora_training.optim import lr_multiplier
from modules.lora_training.project import ProjectPaths
from modules.lora_training.runs import latest_run
from modules.lora_training.train import train
from tests.demo_names import DEMO_FLUX_NAME, DEMO_SDXL_NAME


def _train(project, models_dir, loras_dir, **options):
    projects, name = project
    values = {"project": name, "base_model": DEMO_FLUX_NAME, "steps": 3, "rank": 4, "alpha": 4.0, **options}
    events = []
    result = train(
        config_from_dict(TrainConfig, values),
        projects_dir=projects,
        models_dir=models_dir,
        loras_dir=loras_dir,
        on_event=events.append,
    )
    return result, events


def _warnings(events) -> list[str]:
    return [e.message for e in events if isinstance(e, Log) and e.level == "warning"]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_step_with_nan_gradients_is_not_applied_and_does_not_advance_the_schedule(
    project, models_dir, tmp_path, monkeypatch, precision
):
    original = FluxFamily.training_loss
    calls = {"n": 0}

    def loss_with_nan_gradient_once(self, **kwargs):
        loss = original(self, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2 and loss.requires_grad:  # the second try: a finite loss, NaN gradients
            loss.register_hook(lambda grad: grad * float("nan"))
        return loss

    monkeypatch.setattr(FluxFamily, "training_loss", loss_with_nan_gradient_once)
    lr = 1e-3
    result, events = _train(
        project, models_dir, tmp_path / "loras", mixed_precision=precision, learning_rate=lr, lr_scheduler="linear"
    )
    assert result.status == "finished" and result.step == 3
    steps = [e for e in events if isinstance(e, StepDone)]
    assert [e.step for e in steps] == [1, 2, 3]
    expected = [lr * lr_multiplier(k, schedule="linear", warmup_steps=0, total_steps=3) for k in (1, 2, 3)]
    assert [e.lr for e in steps] == pytest.approx(expected), "a skipped step must not move the LR schedule"
    assert any("Step 2 not applied: non-finite gradients" in w for w in _warnings(events)), _warnings(events)
    assert any("1 step(s) were not applied" in e.message for e in events if isinstance(e, Log))
    lora = load_file(str(result.lora_path))
    assert all(torch.isfinite(t.float()).all() for t in lora.values()), "NaN gradients reached the LoRA"
    lines = (latest_run(ProjectPaths.for_project(*project)).logs / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def test_a_failing_sample_is_a_warning_and_settings_that_cannot_help_are_named(
    project, models_dir, tmp_path, monkeypatch
):
    def broken_decode(self, latents, **kwargs):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(FluxFamily, "decode_latents", broken_decode)
    result, events = _train(
        project,
        models_dir,
        tmp_path / "loras",
        steps=2,
        sample_every_steps=1,
        optimizer="prodigy",
        learning_rate=1e-4,
        min_snr_gamma=5.0,
    )
    assert result.status == "finished" and result.lora_path.is_file()
    warnings = _warnings(events)
    failed_samples = [w for w in warnings if "could not be rendered" in w]
    assert len(failed_samples) == 2 and all("decoder exploded" in w for w in failed_samples)
    assert not [e for e in events if isinstance(e, SampleSaved)]
    assert any("Prodigy runs with lr 0.0001" in w for w in warnings)
    assert any("Not used by Flux models, ignored: min_snr_gamma=5.0" in w for w in warnings)


def test_samples_reuse_prompt_embeddings_computed_once(project, models_dir, tmp_path, monkeypatch):
    encoded = []
    original = FluxFamily.encode_text

    def counting(self, captions):
        encoded.extend(captions)
        return original(self, captions)

    monkeypatch.setattr(FluxFamily, "encode_text", counting)
    result, events = _train(
        project,
        models_dir,
        tmp_path / "loras",
        steps=3,
        sample_every_steps=1,
        sample_steps=1,
        sample_prompts=["{trigger} on a beach"],
    )
    assert result.status == "finished"
    assert len([e for e in events if isinstance(e, SampleSaved)]) == 3
    assert encoded.count("ohwx on a beach") == 1, "the sample prompt is encoded once, not at every sample"


def test_flux_lora_reaches_single_block_proj_out_but_not_the_final_projection(models_dir):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(models_dir / DEMO_FLUX_NAME, subfolder="transformer")
    model.add_adapter(FluxFamily.denoiser_lora_config(rank=2, alpha=2, lora_targets="auto"))
    wrapped = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert "single_transformer_blocks.0.proj_out" in wrapped
    assert "single_transformer_blocks.0.proj_mlp" in wrapped
    assert "transformer_blocks.0.ff.net.2" in wrapped
    assert "proj_out" not in wrapped


def _v_prediction_models(models_dir, tmp_path, *, markers: tuple[str, ...]):
    """A models folder holding the demo SDXL folder and a single file carrying the given marker keys."""
    target = tmp_path / "vpred-models"
    shutil.copytree(models_dir / DEMO_SDXL_NAME, target / DEMO_SDXL_NAME)
    source = models_dir / f"{DEMO_SDXL_NAME}.safetensors"
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(source))
    tensors.update({marker: torch.tensor([]) for marker in markers})
    path = target / "vpred-sdxl.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return target, path


def test_v_prediction_single_file_is_trained_sampled_and_labelled_as_such(project, models_dir, tmp_path):
    from core.model_files import model_entry
    from families import load_pipeline

    vpred_models, path = _v_prediction_models(models_dir, tmp_path, markers=("v_pred", "ztsnr"))
    pipe = load_pipeline(model_entry(vpred_models, path.name), models_dir=vpred_models, dtype=torch.float32)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.rescale_betas_zero_snr is True

    result, events = _train(project, vpred_models, tmp_path / "loras", base_model=path.name, steps=1, min_snr_gamma=5.0)
    assert result.status == "finished", result.message
    assert any("v_prediction prediction, zero terminal SNR" in e.message for e in events if isinstance(e, Log))
    with safe_open(str(result.lora_path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["lora_studio.prediction_type"] == "v_prediction"
    assert metadata["lora_studio.zero_terminal_snr"] == "true"
    with safe_open(str(tmp_path / "loras" / "webui" / result.lora_path.name), framework="pt") as handle:
        webui = handle.metadata()
    assert webui["modelspec.prediction_type"] == "v"
    assert webui["ss_v_parameterization"] == "True" and webui["ss_zero_terminal_snr"] == "True"


def test_v_prediction_from_a_diffusers_folder_and_zero_snr_as_an_option(models_dir, tmp_path):
    from core.model_files import model_entry
    from families.sdxl import SDXLFamily

    folder = tmp_path / "models" / DEMO_SDXL_NAME
    shutil.copytree(models_dir / DEMO_SDXL_NAME, folder)
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text())
    scheduler_file.write_text(json.dumps({**scheduler, "prediction_type": "v_prediction"}))
    entry = model_entry(folder.parent, DEMO_SDXL_NAME)
    family = SDXLFamily(entry, models_dir=folder.parent, device="cpu", weight_dtype=torch.float32)
    config = config_from_dict(
        TrainConfig, {"project": "p", "base_model": DEMO_SDXL_NAME, "zero_terminal_snr": True, "min_snr_gamma": 5.0}
    )
    assert family.configure(config) == []
    assert family.prediction_type(config) == "v_prediction"
    assert family.noise_scheduler.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert family.pipe.scheduler.config.timestep_spacing == "trailing"
    weights = family._min_snr_weights(torch.tensor([0, 999]), 5.0, "epsilon")
    assert torch.isfinite(weights).all()


def test_resume_and_the_webui_copy_never_replace_another_projects_lora(project, models_dir, tmp_path):
    from core.errors import UserError

    projects, name = project
    shutil.copytree(projects / name, projects / "other")
    loras = tmp_path / "loras"
    values = {"base_model": DEMO_FLUX_NAME, "steps": 2, "rank": 4, "alpha": 4.0, "name": "shared"}
    stopped = train(
        config_from_dict(TrainConfig, {"project": "other", **values}),
        projects_dir=projects,
        models_dir=models_dir,
        loras_dir=loras,
        should_stop=lambda: True,
    )
    assert stopped.status == "stopped"
    finished = train(
        config_from_dict(TrainConfig, {"project": name, **values}),
        projects_dir=projects,
        models_dir=models_dir,
        loras_dir=loras,
    )
    assert finished.status == "finished"
    theirs = (loras / "shared.safetensors").read_bytes()
    with pytest.raises(UserError, match=f"made by project '{name}'"):
        train(
            config_from_dict(TrainConfig, {"project": "other", **values}),
            projects_dir=projects,
            models_dir=models_dir,
            loras_dir=loras,
            resume=True,
        )
    assert (loras / "shared.safetensors").read_bytes() == theirs

    webui = loras / "webui" / "shared.safetensors"
    webui_bytes = webui.read_bytes()
    (loras / "shared.safetensors").unlink()
    events = []
    again = train(
        config_from_dict(TrainConfig, {"project": "other", **values}),
        projects_dir=projects,
        models_dir=models_dir,
        loras_dir=loras,
        resume=True,
        on_event=events.append,
    )
    assert again.status == "finished" and again.lora_path.is_file()
    assert any(f"belongs to project '{name}'" in w for w in _warnings(events)), _warnings(events)
    assert webui.read_bytes() == webui_bytes


def test_auto_cadence_gives_a_checkpoint_and_a_sample_every_tenth_of_the_run(project, models_dir, tmp_path):
    result, events = _train(
        project, models_dir, tmp_path, steps=20, save_every_steps=None, sample_every_steps=None, sample_steps=1
    )
    assert result.status == "finished"
    described = next(e.message for e in events if isinstance(e, Log) and e.message.startswith("Training:"))
    assert "checkpoint every 2 steps" in described and "samples every 2 steps" in described
    samples = sorted(e.step for e in events if isinstance(e, SampleSaved))
    assert samples == list(range(2, 21, 2))
    run = latest_run(ProjectPaths.for_project(*project))
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step-000016", "step-000018", "step-000020"]
