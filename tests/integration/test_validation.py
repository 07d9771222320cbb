"""Held-out validation during training: stable split, deterministic figures, the best checkpoint kept."""

import json

import pytest
import torch

from core.errors import UserError
from modules.lora_training.config import TrainConfig, config_from_dict
from modules.lora_training.metrics import read_metrics, read_validation
from modules.lora_training.train import train
from modules.lora_training.validation import MIN_IMAGES_FOR_A_SPLIT, split_validation, training_probe
from tests.conftest import seven_image_copy, write_config
from tests.demo_names import DEMO_SDXL_NAME


class Item:
    def __init__(self, sha256):
        self.sha256 = sha256


def test_the_split_is_stable_and_sized_by_the_share():
    items = [Item(f"{n:064x}") for n in range(40)]
    kept, held = split_validation(items, 0.1)
    assert len(held) == 4 and len(kept) == 36 and not {id(i) for i in held} & {id(i) for i in kept}
    again, held_again = split_validation(list(reversed(items)), 0.1)
    assert {i.sha256 for i in held_again} == {i.sha256 for i in held}, "by content, not by order"
    assert split_validation(items[: MIN_IMAGES_FOR_A_SPLIT - 1], 0.5)[1] == []
    assert len(split_validation(items[:MIN_IMAGES_FOR_A_SPLIT], 0.01)[1]) == 1, "at least one"
    assert len(split_validation(items[:6], 0.5)[1]) == 3
    assert split_validation(items, 0.0) == (items, [])
    assert len(training_probe(kept, count=len(held))) == 4 and training_probe(kept, count=0) == []


@pytest.fixture
def seven_image_project(tmp_path, sdxl_project):
    """The shared 4-image SDXL project, its crops duplicated under new hashes to 7 images."""
    return seven_image_copy(sdxl_project, tmp_path / "projects")


def _train(projects, name, models_dir, loras, *, new_run=False, **options):
    # Two denoising steps per panel image: evaluations render the prompt panel at every checkpoint.
    values = {"project": name, "base_model": DEMO_SDXL_NAME, "rank": 4, "learning_rate": 1e-3, "seed": 3}
    values["sample_steps"] = 2
    config = config_from_dict(TrainConfig, {**values, "sample_every_steps": 0, "also_save_webui": False, **options})
    return train(config, projects_dir=projects, models_dir=models_dir, loras_dir=loras, new_run=new_run)


