"""The app as a user starts it (./run.sh), driven through Gradio's API."""

import pytest
from PIL import Image

from tests.conftest import write_config
from tests.demo_names import DEMO_FLUX_NAME, DEMO_SD15_NAME, DEMO_SDXL_NAME
from tests.lora_files import write_diffusers_lora
from tests.server import running_app

NO_LORAS = (None, 1.0) * 4


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, models_dir):
    folder = tmp_path_factory.mktemp("app")
    config = write_config(folder, models_dir)
    with running_app(config, folder / "app.log") as url:
        yield url, folder


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url[0], verbose=False)


def test_page_and_lists(app_url, client):
    import urllib.request

    with urllib.request.urlopen(app_url[0]) as response:
        assert response.status == 200
    models = {m["name"]: m["family"] for m in client.predict(api_name="/list_models")}
    assert models[DEMO_SDXL_NAME] == "sdxl" and models[DEMO_FLUX_NAME] == "flux"
    assert models[DEMO_SD15_NAME] == models[f"{DEMO_SD15_NAME}.safetensors"] == "sd15"
    assert client.predict(api_name="/list_loras") == []


@pytest.mark.parametrize(
    ("model", "guidance"), [(DEMO_SDXL_NAME, 5.0), (DEMO_FLUX_NAME, 3.5), (f"{DEMO_SD15_NAME}.safetensors", 7.5)]
)
def test_generate_returns_an_image_with_its_settings(client, model, guidance):
    path, status = client.predict(model, "a red apple", "", 3, guidance, 64, 64, 11, *NO_LORAS, api_name="/generate")
    image = Image.open(path)
    assert image.size == (64, 64)
    assert "Seed: 11" in image.info["parameters"] and model in image.info["parameters"]
    assert "seed 11" in status


def test_new_lora_is_listed_and_used_without_restart(app_url, client, demo_paths):
    write_diffusers_lora(demo_paths.sdxl_folder, app_url[1] / "loras" / "fresh.safetensors", family="sdxl")
    assert "fresh.safetensors" in client.predict(api_name="/list_loras")
    path, _ = client.predict(
        DEMO_SDXL_NAME,
        "a red apple",
        "",
        3,
        5.0,
        64,
        64,
        11,
        "fresh.safetensors",
        0.8,
        *NO_LORAS[2:],
        api_name="/generate",
    )
    assert "Lora 1: fresh.safetensors (0.8)" in Image.open(path).info["parameters"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [({1: ""}, "prompt is empty"), ({5: 60}, "multiple of 8"), ({0: "missing.safetensors"}, "not found")],
)
def test_bad_input_is_explained_and_the_app_keeps_serving(app_url, client, changes, message):
    from gradio_client.exceptions import AppError

    args = [DEMO_SDXL_NAME, "a red apple", "", 3, 5.0, 64, 64, 11, *NO_LORAS]
    for index, value in changes.items():
        args[index] = value
    with pytest.raises(AppError, match=message):
        client.predict(*args, api_name="/generate")
    on_disk = sorted(path.name for path in (app_url[1] / "loras").glob("*.safetensors"))
    assert sorted(client.predict(api_name="/list_loras")) == on_disk, "the app still answers, and right"


def test_batch_through_the_api(client):
    import json
    import time

    from gradio_client.exceptions import AppError

    text = json.dumps(
        [
            {"prompt": "a red apple", "model": DEMO_SDXL_NAME, "width": 64, "height": 64, "steps": 2, "seed": 4},
            {"prompt": "a pear", "model": DEMO_SDXL_NAME, "width": 64, "height": 128, "steps": 2},
            {"prompt": "a boat", "model": "missing.safetensors", "steps": 2},
        ]
    )
    started = client.predict(text, 20, api_name="/batch_generate")
    assert started["folder"].endswith(f"batch-{started['id']}") and started["total"] == 3
    deadline = time.monotonic() + 120
    status = client.predict(started["id"], api_name="/batch_status")
    while status["state"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.3)
        status = client.predict(started["id"], api_name="/batch_status")
    assert status["state"] == "done" and status["done"] == 3 and status["failed"] == 1
    assert [row["status"] for row in status["rows"]] == ["done", "done", "failed"]
    assert "Seed: 21" in Image.open(status["images"][1]).info["parameters"], "base seed + row index"
    with pytest.raises(AppError, match="Row 1, column steps"):
        client.predict('[{"prompt": "a", "steps": 999}]', None, api_name="/batch_generate")
