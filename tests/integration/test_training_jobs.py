"""Training jobs in the server: GPU hand-off, one job at a time, stop/resume, status."""

import re
import threading
import time

import pytest

from core.errors import GpuBusyError, UserError
from core.model_manager import GenerationRequest, ModelManager
from modules.lora_training.config import PrepareConfig, TrainConfig, config_from_dict
from modules.lora_training.jobs import TrainingJobs, interrupted_projects, resumable_config
from tests.demo_names import DEMO_SDXL_NAME
from tests.image_folders import noise_image


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(3):
        noise_image(80, 80, seed=200 + index).save(folder / f"p{index}.png")
    return folder


@pytest.fixture
def jobs(app_config):
    manager = ModelManager(models_dir=app_config.MODELS_DIR, loras_dir=app_config.LORAS_DIR, device="cpu")
    return TrainingJobs(model_manager=manager, app_config=app_config)


def _configs(photos, **options):
    prepare = config_from_dict(
        PrepareConfig,
        {"project": "job", "images_dir": str(photos), "trigger": "ohwx", "resolution": 64, "captioner": "none"},
    )
    train = config_from_dict(
        TrainConfig, {"project": "job", "base_model": DEMO_SDXL_NAME, "steps": 400, "rank": 4, **options}
    )
    return prepare, train


