"""The training flow through Gradio's API names, against the app started by run.sh."""

import time

import pytest

from tests.conftest import write_config
from tests.demo_names import DEMO_SDXL_NAME
from tests.image_folders import noise_image
from tests.server import running_app


@pytest.fixture(scope="module")
def app(tmp_path_factory, models_dir):
    folder = tmp_path_factory.mktemp("training_app")
    photos = folder / "photos"
    photos.mkdir()
    for index in range(3):
        noise_image(80, 96, seed=300 + index).save(photos / f"p{index}.png")
    config = write_config(folder, models_dir)
    with running_app(config, folder / "app.log") as url:
        from gradio_client import Client

        yield Client(url, verbose=False), photos, folder


def _status_until(client, predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.predict(api_name="/training_status")
        if predicate(status):
            return status
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting; last status {status['state']}")


def test_prepare_train_stop_resume_through_the_api(app):
    from gradio_client.exceptions import AppError

    client, photos, folder = app
    prepared = client.predict(
        str(photos), "api", "ohwx", DEMO_SDXL_NAME, "none", "<CAPTION>", 64, api_name="/prepare_dataset"
    )
    assert prepared["kind"] == "prepare"
    done = _status_until(client, lambda s: not s["running"])
    assert done["state"] == "prepared", done["message"]

    options = {"steps": 60, "rank": 4, "save_every_steps": 0, "sample_every_steps": 0, "sample_steps": 2}
    started = client.predict(
        str(photos), "api", "ohwx", DEMO_SDXL_NAME, options, False, "none", 64, api_name="/train_lora"
    )
    assert started["kind"] == "train"
    _status_until(client, lambda s: s["state"] == "training" and s["step"] >= 2)
    with pytest.raises(AppError, match="training LoRA .api. is in progress"):
        client.predict(DEMO_SDXL_NAME, "a cat", "", 2, 5.0, 64, 64, 1, *(None, 1.0) * 4, api_name="/generate")
    with pytest.raises(AppError, match="api already has a job in the queue .job 2, running."):
        client.predict(str(photos), "api", "ohwx", DEMO_SDXL_NAME, options, False, "none", 64, api_name="/train_lora")

    assert "Stopping" in client.predict(api_name="/stop_training")
    stopped = _status_until(client, lambda s: not s["running"])
    assert stopped["state"] == "stopped" and "step-" in stopped["checkpoint"]
    with pytest.raises(AppError, match="has a stopped run .* at step"):
        client.predict(str(photos), "api", "ohwx", DEMO_SDXL_NAME, options, False, "none", 64, api_name="/train_lora")

    client.predict("api", api_name="/resume_training")
    finished = _status_until(client, lambda s: not s["running"], timeout=180)
    assert finished["state"] == "finished", finished["message"]
    assert finished["step"] == 60
    assert "api.safetensors" in client.predict(api_name="/list_loras")
    path, _ = client.predict(
        DEMO_SDXL_NAME, "ohwx", "", 2, 5.0, 64, 64, 1, "api.safetensors", 1.0, *(None, 1.0) * 3, api_name="/generate"
    )
    assert path.endswith(".png")
    with pytest.raises(AppError, match="no stopped run"):
        client.predict("nothing-here", api_name="/resume_training")


def test_evaluation_grid_and_caption_tools_through_the_api(app):
    """On the project the first test trained: Evaluate with the CLIP rule, the weights grid, caption tools."""
    from gradio_client.exceptions import AppError

    client, _, folder = app
    started = client.predict("api", "", "subject_similarity", 1.0, api_name="/evaluate_lora")
    assert started["kind"] == "evaluate" and started["queue_id"], "an evaluation goes through the job queue"
    evaluated = _status_until(client, lambda s: not s["running"])
    assert evaluated["state"] == "evaluated", evaluated["message"]
    assert evaluated["message"] == "Best checkpoint: step-000060 (step 60)."
    assert evaluated["grid"].endswith("comparison-checkpoints.png")
    client.predict("api", "", "weights", api_name="/comparison_grid")
    drawn = _status_until(client, lambda s: not s["running"])
    assert drawn["state"] == "evaluated" and drawn["grid"].endswith("comparison-weights.png"), drawn["message"]
    with pytest.raises(AppError, match="rows must be one of"):
        client.predict("api", "", "diagonal", api_name="/comparison_grid")

    added = client.predict("api", "add", "sunny", "", api_name="/caption_tools")
    assert added["changed"] == 3 and ["sunny", 3] in added["frequencies"]
    assert client.predict("api", "undo", "", "", api_name="/caption_tools")["changed"] == 3
    counts = dict(map(tuple, client.predict("api", "frequencies", "", "", api_name="/caption_tools")["frequencies"]))
    assert "sunny" not in counts and counts["ohwx"] == 3


def test_photos_uploaded_through_the_api_are_prepared_from_the_project(app):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client, photos, folder = app
    files = [handle_file(str(p)) for p in sorted(photos.iterdir())]
    images_dir, _ = client.predict("uploaded", files, api_name="/upload_images")
    assert images_dir == str(folder / "projects" / "uploaded" / "source")
    assert sorted(p.name for p in (folder / "projects" / "uploaded" / "source").iterdir()) == sorted(
        p.name for p in photos.iterdir()
    )
    client.predict(images_dir, "uploaded", "ohwx", DEMO_SDXL_NAME, "none", "<CAPTION>", 64, api_name="/prepare_dataset")
    assert _status_until(client, lambda s: not s["running"])["state"] == "prepared"
    with pytest.raises(AppError, match="Project name is empty"):
        client.predict("", files, api_name="/upload_images")
