"""The plain functions behind the LoRA Training tab's widgets (gallery, captions, presets)."""

import os
import shutil

import pytest

from core.config import config_from_dict
from core.errors import UserError
from core.model_manager import ModelManager
from modules.lora_training.config import TrainConfig
from modules.lora_training.config import config_from_dict as train_config_from_dict
from modules.lora_training.form import sample_prompt_list
from modules.lora_training.jobs import TrainingJobs
from modules.lora_training.status_view import format_eta
from modules.lora_training.ui import LoraTrainingTab


@pytest.fixture
def tab(sdxl_project, models_dir, tmp_path):
    projects, name = sdxl_project
    shutil.copytree(projects, tmp_path / "projects")
    config = config_from_dict(
        {
            "MODELS_DIR": str(models_dir),
            "LORAS_DIR": "loras",
            "LORA_PROJECTS_DIR": "projects",
            "OUTPUTS_DIR": "outputs",
            "DEFAULT_SDXL_MODEL_FOR_LORA": "demo-tiny-sdxl-RANDOM-WEIGHTS",
            "DEFAULT_FLUX_MODEL_FOR_LORA": "demo-tiny-flux-RANDOM-WEIGHTS",
            "DEFAULT_SD15_MODEL_FOR_LORA": "demo-tiny-sd15-RANDOM-WEIGHTS",
        },
        base_dir=tmp_path,
    )
    manager = ModelManager(models_dir=config.MODELS_DIR, loras_dir=config.LORAS_DIR, device="cpu")
    jobs = TrainingJobs(model_manager=manager, app_config=config)
    return LoraTrainingTab(jobs=jobs, model_manager=manager, gestionnaire=None, config=config), name


def test_gallery_and_caption_editing(tab, tmp_path):
    tab, name = tab
    gallery = tab.prepared_gallery(name)
    assert len(gallery) == 4 and all(caption.startswith("ohwx") for _, caption in gallery)
    image, _ = gallery[0]
    assert tab.save_caption(name, image, "ohwx, edited by hand ") == image.split("/")[-1]
    assert tab.prepared_gallery(name)[0][1] == "ohwx, edited by hand"
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(b"x")
    with pytest.raises(UserError, match="not part of this project"):
        tab.save_caption(name, str(outside), "nope")
    assert tab.prepared_gallery("../escape") == []


def test_presets_models_and_helpers(tab):
    tab, _ = tab
    assert {"sdxl-8gb", "sdxl-24gb", "flux-24gb", "flux-16gb", "flux-12gb"} <= set(tab.presets())
    assert tab.read_preset("sdxl-8gb")["options"]["optimizer"] == "adamw8bit"
    for shipped in ("sdxl-8gb", "sdxl-12gb", "sdxl-16gb", "sdxl-24gb", "flux-12gb", "flux-16gb", "flux-24gb"):
        options = tab.read_preset(shipped)["options"]
        train_config_from_dict(TrainConfig, {"project": "p", "base_model": "m", **options})
    assert tab.read_preset("flux-12gb")["options"]["base_quantization"] == "nf4"
    saved = tab.write_preset("mine", resolution=768, options={"rank": 8, "optimizer": "lion"})
    assert saved == "mine" and "mine" in tab.presets()
    with pytest.raises(UserError, match="optimizer must be one of"):
        tab.write_preset("bad", resolution=768, options={"optimizer": "sgd"})
    with pytest.raises(UserError, match="not found"):
        tab.read_preset("missing")
    assert ("demo-tiny-flux-RANDOM-WEIGHTS (Flux)", "demo-tiny-flux-RANDOM-WEIGHTS") in tab.model_choices()
    assert tab.resolution_for("demo-tiny-sdxl-RANDOM-WEIGHTS") == 64
    assert format_eta(3725) == "1h02m" and format_eta(65) == "1m05s" and format_eta(None) == "?"
    assert sample_prompt_list("", "man") == ("photo of {trigger} man",)
    assert sample_prompt_list("{trigger} as a {class}\n\n", "dog") == ("{trigger} as a dog",)


def test_the_run_log_and_the_estimate_button_give_the_same_memory_figure(tab):
    tab, name = tab
    values = {"project": name, "base_model": "demo-tiny-sdxl-RANDOM-WEIGHTS", "resolution": 64, "rank": 4}
    options = {"steps": 1, "save_every_steps": 0, "sample_every_steps": 0, "also_save_webui": False}
    config = tab.train_config({**tab.train_values(values), **options})
    button = tab.estimate({**values, **options}, {}, strings={}).split("\n\n")
    assert button[0].startswith("Estimated peak memory") and "activations counted" in button[0]
    assert "s/step" in button[1], "the button also times a step when no job holds the device"
    counted = tab.jobs.counted_steps
    assert counted.counts == 1
    tab.start(prepare=None, train=config)
    status = tab.jobs.wait(timeout=120)
    assert status["state"] == "finished", status
    logged = [line.split("  ", 1)[1] for line in status["log"] if "Estimated peak memory" in line]
    assert logged == [button[0]]
    assert counted.counts == 1, "the run's estimate reused the button's count of the same settings"
    from modules.lora_training.estimate import estimate_run

    def memory_only(run_config):
        return estimate_run(run_config, models_dir=tab.config.MODELS_DIR, resolution=64, timing=False, counted=counted)

    memory_only(tab.train_config({**tab.train_values({**values, "rank": 8}), **options}))
    assert counted.counts == 2, "other settings are counted again"
    weights = next((tab.config.MODELS_DIR / values["base_model"] / "unet").glob("*.safetensors"))
    times = (weights.stat().st_atime_ns, weights.stat().st_mtime_ns)
    os.utime(weights, ns=(times[0], times[1] + 10**9))
    try:
        memory_only(config)
    finally:
        os.utime(weights, ns=times)  # the demo model is shared by the session's tests
    assert counted.counts == 3, "a model file changed in place is counted again"