@pytest.mark.slow
def test_validation_during_training_and_a_re_evaluation_that_reproduces_it(
    seven_image_project, models_dir, tmp_path, capsys
):
    """Training measures at the start, every checkpoint and the end, from cached latents; ``evaluate``
    measures again from the images, and gets the same numbers."""
    from modules.lora_training.cli import main

    projects, name = seven_image_project
    result = _train(projects, name, models_dir, tmp_path / "loras", steps=6, save_every_steps=2, keep_checkpoints=1)
    assert result.status == "finished", result.message
    run = next((projects / name / "runs").iterdir())
    recorded = json.loads((run / "evaluation.json").read_text())
    assert len(recorded["validation_images"]) == 1 and len(recorded["training_images"]) == 1
    assert [r["step"] for r in recorded["records"]] == [0, 2, 4, 6]
    base, *trained = recorded["records"]
    assert base["checkpoint"] is None
    assert trained[-1]["training_images_loss"] < base["training_images_loss"], "the LoRA learned its images"
    best = recorded["best"]
    assert best == min(trained, key=lambda r: (r["validation_loss"], -r["step"]))
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert best["checkpoint"] in kept and "step-000006" in kept, "the best checkpoint survives pruning"
    assert [r["step"] for r in read_validation(run / "logs")] == [0, 2, 4, 6]
    assert len(read_metrics(run / "logs")) == 6, "step records and validation records stay apart"

    app_config = write_config(tmp_path, models_dir)  # its projects folder is the fixture's
    assert main(["--app-config", str(app_config), "evaluate", "--project", name, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    again = json.loads((run / "evaluation.json").read_text())
    assert [r["step"] for r in again["records"]] == [0, 2, 4, 6]
    for before, after in zip(recorded["records"], again["records"], strict=True):
        assert after["validation_loss"] == pytest.approx(before["validation_loss"], rel=1e-5)
        assert after["training_images_loss"] == pytest.approx(before["training_images_loss"], rel=1e-5)
    assert again["best"]["step"] == best["step"]
    assert f"{best['checkpoint']}  <- best" in printed and "(base model)" in printed
    _save_the_best_checkpoint(app_config, models_dir, name=name, best=best, run=run, capsys=capsys)
    _evaluate_as_a_job(app_config, name=name, best=best)


def _evaluate_as_a_job(app_config, *, name, best):
    """The tab's Evaluate: a job like training (the inference model handed over), its figures in the log."""
    from core.config import load_config
    from core.model_manager import ModelManager
    from modules.lora_training.jobs import TrainingJobs

    config = load_config(app_config)
    manager = ModelManager(models_dir=config.MODELS_DIR, loras_dir=config.LORAS_DIR, device="cpu")
    jobs = TrainingJobs(model_manager=manager, app_config=config)
    assert jobs.evaluate(name)["kind"] == "evaluate"
    with pytest.raises(UserError, match="already running"):
        jobs.evaluate(name)
    status = jobs.wait(timeout=120)
    assert status["state"] == "evaluated", status
    assert status["message"] == f"Best checkpoint: {best['checkpoint']} (step {best['step']})."
    measured = [step for step, _, _ in status["validation"]]
    assert measured == sorted({0, best["step"], 6}), "the base and each kept checkpoint"
    assert any("Validation at step 0 (the base model" in line for line in status["log"])
    with pytest.raises(UserError, match="no run 'nope'"):
        jobs.evaluate(name, run_id="nope")


def _save_the_best_checkpoint(app_config, models_dir, *, name, best, run, capsys):
    """The best checkpoint written as a LoRA: both files, its figures in the header, loads in plain diffusers."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file

    from families import family
    from modules.lora_training.cli import main

    assert main(["--app-config", str(app_config), "save-checkpoint", "--project", name, "--name", "best"]) == 0
    saved = app_config.parent / "loras" / "best.safetensors"
    assert (saved.parent / "webui" / "best.safetensors").is_file(), "the kohya/webui copy, verified"
    with safe_open(str(saved), "pt") as handle:
        header = handle.metadata()
    assert header["lora_studio.checkpoint_step"] == str(best["step"])
    assert float(header["lora_studio.validation_loss"]) == pytest.approx(best["validation_loss"], rel=1e-5)
    checkpoint = load_file(str(run / "checkpoints" / best["checkpoint"] / "lora.safetensors"))
    written = load_file(str(saved))
    some_key = next(k for k in checkpoint if k.endswith("lora_B.weight"))
    module = some_key.split("/", 1)[1].removesuffix(".lora_B.weight")
    _, main_key = family("sdxl").main_file_keys("unet", module)
    assert torch.allclose(written[main_key].float(), checkpoint[some_key], atol=1e-3), "the checkpoint's weights"
    pipe = StableDiffusionXLPipeline.from_pretrained(models_dir / DEMO_SDXL_NAME)
    pipe.load_lora_weights(str(saved), adapter_name="best")
    loaded = [n for n, m in pipe.unet.named_modules() if "best" in getattr(m, "lora_A", {})]
    assert len(loaded) == len(written) // 2 > 0, "every layer of the file found its module (a down and an up each)"
    assert main(["--app-config", str(app_config), "save-checkpoint", "--project", name, "--name", "best"]) == 2
    assert "already exists" in capsys.readouterr().err

    # The saved file, applied by diffusers' own loader, measures as its checkpoint did (fp16 weights: close).
    from modules.lora_training.evaluate import evaluate_lora_file

    config = __import__("core.config", fromlist=["load_config"]).load_config(app_config)
    figures = evaluate_lora_file(
        name, saved, projects_dir=config.LORA_PROJECTS_DIR, models_dir=config.MODELS_DIR, device="cpu"
    )
    assert figures["lora"]["validation_loss"] == pytest.approx(best["validation_loss"], rel=1e-3)
    assert figures["lora"]["training_images_loss"] < figures["base"]["training_images_loss"]
    where = {"projects_dir": config.LORA_PROJECTS_DIR, "models_dir": models_dir}
    with pytest.raises(UserError, match="x.safetensors cannot be read"):
        evaluate_lora_file(name, saved.parent / "x.safetensors", **where)
    (saved.parent / "notes.safetensors").write_text("not a LoRA")
    with pytest.raises(UserError, match="notes.safetensors does not load onto"):
        evaluate_lora_file(name, saved.parent / "notes.safetensors", **where)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_validation_under_half_precision(seven_image_project, models_dir, tmp_path, precision):
    """The figures are measured under the run's autocast (the GPU path, here on the CPU) and stay finite."""
    import math

    projects, name = seven_image_project
    result = _train(
        projects, name, models_dir, tmp_path / "loras", steps=2, save_every_steps=1, mixed_precision=precision
    )
    assert result.status == "finished", result.message
    run = next((projects / name / "runs").iterdir())
    records = json.loads((run / "evaluation.json").read_text())["records"]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(math.isfinite(r[key]) for r in records for key in ("validation_loss", "training_images_loss"))


def test_with_ema_saved_validation_measures_the_average(seven_image_project, models_dir, tmp_path):
    """ema_weights "ema": the figures (and so the best checkpoint and a sweep's objective) are those of the
    averaged weights the LoRA file holds, equal to a direct measure of them and unlike the trained weights'."""
    from modules.lora_training import checkpoints as ckpt
    from modules.lora_training.ema import load_averaged
    from modules.lora_training.evaluate import RunModel, RunUnderTest

    projects, name = seven_image_project
    ema = {"ema": True, "ema_decay": 0.5, "ema_start_step": 0, "ema_weights": "ema"}
    result = _train(projects, name, models_dir, tmp_path / "loras", steps=3, learning_rate=1e-2, **ema)
    assert result.status == "finished", result.message
    run = next((projects / name / "runs").iterdir())
    last = json.loads((run / "evaluation.json").read_text())["records"][-1]
    assert last["step"] == 3 and last["checkpoint"] == "step-000003"
    target = RunUnderTest.open(name, projects_dir=projects, run_id=run.name)
    model = RunModel(target.config, models_dir=models_dir, device="cpu")
    model.add_lora_layers()
    state = ckpt.load_checkpoint(run / "checkpoints" / "step-000003")
    model.family.load_lora_state_dict(state.lora)
    raw = model.loss(target.held_out)
    load_averaged(model.family.lora_modules(), state.ema)
    averaged = model.loss(target.held_out)
    assert last["validation_loss"] == pytest.approx(averaged, rel=1e-5)
    assert abs(raw - averaged) > 20 * 1e-5 * averaged, "the trained weights measure otherwise"