def _wait_for(jobs, predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snapshot = jobs.snapshot()
        if predicate(snapshot):
            return snapshot
        time.sleep(0.1)
    raise AssertionError(f"timed out; last state {jobs.snapshot()['state']}")


def test_training_releases_the_model_and_restores_it(jobs, photos):
    manager = jobs.model_manager
    request = GenerationRequest(model=DEMO_SDXL_NAME, prompt="a cat", steps=2, width=64, height=64, seed=1)
    manager.generate(request)
    assert manager.loaded_model == DEMO_SDXL_NAME

    prepare, train = _configs(photos)
    jobs.start(prepare_config=prepare, train_config=train)
    _wait_for(jobs, lambda s: s["state"] == "training" and s["step"] >= 2)
    assert manager.loaded_model is None, "inference model released while training"
    with pytest.raises(GpuBusyError, match="training LoRA 'job'"):
        manager.generate(request)
    with pytest.raises(UserError, match="already running"):
        jobs.start(prepare_config=prepare, train_config=train)

    assert "Stopping" in jobs.stop()
    assert "Already stopping" in jobs.stop()
    snapshot = jobs.wait(60)
    assert snapshot["state"] == "stopped" and snapshot["checkpoint"]
    assert any("released for training" in line for line in snapshot["log"])
    assert manager.loaded_model == DEMO_SDXL_NAME, "restored after the job"
    assert manager.generate(request).image.size == (64, 64)
    assert jobs.stop() == "No job is running."

    assert interrupted_projects(jobs.app_config.LORA_PROJECTS_DIR, jobs.app_config.LORAS_DIR) == ["job"]
    with pytest.raises(UserError, match=r"Project job has a stopped run \d{8}-\d{6}-\w+ at step \d+: Resume it"):
        jobs.start(train_config=train)
    resumed = resumable_config(jobs.app_config.LORA_PROJECTS_DIR, "job")
    assert resumed.steps == 400
    quick = config_from_dict(TrainConfig, {**resumed.__dict__, "steps": snapshot["step"] + 2})
    jobs.start(train_config=quick, resume=True)
    final = jobs.wait(120)
    assert final["state"] == "finished", final["message"]
    assert any(f"from step {snapshot['step']}" in line and "Resuming run" in line for line in final["log"])
    steps = [step for step, _ in final["losses"]]
    assert steps == list(range(1, snapshot["step"] + 3)), "the loss history starts at step 1 across the resume"
    assert final["settings"]["project"] == "job" and final["settings"]["steps"] == snapshot["step"] + 2
    assert jobs.lora_version == 1
    assert "job.safetensors" in manager.list_loras()


def test_a_failing_job_never_leaves_the_server_stuck(jobs, photos, tmp_path):
    prepare, train = _configs(photos)
    with pytest.raises(UserError, match="does not exist"):  # refused before any job starts
        jobs.start(
            prepare_config=config_from_dict(
                PrepareConfig, {**prepare.__dict__, "images_dir": str(tmp_path / "missing")}
            )
        )
    unusable = tmp_path / "unusable"
    unusable.mkdir()
    (unusable / "a.png").write_text("not an image")
    bad = config_from_dict(PrepareConfig, {**prepare.__dict__, "images_dir": str(unusable)})
    jobs.start(prepare_config=bad, train_config=train)
    snapshot = jobs.wait(30)
    assert snapshot["state"] == "failed" and "No usable image" in snapshot["message"]
    assert not jobs.is_running()
    assert jobs.model_manager.busy_reason is None
    with pytest.raises(UserError, match="Nothing to do"):
        jobs.start()


def test_train_clicked_while_generating_stops_the_generation_at_its_next_step(jobs, photos):
    """The hand-off does not wait for a long generation: it stops at its next denoising step, with a
    message, and training runs; the model comes back afterwards."""
    import threading

    manager = jobs.model_manager
    request = GenerationRequest(model=DEMO_SDXL_NAME, prompt="a cat", steps=150, width=64, height=64, seed=1)
    manager.load_model(DEMO_SDXL_NAME)
    outcome = {}

    def generate():
        try:
            outcome["image"] = manager.generate(request).image
        except GpuBusyError as exc:
            outcome["error"] = str(exc)

    generating = threading.Thread(target=generate)
    generating.start()
    time.sleep(0.5)  # the generation holds the GPU lock now
    prepare, train = _configs(photos, steps=3)
    jobs.start(prepare_config=prepare, train_config=train)
    generating.join(60)
    assert "Generation stopped at step" in outcome.get("error", ""), outcome
    stopped, total = re.search(r"step (\d+)/(\d+)", outcome["error"]).groups()
    assert total == "150" and int(stopped) < 150, "the hand-off did not wait for the whole generation"
    final = jobs.wait(120)
    assert final["state"] == "finished", final["message"]
    assert manager.loaded_model == DEMO_SDXL_NAME


@pytest.mark.parametrize(
    ("code", "text", "fix"),
    [(28, "No space left on device", "Free some disk space"), (30, "Read-only file system", "permissions")],
)
def test_a_full_or_read_only_disk_says_what_to_fix(jobs, photos, monkeypatch, code, text, fix):
    import modules.lora_training.dataset.prepare as preparation

    def failing_write(*args, **kwargs):
        raise OSError(code, text, "/data/projects/job/manifest.json")

    monkeypatch.setattr(preparation, "prepare", failing_write)
    prepare, _ = _configs(photos)
    jobs.start(prepare_config=prepare)
    final = jobs.wait(60)
    assert final["state"] == "failed"
    assert "manifest.json" in final["message"] and text in final["message"] and fix in final["message"]
    assert "Resume" in final["message"] and "Unexpected error" not in final["message"]


def test_stop_is_honoured_while_the_run_counts_its_estimate_and_its_errors_never_fail_the_run(jobs):
    from modules.lora_training.jobs import JobState

    train = config_from_dict(TrainConfig, {"project": "job", "base_model": DEMO_SDXL_NAME, "rank": 4})
    job = JobState(job_id=1, project="job", kind="train")
    jobs.counted_steps._lock.acquire()  # a page's Estimate of the same model holds the count for 3 s
    release = threading.Timer(3, jobs.counted_steps._lock.release)
    release.start()
    threading.Timer(0.3, jobs._stop.set).start()
    started = time.monotonic()
    jobs._log_estimate(job, train)
    waited = time.monotonic() - started
    release.join()
    for thread in threading.enumerate():
        if thread.name == "run-estimate":
            thread.join(60)  # the abandoned count ends on its own
    jobs._stop.clear()
    assert waited < 1.5, "Stop is honoured within a second"
    assert "Stop was asked while it was being counted" in job.log[-1]

    class Broken:
        def work(self, key, count):
            raise NotImplementedError("no meta kernel for this operator")

    jobs.counted_steps = Broken()
    jobs._log_estimate(job, train)
    assert "No memory estimate: no meta kernel for this operator" in job.log[-1]
