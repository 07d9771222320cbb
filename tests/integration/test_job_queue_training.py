"""The queue running real LoRA Training jobs on the tiny demo model, in this process: a click starts at
once when nothing runs and waits its turn otherwise; cancel, retry (a stopped training resumes from its
checkpoint) and the job kinds' bad settings."""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

import pytest

from core.errors import UserError
from core.job_queue import JobStore
from core.job_runner import JobRunner
from core.model_manager import ModelManager
from modules.lora_training.config import PrepareConfig, TrainConfig, config_from_dict
from modules.lora_training.jobs import TrainingJobs
from modules.lora_training.queue_kinds import TrainingKinds
from modules.lora_training.ui import LoraTrainingTab
from tests.demo_names import DEMO_SDXL_NAME
from tests.image_folders import noise_image

QUICK = {"rank": 4, "save_every_steps": 0, "sample_every_steps": 0, "validation_share": 0.0}


@pytest.fixture
def queued_tab(project, models_dir, tmp_path):
    from core.config import ensure_folders, load_config
    from tests.conftest import write_config

    app_config = load_config(write_config(tmp_path, models_dir))  # its projects/ is the copy ``project`` made
    ensure_folders(app_config)
    manager = ModelManager(models_dir=app_config.MODELS_DIR, loras_dir=app_config.LORAS_DIR, device="cpu")
    runner = JobRunner(JobStore(app_config.QUEUE_DB), tick_s=0.05)
    tab = LoraTrainingTab(
        jobs=TrainingJobs(model_manager=manager, app_config=app_config),
        model_manager=manager,
        gestionnaire=SimpleNamespace(queue=runner),
        config=app_config,
    )
    runner.register(TrainingKinds(tab))
    runner.start()
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        noise_image(80, 80, seed=400 + index).save(photos / f"p{index}.png")
    yield tab, runner, photos, project[1]
    tab.jobs.stop()
    tab.jobs.wait(30)
    runner.close()


def _prepare(photos, project):
    values = {"project": project, "images_dir": str(photos), "trigger": "ohwx", "resolution": 64, "captioner": "none"}
    return config_from_dict(PrepareConfig, values)


def _train(project, **options):
    return config_from_dict(TrainConfig, {"project": project, "base_model": DEMO_SDXL_NAME, **QUICK, **options})


