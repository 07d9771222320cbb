"""The queue in the running app (run.sh), through Gradio's API: two clients adding jobs at once, and a
training killed with the app (SIGKILL) that resumes from its checkpoint when the app starts again."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time

import pytest

from core.config import load_config
from core.job_queue import JobStore
from tests.conftest import write_config
from tests.demo_names import DEMO_SDXL_NAME
from tests.image_folders import noise_image
from tests.server import app_process

STEPS = 40


def _until(predicate, *, timeout=180, what="the condition", every=0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def _job(client, job_id: int) -> dict:
    return next(job for job in client.predict(api_name="/queue_list") if job["id"] == job_id)


def _add_prepares(url: str, photos, name: str, answers: list, count: int = 3) -> None:
    from gradio_client import Client

    client = Client(url, verbose=False)
    settings = json.dumps({"images_dir": str(photos), "trigger": "ohwx", "captioner": "none", "resolution": 64})
    for number in range(count):
        answers.append(client.predict("prepare", f"{name}{number}", settings, api_name="/queue_add"))


def _concurrent_clients_add_jobs(url: str, photos) -> list[dict]:
    answers: list[dict] = []
    threads = [threading.Thread(target=_add_prepares, args=(url, photos, name, answers)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return answers


def _run_folders(projects, name) -> set:
    return set((projects / name / "runs").glob("*"))


def _queue_blocks_while_a_job_runs(url, client, *, name, photos) -> None:
    """Two clients add prepare jobs while a long training holds the device: each job gets its own place. The long
    training is then cancelled (training's Stop), so nothing here races the clock."""
    blocker = {"base_model": DEMO_SDXL_NAME, "steps": 100_000, "rank": 4, "save_every_steps": 0}
    blocker |= {"sample_every_steps": 0, "validation_share": 0.0}
    job = client.predict("train", name, json.dumps(blocker), api_name="/queue_add")
    assert (job["state"], job["started"], job["attempts"]) == ("running", True, 1)

    added = _concurrent_clients_add_jobs(url, photos)
    assert sorted(a["project"] for a in added) == ["a0", "a1", "a2", "b0", "b1", "b2"]
    queued = [j for j in client.predict(api_name="/queue_list") if j["state"] == "queued"]
    assert sorted(j["position"] for j in queued) == [1, 2, 3, 4, 5, 6], "each job once, in distinct places"
    for entry in queued:
        assert client.predict(entry["id"], api_name="/queue_cancel")["state"] == "cancelled"
    client.predict(job["id"], api_name="/queue_cancel")
    _until(lambda: _job(client, job["id"])["state"] == "cancelled", what="the long training to stop")


@pytest.mark.slow
def test_a_training_killed_with_the_app_resumes_after_a_restart(project, models_dir, tmp_path):
    from gradio_client import Client

    projects, name = project
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(2):
        noise_image(80, 80, seed=500 + index).save(photos / f"p{index}.png")
    config = write_config(tmp_path, models_dir, QUEUE_RESUME_INTERRUPTED=True, BUILD_DEMO_MODELS=False)
    settings = {"base_model": DEMO_SDXL_NAME, "steps": STEPS, "rank": 4, "save_every_steps": 2}
    settings |= {"sample_every_steps": 0, "validation_share": 0.0, "new_run": True}
    with app_process(config, tmp_path / "first.log") as (url, process):
        client = Client(url, verbose=False)
        _queue_blocks_while_a_job_runs(url, client, name=name, photos=photos)
        earlier = _run_folders(projects, name)

        def new_checkpoint():
            return any(list(run.glob("checkpoints/step-*")) for run in _run_folders(projects, name) - earlier)

        # Watching starts before the job is added: a loaded server may answer the request only after the
        # whole run, so the kill must not wait for the answer.
        killed = threading.Event()

        def kill_at_the_first_checkpoint():
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                if new_checkpoint():
                    os.killpg(process.pid, signal.SIGKILL)
                    killed.set()
                    return
                time.sleep(0.01)

        watcher = threading.Thread(target=kill_at_the_first_checkpoint, daemon=True)
        watcher.start()
        with contextlib.suppress(Exception):  # the app may be killed before it answers
            client.predict("train", name, json.dumps(settings), api_name="/queue_add")
        watcher.join(200)
        assert killed.is_set(), "no checkpoint of the new run appeared"
        process.wait(30)
    store = JobStore(load_config(config).QUEUE_DB)
    job = {"id": max(j.id for j in store.list_jobs() if j.kind == "train" and j.project == name)}
    left = store.get(job["id"])
    assert left.state == "running" and left.progress < 1, "killed mid-training"

    with app_process(config, tmp_path / "second.log") as (url, _):
        client = Client(url, verbose=False)
        done = _until(
            lambda: (j := _job(client, job["id"]))["state"] in ("finished", "failed", "cancelled") and j,
            what="the resumed job to end",
        )
        assert done["state"] == "finished", done
        assert done["attempts"] == 2 and done["result"].endswith(f"{name}.safetensors")
        status = client.predict(api_name="/training_status")
        assert status["step"] == STEPS
        assert any("Resuming run" in line for line in status["log"]), "continued from the checkpoint"
        assert [j["state"] for j in client.predict(api_name="/queue_list") if j["project"] != name] == ["cancelled"] * 6
