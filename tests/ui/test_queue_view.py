"""The Queue view of the LoRA Training tab: jobs queued through the API show in the table as the polling
refreshes it; Cancel and Up act on the job whose id is typed."""

import json
import time

import pytest

from tests.conftest import write_config
from tests.demo_names import DEMO_SDXL_NAME
from tests.image_folders import noise_image
from tests.server import running_app

pytestmark = pytest.mark.ui


def test_the_queue_view_shows_queued_cancelled_and_finished_jobs(
    project, models_dir, tmp_path, browser_page, screenshot
):
    from gradio_client import Client

    page = browser_page
    _, name = project
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(2):
        noise_image(80, 80, seed=600 + index).save(photos / f"p{index}.png")
    prepare = json.dumps({"images_dir": str(photos), "trigger": "ohwx", "captioner": "none", "resolution": 64})
    train = json.dumps({"base_model": DEMO_SDXL_NAME, "steps": 5000, "rank": 4, "save_every_steps": 0})
    config = write_config(tmp_path, models_dir, BUILD_DEMO_MODELS=False)
    with running_app(config, tmp_path / "app.log") as url:
        client = Client(url, verbose=False)
        finished = client.predict("prepare", "first", prepare, api_name="/queue_add")["id"]
        deadline = time.monotonic() + 60
        while client.predict(api_name="/queue_list")[0]["state"] != "finished":
            assert time.monotonic() < deadline, "the first job did not finish"
            time.sleep(0.3)
        running = client.predict("train", name, train, api_name="/queue_add")["id"]
        second, third, fourth = (
            client.predict("prepare", project_name, prepare, api_name="/queue_add")["id"]
            for project_name in ("second", "third", "fourth")
        )

        page.goto(url)
        page.get_by_role("tab", name="LoRA Training").click()
        table = page.locator("#lt-queue-table")
        table.get_by_text("queued #3").wait_for(timeout=30_000)
        page.locator("#lt-queue-id input").fill(str(fourth))
        page.get_by_role("button", name="Cancel", exact=True).click()
        page.get_by_text(f"Job {fourth}: cancelled").wait_for()
        page.locator("#lt-queue-id input").fill(str(third))
        page.get_by_role("button", name="Up", exact=True).click()
        page.get_by_text(f"Job {third} is now number 1 in line.").wait_for()

        rows = {
            finished: r"prepare\nfirst\nfinished\n100%\n+first/images",  # a markdown cell: its own block
            running: rf"train\n{name}\nrunning\n\d+%\n",
            third: r"prepare\nthird\nqueued #1\n0%\nstarts in \d+(h|m)\d\d(m|s)",  # the running job's ETA
            second: r"prepare\nsecond\nqueued #2\n0%",
            fourth: r"prepare\nfourth\ncancelled\n0%",
        }
        for job_id, row in rows.items():
            try:
                page.wait_for_function(
                    "pattern => new RegExp(pattern).test(document.querySelector('#lt-queue-table').innerText)",
                    arg=rf"(^|\n){job_id}\n{row}",
                    timeout=30_000,
                )
            except Exception as exc:  # the table as shown, to see which cell differs
                raise AssertionError(f"row {job_id} is not {row!r}:\n{table.inner_text()}") from exc
        order = page.locator("#lt-queue-table").inner_text()
        assert order.index("\nthird\n") < order.index("\nsecond\n"), "the queued jobs in their order"
        screenshot("queue")
        client.predict(api_name="/stop_training")