def _wait(runner, job_id, states, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = runner.store.get(job_id)
        if job.state in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {runner.store.get(job_id).state}")


def _batch_section(tab, runner):
    from core.model_manager import GenerateLimits
    from modules.generate.batch import BatchDefaults
    from modules.generate.batch_job import BatchRunner
    from modules.generate.batch_section import BatchSection

    defaults = BatchDefaults(model=DEMO_SDXL_NAME, size_for=lambda model: 64, limits=GenerateLimits())
    batches = BatchRunner(manager=tab.model_manager, outputs_dir=tab.config.OUTPUTS_DIR, defaults=lambda: defaults)
    return BatchSection(batches, queue=runner)


def test_clicks_start_at_once_or_wait_their_turn_and_cancelled_jobs_never_run(queued_tab):
    """A training, then two preparations and a batch in line behind it: one device job at a time, in order."""
    tab, runner, photos, name = queued_tab
    batches = _batch_section(tab, runner)
    first = tab.start(prepare=None, train=_train(name, steps=3))
    assert first["kind"] == "train" and first["job_id"] == 1 and first["queue_id"] == 1, "started at once"
    second = tab.start(prepare=_prepare(photos, "second"), train=None)
    third = tab.start(prepare=_prepare(photos, "third"), train=None)
    batch = batches.submit("prompt,steps\na red apple,2\na pear,2\n", base_seed=7)
    assert [(j["state"], j["position"]) for j in (second, third, batch)] == [
        ("queued", 1),
        ("queued", 2),
        ("queued", 3),
    ]
    with pytest.raises(UserError, match="Row 1, column steps"):
        batches.submit("prompt,steps\na,999\n")
    with pytest.raises(UserError, match=f"{name} already has a job in the queue .job 1, running."):
        tab.start(prepare=None, train=_train(name, steps=3))
    assert runner.cancel(third["queue_id"]).state == "cancelled"

    done = _wait(runner, first["queue_id"], ("finished", "failed"))
    assert (done.state, done.error) == ("finished", None) and done.result.endswith(f"{name}.safetensors")
    prepared = _wait(runner, second["queue_id"], ("finished", "failed"))
    assert prepared.state == "finished" and prepared.result.endswith("second/images"), prepared.error
    drawn = _wait(runner, batch["queue_id"], ("finished", "failed", "cancelled"))
    assert drawn.state == "finished" and drawn.progress == 1.0 and drawn.payload["base_seed"] == 7, drawn
    assert done.ended <= prepared.started <= prepared.ended <= drawn.started, "one device job at a time, in order"
    status = batches.runner.status()
    assert status["contact_sheet"] == drawn.result and [r["status"] for r in status["rows"]] == ["done", "done"]
    assert not (tab.config.LORA_PROJECTS_DIR / "third").exists(), "a cancelled job never runs"
    assert runner.retry(third["queue_id"]).state in ("queued", "running")
    assert _wait(runner, third["queue_id"], ("finished", "failed")).state == "finished"


def test_a_stopped_training_is_cancelled_and_its_retry_resumes_from_the_checkpoint(queued_tab, capsys):
    """Cancelled from the shell (``queue cancel``: another client of the queue file), retried through the API."""
    import json

    from modules.lora_training.cli import main

    tab, runner, _, name = queued_tab
    job = tab.start(prepare=None, train=_train(name, steps=8))
    deadline = time.monotonic() + 120
    while tab.jobs.snapshot()["step"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert main([*_cli(tab), "cancel", str(job["queue_id"])]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "running", "asked: the app stops it"
    stopped = _wait(runner, job["queue_id"], ("cancelled", "failed", "finished"), timeout=30)
    assert stopped.state == "cancelled" and "step-" in stopped.result, stopped
    step = tab.jobs.snapshot()["step"]
    resumed = tab.resume(name)  # the Resume button: the same queued job again
    assert resumed["queue_id"] == job["queue_id"] and resumed["kind"] == "train"
    assert runner.store.get(job["queue_id"]).attempts == 2
    finished = _wait(runner, job["queue_id"], ("finished", "failed"))
    assert finished.state == "finished", finished.error
    assert any(f"from step {step}" in line for line in tab.jobs.snapshot()["log"]), "resumed, not restarted"


def _cli(tab) -> list[str]:
    return ["--app-config", str(tab.config.LORA_PROJECTS_DIR.parent / "config.json"), "queue"]


@pytest.mark.parametrize(
    ("kind", "settings", "message"),
    [
        ("train", '{"steps": -5}', "steps"),
        ("train", '{"steps": 1e400}', "settings.steps must be a finite number"),
        ("train", '{"base_model": "nope.safetensors"}', "nope"),
        ("train", '{"sparkle": 1}', "unknown option"),
        ("prepare", '{"images_dir": "/nowhere", "trigger": "ohwx"}', "not inside the folders this app may read"),
        ("prepare+train", '{"prepare": 3, "train": {}}', '"prepare" and "train" objects'),
        ("evaluate", '{"best_rule": "vibes"}', "vibes|best"),
        ("train", '{"base_model": "M", "new_run": "yes"}', "new_run must be true or false"),
    ],
)
def test_bad_settings_of_each_kind_are_refused_before_queueing(queued_tab, kind, settings, message):
    tab, runner, _, name = queued_tab
    settings = settings.replace('"M"', f'"{DEMO_SDXL_NAME}"')
    if kind == "train" and "base_model" not in settings:
        settings = settings.replace("{", f'{{"base_model": "{DEMO_SDXL_NAME}", ', 1)
    with pytest.raises(UserError, match=message):
        runner.submit(kind, name, settings)
    assert runner.list_jobs() == []


def test_the_queue_command_adds_jobs_the_app_runs(queued_tab, capsys):
    import json

    from modules.lora_training.cli import main

    tab, runner, photos, name = queued_tab
    settings = json.dumps({"images_dir": str(photos), "trigger": "ohwx", "captioner": "none", "resolution": 64})
    assert main([*_cli(tab), "add", "prepare", "from-shell", settings]) == 0
    added = json.loads(capsys.readouterr().out)
    assert _wait(runner, added["id"], ("finished", "failed")).state == "finished", "the app ran it"
    assert main([*_cli(tab), "list"]) == 0
    assert re.search(rf"{added['id']}\s+prepare\s+from-shell\s+finished\s+100%", capsys.readouterr().out)
    for argv, message in (
        (["add", "nope", "p"], "Unknown job kind 'nope'"),
        (["add", "train", name, '{"steps": NaN}'], "NaN is not a number JSON allows"),
        (["move", "99", "1"], "No job 99 in the queue"),
        (["retry", "x"], "job id must be a whole number"),
    ):
        assert main([*_cli(tab), *argv]) == 2
        assert message in capsys.readouterr().err


def test_a_grid_asked_for_while_a_queued_training_runs_waits_for_it(queued_tab):
    """Draw grid renders on the device: it joins the line behind the running training, never beside it."""
    import shutil

    tab, runner, _, name = queued_tab
    drawn_run = tab.start(prepare=None, train=_train(name, steps=2, save_every_steps=1, sample_steps=1))
    assert _wait(runner, drawn_run["queue_id"], ("finished", "failed")).state == "finished"
    other = "other"
    shutil.copytree(tab.config.LORA_PROJECTS_DIR / name, tab.config.LORA_PROJECTS_DIR / other)
    shutil.rmtree(tab.config.LORA_PROJECTS_DIR / other / "runs")
    training = tab.start(prepare=None, train=_train(other, steps=200))
    assert training["state"] in ("starting", "training"), training
    with pytest.raises(UserError, match="rows must be one of"):
        tab.comparison_grid(name, run_id=None, rows="diagonal")
    grid = tab.comparison_grid(name, run_id=None, rows="checkpoints")
    assert (grid["state"], grid["kind"], grid["position"]) == ("queued", "grid", 1), grid
    assert tab.jobs.snapshot()["kind"] == "train", "the training goes on alone"
    runner.cancel(training["queue_id"])
    stopped = _wait(runner, training["queue_id"], ("cancelled", "failed", "finished"), timeout=60)
    drawn = _wait(runner, grid["queue_id"], ("finished", "failed", "cancelled"))
    assert drawn.state == "finished" and drawn.result.endswith("comparison-checkpoints.png"), drawn.error
    assert stopped.ended <= drawn.started, "one device job at a time"


def _stopped_at_step_2(tab, runner, job):
    deadline = time.monotonic() + 120
    while tab.jobs.snapshot()["step"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    runner.cancel(job["queue_id"])
    return _wait(runner, job["queue_id"], ("cancelled", "failed", "finished"), timeout=30)


def test_a_retried_training_continues_its_own_run_and_no_other(queued_tab):
    """Two stopped runs of one project: Retry of the older job resumes the older run, not the newest; a job
    whose run is gone fails saying so."""
    import shutil

    tab, runner, _, name = queued_tab
    first = tab.start(prepare=None, train=_train(name, steps=6))
    own = _stopped_at_step_2(tab, runner, first).run_id
    assert own and (tab.config.LORA_PROJECTS_DIR / name / "runs" / own).is_dir(), "recorded when the run started"
    second = tab.start(prepare=None, train=_train(name, steps=6), new_run=True)
    newer = _stopped_at_step_2(tab, runner, second).run_id
    assert newer and newer != own
    runner.retry(first["queue_id"])
    finished = _wait(runner, first["queue_id"], ("finished", "failed"))
    assert (finished.state, finished.run_id) == ("finished", own), finished.error
    assert any(f"Resuming run {own} from step" in line for line in tab.jobs.snapshot()["log"])
    shutil.rmtree(tab.config.LORA_PROJECTS_DIR / name / "runs" / newer)
    runner.retry(second["queue_id"])
    gone = _wait(runner, second["queue_id"], ("finished", "failed"))
    assert gone.state == "failed" and f"trained run {newer}" in gone.error and "is gone or finished" in gone.error, (
        gone.error
    )


def test_a_retried_job_without_a_recorded_run_resumes_the_newest(queued_tab):
    """A job from a queue file written before run ids (its run_id empty) resumes the project's newest run."""
    import sqlite3

    tab, runner, _, name = queued_tab
    job = tab.start(prepare=None, train=_train(name, steps=6))
    run_id = _stopped_at_step_2(tab, runner, job).run_id
    with sqlite3.connect(runner.store.path) as db:
        db.execute(
            "UPDATE jobs SET run_id = NULL, payload = json_remove(payload, '$.records_run') WHERE id = ?",
            (job["queue_id"],),
        )
    runner.retry(job["queue_id"])
    finished = _wait(runner, job["queue_id"], ("finished", "failed"))
    assert finished.state == "finished", finished.error
    assert any(f"Resuming run {run_id} from step" in line for line in tab.jobs.snapshot()["log"])


def test_a_retried_new_run_job_that_ended_before_its_run_started_starts_a_new_run(queued_tab):
    """Review 9 #6: a job asking for a new run, run once but ended before its run started (no run_id), is
    retried as first asked: a new run, never the project's stopped one."""
    import sqlite3

    tab, runner, _, name = queued_tab
    job = tab.start(prepare=None, train=_train(name, steps=4))
    stopped = _stopped_at_step_2(tab, runner, job).run_id
    with sqlite3.connect(runner.store.path) as db:  # as if it had ended while preparing, asked with new_run
        db.execute(
            "UPDATE jobs SET run_id = NULL, payload = json_set(payload, '$.new_run', json('true')) WHERE id = ?",
            (job["queue_id"],),
        )
    runner.retry(job["queue_id"])
    finished = _wait(runner, job["queue_id"], ("finished", "failed"))
    assert finished.state == "finished", finished.error
    assert finished.run_id not in (None, stopped)
    assert not any("Resuming run" in line for line in tab.jobs.snapshot()["log"])


def test_the_queue_command_adds_a_batch_checked_as_the_generate_tab_checks_it(app_config, capsys):
    """Review 9 #13: the help lists batch, and the command queues one (checked first; no project)."""
    import json

    from core.job_queue import JobStore
    from modules.lora_training.cli import main

    argv = ["--app-config", str(app_config.LORA_PROJECTS_DIR.parent / "config.json"), "queue", "add", "batch"]
    assert main([*argv, "", json.dumps({"batch": "prompt\na cat\n", "base_seed": 5})]) == 0
    added = json.loads(capsys.readouterr().out)
    job = JobStore(app_config.QUEUE_DB).get(added["id"])
    assert (job.kind, job.project, job.state, job.payload["base_seed"]) == ("batch", "", "queued", 5)
    for project, settings, message in (
        ("", {"batch": "prompt\n"}, "no rows"),
        ("evil", {"batch": "prompt\na cat\n"}, "belongs to no project"),
    ):
        assert main([*argv, project, json.dumps(settings)]) == 2
        assert message in capsys.readouterr().err
    assert len(JobStore(app_config.QUEUE_DB).list_jobs()) == 1
