"""Sweeps through Gradio's API names, against the app started by run.sh: refusals, a 2-trial sweep, its status,
and the full run with the best settings."""

import json
import time

import pytest

from tests.conftest import write_config
from tests.demo_names import DEMO_SDXL_NAME
from tests.image_folders import noise_image
from tests.server import running_app

SPACE = {
    "parameters": {"learning_rate": [0.1, 0.01]},
    "fixed": {"steps": 2, "rank": 2},
    "trial_steps": 2,
    "reports": 1,
    "enqueue": [{"learning_rate": 0.1}, {"learning_rate": 0.01}],
}


@pytest.fixture(scope="module")
def app(tmp_path_factory, models_dir):
    folder = tmp_path_factory.mktemp("sweep_app")
    photos = folder / "photos"
    photos.mkdir()
    for index in range(6):
        noise_image(64 + 16 * index, 64, seed=400 + index).save(photos / f"p{index}.png")
    with running_app(write_config(folder, models_dir), folder / "app.log") as url:
        from gradio_client import Client

        yield Client(url, verbose=False), photos


def _idle(client, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.predict(api_name="/training_status")
        if not status["running"]:
            return status
        time.sleep(0.3)
    raise AssertionError(f"timed out; last status {status['state']}")


def test_a_sweep_through_the_api(app):
    from gradio_client.exceptions import AppError

    client, photos = app
    with pytest.raises(AppError, match="has no sweep yet"):
        client.predict("swept", "", api_name="/sweep_status")
    client.predict(str(photos), "swept", "ohwx", DEMO_SDXL_NAME, "none", "<CAPTION>", 64, api_name="/prepare_dataset")
    assert _idle(client)["state"] == "prepared"
    with pytest.raises(AppError, match="Unknown sweep parameter 'lr'"):
        client.predict("swept", DEMO_SDXL_NAME, '{"parameters": {"lr": [1]}}', 2, "", api_name="/sweep_start")
    with pytest.raises(AppError, match="number of trials must be a whole number from 1 to 500"):
        client.predict("swept", DEMO_SDXL_NAME, json.dumps(SPACE), 0, "", api_name="/sweep_start")

    started = client.predict("swept", DEMO_SDXL_NAME, json.dumps(SPACE), 2, "api", api_name="/sweep_start")
    assert started["kind"] == "sweep" and started["queue_id"], "a sweep goes through the job queue"
    done = _idle(client)
    assert done["state"] == "finished", done["message"]
    status = client.predict("swept", "api", api_name="/sweep_status")
    assert status["counts"] == {"complete": 2}, [row["error"] for row in status["trials"]]
    assert status["plot"].endswith("parallel-coordinates.png")
    assert [row["params"]["learning_rate"] for row in status["trials"]] == [0.1, 0.01]

    job = client.predict("swept", "", False, api_name="/sweep_train_best")
    assert job["kind"] == "train" and job["settings"]["learning_rate"] == status["best"]["params"]["learning_rate"]
    trained = _idle(client)
    assert trained["state"] == "finished" and trained["lora_path"].endswith("swept.safetensors"), trained["message"]
    ids = (started["queue_id"], job["queue_id"])
    deadline = time.monotonic() + 30  # the queue records a job's end at its next tick
    while True:
        queued = {row["id"]: row for row in client.predict(api_name="/queue_list")}
        if {queued[i]["state"] for i in ids} == {"finished"} or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert [(queued[i]["kind"], queued[i]["state"]) for i in ids] == [("sweep", "finished"), ("train", "finished")]
