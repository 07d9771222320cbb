"""Hyper-parameter sweeps on the tiny SDXL: a 4-trial study in SQLite whose deliberately bad trial Optuna's pruner
stops from its reported validation losses, the best settings trained as a full run, Stop within a second, a killed
worker's trial run again, and two worker processes sharing one study on a real PostgreSQL server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from core.errors import UserError
from core.model_manager import ModelManager
from modules.lora_training.jobs import TrainingJobs
from modules.lora_training.sweep import Place, best_train_config, find_study, open_sweep
from modules.lora_training.sweep_results import trials_table
from modules.lora_training.sweep_section import SweepSection
from tests.conftest import ROOT, seven_image_copy, write_config
from tests.demo_names import DEMO_SDXL_NAME
from tests.pg_server import available, postgres_server

# On the random tiny model a higher rate lowers the validation loss faster; 1e-7 learns nothing; at 10 the loss
# turns non-finite and training gives up.
GOOD, SECOND, BAD, FAILING = 0.1, 0.05, 1e-7, 10.0
PARAMETERS = {"learning_rate": {"low": 1e-7, "high": 0.3, "log": True}, "rank": [2, 4]}
SPACE = {
    "parameters": {**PARAMETERS, "learning_rate": {"low": 1e-7, "high": 10.0, "log": True}},
    "fixed": {"steps": 4, "seed": 3},  # the full run's length; each trial trains trial_steps
    "trial_steps": 6,
    "reports": 3,
    "pruner": {"type": "median", "startup_trials": 2},
    "sampler": {"seed": 7},
    # A good trial, one that fails, a second good one; the last learns nothing, and the median pruner sees it at
    # its first report.
    "enqueue": [
        {"learning_rate": GOOD, "rank": 4},
        {"learning_rate": FAILING, "rank": 4},
        {"learning_rate": SECOND, "rank": 2},
        {"learning_rate": BAD, "rank": 4},
    ],
}


@pytest.fixture
def sweep_app(tmp_path, sdxl_project, models_dir):
    """An app config whose projects folder holds a 7-image copy of the tiny project (one image held out)."""
    from core.config import ensure_folders, load_config

    seven_image_copy(sdxl_project, tmp_path / "projects")
    config = load_config(write_config(tmp_path, models_dir))
    ensure_folders(config)
    return config


@pytest.fixture
def jobs(sweep_app):
    manager = ModelManager(models_dir=sweep_app.MODELS_DIR, loras_dir=sweep_app.LORAS_DIR, device="cpu")
    return TrainingJobs(model_manager=manager, app_config=sweep_app)


def _wait(jobs, predicate, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snapshot = jobs.snapshot()
        if predicate(snapshot):
            return snapshot
        time.sleep(0.05)
    raise AssertionError(f"timed out; last state {jobs.snapshot()['state']}: {jobs.snapshot()['log'][-5:]}")


def _place(config) -> Place:
    return Place(config.LORA_PROJECTS_DIR, config.MODELS_DIR, "tiny")


def test_a_sweep_prunes_the_bad_trial_and_trains_the_best_settings(jobs, sweep_app):
    section = SweepSection(SimpleNamespace(config=sweep_app, jobs=jobs, queue=None), strings={})
    started = section.start("tiny", base_model=DEMO_SDXL_NAME, space_text=json.dumps(SPACE), trials=4, study="s1")
    assert started["kind"] == "sweep"
    done = _wait(jobs, lambda s: not s["running"])
    assert done["state"] == "finished", done["message"]

    rows = {row["number"]: row for row in trials_table(find_study(_place(sweep_app), "s1"))}
    assert sorted(rows) == [0, 1, 2, 3], "exactly the budget"
    assert [rows[n]["state"] for n in range(4)] == ["complete", "fail", "complete", "pruned"]
    assert "not finite" in rows[1]["error"], "a failing trial is recorded with its error, and the sweep goes on"
    assert rows[3]["params"]["learning_rate"] == BAD and rows[3]["pruned_at_step"] == 2
    assert rows[3]["last_step"] == 2, "the pruner stopped it at its first report, through training's Stop"
    assert rows[0]["last_step"] == 6 and rows[2]["last_step"] == 6
    workspace = sweep_app.LORA_PROJECTS_DIR / "tiny" / "sweeps" / "s1" / "workspace" / "tiny"
    assert not list(workspace.glob("runs/*/checkpoints")), "trial checkpoints are deleted"
    assert not (sweep_app.LORA_PROJECTS_DIR / "tiny" / "runs").exists(), "trials never mix with the project's runs"

    status = section.status("tiny", "")  # the newest study
    assert status["study"] == "s1" and status["counts"]["pruned"] >= 1
    assert set(status["importance"]) <= {"learning_rate", "rank"}
    assert Image.open(status["plot"]).size == (900, 420)
    best = min((r for r in rows.values() if r["state"] == "complete"), key=lambda r: r["value"])
    assert status["best"]["number"] == best["number"]

    config = best_train_config(find_study(_place(sweep_app), "s1"))
    assert (config.learning_rate, config.rank, config.steps) == (
        best["params"]["learning_rate"],
        best["params"]["rank"],
        4,
    )
    job = section.train_best("tiny", "s1")
    assert job["kind"] == "train" and job["settings"]["learning_rate"] == best["params"]["learning_rate"]
    trained = _wait(jobs, lambda s: not s["running"])
    assert trained["state"] == "finished", trained["message"]
    from modules.lora_training.train import lora_header

    header = lora_header(Path(trained["lora_path"]))
    assert header["lora_studio.rank"] == str(best["params"]["rank"])


def test_stop_ends_a_sweep_within_a_second_and_its_trial_waits_to_run_again(jobs, sweep_app):
    space = {**SPACE, "trial_steps": 400, "enqueue": [{"learning_rate": GOOD, "rank": 4}]}
    jobs.sweep("tiny", space_text=json.dumps(space), trials=2, base_model=DEMO_SDXL_NAME, study="stopped")
    running = _wait(jobs, lambda s: s["step"] >= 3)
    asked = time.monotonic()
    jobs.stop()
    done = _wait(jobs, lambda s: not s["running"], timeout=30)
    # Training stops after the step in flight (a fraction of a second here, slower on a loaded machine).
    assert time.monotonic() - asked < 1.0 + 2 * running["s_per_step"] and done["state"] == "stopped"
    study = find_study(_place(sweep_app), "stopped")
    states = {row["number"]: (row["state"], row["params"]) for row in trials_table(study)}
    assert states[0] == ("fail", {"learning_rate": GOOD, "rank": 4})
    assert study.optuna_study.trials[0].user_attrs["interrupted"] is True
    assert ("waiting", {"learning_rate": GOOD, "rank": 4}) in states.values(), "the slot keeps its parameters"
    assert [s for s, _ in states.values()].count("waiting") == 2, "the budget is still 2 trials"


def _worker(config_path: Path, *arguments: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "modules.lora_training", "--app-config", str(config_path), "sweep"]
    # One thread each: two workers with a thread per core each would fight over the cores (several times slower).
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*command, "--project", "tiny", *arguments],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _ran(output: str) -> list[int]:
    line = next(line for line in output.splitlines() if line.startswith("trials run by this worker: "))
    return json.loads(line.split(": ", 1)[1])


@pytest.mark.slow
def test_a_killed_worker_s_trial_is_failed_and_run_again(sweep_app, tmp_path):
    """SIGKILL a worker mid-trial: the next worker finds its trial stale (no heartbeat), marks it failed, runs a
    copy with the same parameters, and the study reaches its budget."""
    config_path = tmp_path / "config.json"
    space_path = tmp_path / "space.json"
    space = {**SPACE, "trial_steps": 6, "reports": 2, "enqueue": [{"learning_rate": GOOD, "rank": 4}]}
    space_path.write_text(json.dumps(space))
    first = _worker(
        config_path, "--trials", "1", "--space", str(space_path), "--base-model", DEMO_SDXL_NAME, "--study", "killed"
    )
    for line in first.stdout:
        if line.startswith("step 1/"):
            break
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(3)  # past the grace period below
    second = _worker(config_path, "--join", "killed", "--heartbeat", "1", "--grace", "2")
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output[-3000:]
    rows = trials_table(find_study(_place(sweep_app), "killed"))
    states = [row["state"] for row in rows]
    assert states[0] == "fail" and rows[0]["error"] == "", "the killed trial: failed by the heartbeat check"
    assert len(rows) == 2 and states[1] == "complete", "the budget's one trial ran to its end, after the killed one"
    assert rows[1]["params"] == {"learning_rate": GOOD, "rank": 4}, "run again with the killed trial's parameters"


@pytest.mark.slow
def test_two_worker_processes_share_one_study_on_postgresql(sweep_app, tmp_path):
    if not available():
        pytest.skip("PostgreSQL is not installed (initdb/pg_ctl): install Debian's postgresql package (.ci/run does)")
    config_path = tmp_path / "config.json"
    space = {**SPACE, "parameters": PARAMETERS, "trial_steps": 8, "reports": 2, "enqueue": []}
    with postgres_server() as url:
        open_sweep(
            _place(sweep_app),
            space_text=json.dumps(space),
            trials=4,
            base_model=DEMO_SDXL_NAME,
            study="pg",
            storage_url=url,
        )
        workers = [_worker(config_path, "--join", "pg", "--storage", url) for _ in range(2)]
        outputs = [worker.communicate(timeout=400)[0] for worker in workers]
        for worker, output in zip(workers, outputs, strict=True):
            assert worker.returncode == 0, output[-3000:]
        ran = [_ran(output) for output in outputs]
        assert all(ran), f"each worker ran at least one trial: {ran}"
        assert sorted(ran[0] + ran[1]) == [0, 1, 2, 3], f"every trial ran once: {ran}"
        rows = trials_table(find_study(_place(sweep_app), "pg", storage_url=url))
        assert len(rows) == 4 and all(row["state"] in ("complete", "pruned") for row in rows)
        assert len({row["worker"] for row in rows}) == 2


def test_bad_sweep_requests_are_refused_before_anything_is_stored(
    sweep_app, sdxl_project, models_dir, tmp_path, capsys
):
    import shutil

    from core.errors import UserError
    from modules.lora_training.cli import main
    from modules.lora_training.sweep import study_names

    place, text = _place(sweep_app), json.dumps(SPACE)
    shutil.copytree(sdxl_project[0], tmp_path / "small")
    small = Place(tmp_path / "small", models_dir, sdxl_project[1])  # 4 images: none can be held out
    refusals = [
        (lambda: open_sweep(small, space_text=text, trials=4, base_model=DEMO_SDXL_NAME), "holds no images out"),
        (lambda: open_sweep(place, space_text=text, trials=4, base_model="nope.safetensors"), "nope.safetensors"),
        (lambda: open_sweep(place, space_text=text, trials=4), "Give the base model"),
        (lambda: open_sweep(place, space_text=text, base_model=DEMO_SDXL_NAME), "Give the number of trials"),
        (lambda: open_sweep(place, space_text="{}", trials=4, base_model=DEMO_SDXL_NAME), '"parameters" must be'),
        (lambda: open_sweep(place, study="../x", space_text=text, trials=4, base_model=DEMO_SDXL_NAME), "Study name"),
        (lambda: open_sweep(place, study="none", join=True), "No sweep study named 'none'"),
        (lambda: open_sweep(place, space_text=text, trials=4, storage_url="sweeps.db"), "is not a database URL"),
        (
            lambda: open_sweep(
                place, space_text=text, trials=4, storage_url="postgresql+psycopg://x:secret@127.0.0.1:1/db"
            ),
            "Cannot open the sweep storage postgresql+psycopg://x:***@127.0.0.1:1/db",
        ),
    ]
    for call, says in refusals:
        with pytest.raises(UserError) as refused:
            call()
        assert says in str(refused.value)
        assert "secret" not in str(refused.value)
    assert study_names(place) == [] and study_names(small) == [], "nothing was stored"

    open_sweep(place, space_text=text, trials=4, base_model=DEMO_SDXL_NAME, study="once")
    with pytest.raises(UserError, match="already exists: join it"):
        open_sweep(place, space_text=text, trials=4, base_model=DEMO_SDXL_NAME, study="once")
    with pytest.raises(UserError, match="has another search space"):
        open_sweep(place, space_text=json.dumps({**SPACE, "reports": 2}), study="once", join=True)
    joined = open_sweep(place, study="once", join=True, trials=6)
    assert joined.budget == 6 and len(trials_table(joined)) == 6, "a larger budget queues more trials"
    with pytest.raises(UserError, match="has no complete trial yet"):
        best_train_config(joined)

    config = str(tmp_path / "config.json")
    assert main(["--app-config", config, "sweep", "--project", "tiny", "--trials", "2"]) == 2
    assert main(["--app-config", config, "sweep", "--project", "tiny", "--join", "once", "--grace", "0"]) == 2
    assert main(["--app-config", config, "sweep", "--project", "tiny", "--join", "once", "--results"]) == 0
    printed = capsys.readouterr()
    assert "Give the search space" in printed.err and "--grace must be from 1 to 3600" in printed.err
    assert "study once on tiny: budget 6, {'waiting': 6}" in printed.out


def test_the_clip_objective_scores_each_segment_and_resumes_between_them(sweep_app):
    """With ``"objective": "subject_similarity"`` a trial trains to each report step, stops there, scores its
    checkpoint's prompt panel with the demo CLIP, and resumes; the study maximises the score."""
    from modules.lora_training.sweep import run_worker

    space = {
        "parameters": {"learning_rate": [0.1, 0.01]},
        "objective": "subject_similarity",
        "fixed": {"sample_steps": 2, "rank": 2, "seed": 3},
        "trial_steps": 4,
        "reports": 2,
        "pruner": {"type": "none"},
        "enqueue": [{"learning_rate": 0.1}],
    }
    place = _place(sweep_app)
    study = open_sweep(place, space_text=json.dumps(space), trials=1, base_model=DEMO_SDXL_NAME, study="clip")
    events = []
    done = run_worker(study, place=place, on_event=events.append)
    assert done.outcomes == {0: "complete"}, [getattr(e, "message", "") for e in events][-8:]
    assert study.optuna_study.direction.name == "MAXIMIZE"
    trials = study.optuna_study.trials
    assert [sorted(t.intermediate_values) for t in trials] == [[2, 4]], "a CLIP score after each segment"
    assert all(t.value == t.intermediate_values[4] for t in trials), "the score of the last checkpoint"
    runs = list((sweep_app.LORA_PROJECTS_DIR / "tiny" / "sweeps" / "clip" / "workspace" / "tiny" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "finished.json").is_file(), "one run, resumed from its step-2 checkpoint"
    assert best_train_config(study).learning_rate == max(trials, key=lambda t: t.value).params["learning_rate"]


def test_asking_for_the_sweeps_of_any_project_name_creates_nothing(tmp_path):
    projects = tmp_path / "projects"
    projects.mkdir()
    with pytest.raises(UserError, match="has no sweep yet"):
        find_study(Place(projects, tmp_path / "models", "ghost"))
    assert list(projects.iterdir()) == [], "no folder and no database for a project that does not exist"


def test_a_queued_sweep_creates_its_study_when_it_starts_and_a_cancelled_one_leaves_none(sweep_app):
    from core.job_queue import JobStore
    from core.job_runner import JobRunner
    from modules.lora_training.queue_kinds import TrainingKinds
    from modules.lora_training.sweep import study_names
    from modules.lora_training.ui import LoraTrainingTab

    manager = ModelManager(models_dir=sweep_app.MODELS_DIR, loras_dir=sweep_app.LORAS_DIR, device="cpu")
    runner = JobRunner(JobStore(sweep_app.QUEUE_DB))
    tab = LoraTrainingTab(
        jobs=TrainingJobs(model_manager=manager, app_config=sweep_app),
        model_manager=manager,
        gestionnaire=SimpleNamespace(queue=runner),
        config=sweep_app,
    )
    runner.register(TrainingKinds(tab))
    section, place = SweepSection(tab, strings={}), _place(sweep_app)
    with runner.device_lent("a test"):  # the device is busy: the sweep waits in line
        with pytest.raises(UserError, match="nope.safetensors"):
            section.start("tiny", base_model="nope.safetensors", space_text=json.dumps(SPACE), trials=4)
        queued = section.start("tiny", base_model=DEMO_SDXL_NAME, space_text=json.dumps(SPACE), trials=4)
        assert queued["state"] == "queued" and runner.store.get(queued["queue_id"]).payload["study"]
        assert study_names(place) == [], "no study before the job starts"
        runner.cancel(queued["queue_id"])
    assert study_names(place) == [] and not (place.paths.root / "sweeps").exists(), "a cancelled sweep left nothing"


def test_sweep_status_leaves_no_database_connection_open(sweep_app):
    """Optuna keeps a storage's connections until it is garbage-collected (a PostgreSQL connection per status
    call): each status closes its own."""
    import contextlib
    import gc

    from modules.lora_training.sweep_study import sweeps_dir

    place = _place(sweep_app)
    with open_sweep(place, space_text=json.dumps(SPACE), trials=4, base_model=DEMO_SDXL_NAME, study="s"):
        pass
    section = SweepSection(SimpleNamespace(config=sweep_app, jobs=None, queue=None), strings={})
    database = str(sweeps_dir(place.paths) / "sweeps.db")

    def open_connections() -> int:
        found = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
                found += os.readlink(f"/proc/self/fd/{fd}") == database
        return found

    gc.disable()  # what the collector would free late (never, for a busy server) is not counted as closed
    try:
        for _ in range(4):
            assert section.status("tiny", "s")["study"] == "s"
            with pytest.raises(UserError, match="has no complete trial yet"):
                section.train_best("tiny", "s")
        assert open_connections() == 0
    finally:
        gc.enable()
