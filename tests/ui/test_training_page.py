"""A person trains a LoRA in the browser: Prepare and Train, Stop, Resume, then generates with it."""

import re

import pytest

from tests.conftest import write_config
from tests.demo_names import DEMO_SDXL_NAME
from tests.image_folders import noise_image
from tests.server import running_app
from tests.ui.dropdowns import choose_option

pytestmark = pytest.mark.ui

# The Generate tab labels each LoRA with its family and trigger word, read from the file.
LABEL = "ui-test · SDXL · trigger: ohwx"


def _field(page, elem_id):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def _log_text(page):
    return _field(page, "lt-log").input_value()


def _wait_for_log(page, pattern, timeout=120_000):
    page.wait_for_function(
        "([selector, pattern]) => new RegExp(pattern).test(document.querySelector(selector)?.value || '')",
        arg=["#lt-log textarea", pattern],
        timeout=timeout,
    )


def test_train_stop_resume_and_generate_with_the_new_lora(tmp_path, models_dir, browser_page, screenshot):
    page = browser_page
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        noise_image(96, 80 + 8 * index, seed=400 + index).save(photos / f"photo {index}.png")
    config = write_config(tmp_path, models_dir)
    with running_app(config, tmp_path / "app.log") as url:
        page.goto(url)
        page.get_by_role("tab", name="LoRA Training").click()
        _field(page, "lt-project").fill("ui-test")
        # Photos dropped on the upload area are copied into the project and prepared from there.
        page.locator("#lt-upload input[type=file]").set_input_files([str(p) for p in sorted(photos.iterdir())])
        page.wait_for_function(
            "() => (document.querySelector('#lt-images textarea, #lt-images input')?.value || '').endsWith('/source')"
        )
        assert sorted(p.name for p in (tmp_path / "projects" / "ui-test" / "source").iterdir()) == sorted(
            p.name for p in photos.iterdir()
        )
        _field(page, "lt-trigger").fill("ohwx")
        plan = page.locator("#lt-plan")
        plan.get_by_text("about 3 images × 1 repeats × 10 epochs ÷ batch 1 = 30 steps; a checkpoint every 3").wait_for()
        page.get_by_text("Training", exact=True).click()  # opens the accordion
        for elem_id, value in (("lt-steps", "100"), ("lt-save-every", "0"), ("lt-sample-every", "0")):
            _field(page, elem_id).fill(value)
            _field(page, elem_id).press("Tab")
        plan.get_by_text(re.compile(r"^100 steps \(Steps is set.*only at the end, no samples\.$")).wait_for()
        # A preset saves the fields by name and sets them again when loaded.
        _field(page, "lt-rank").fill("8")
        page.get_by_text("Advanced", exact=True).click()
        _field(page, "lt-preset-name").fill("mine")
        page.get_by_role("button", name="Save preset").click()
        page.locator("#lt-estimate").get_by_text("Preset saved: mine").wait_for()
        _field(page, "lt-rank").fill("4")
        choose_option(page, "lt-preset", "mine")
        page.get_by_role("button", name="Load preset").click()
        page.locator("#lt-estimate").get_by_text("Preset loaded: mine").wait_for()
        assert _field(page, "lt-rank").input_value() == "8"
        screenshot("1-filled")
        page.get_by_role("button", name="Estimate memory and time").click()
        page.locator("#lt-estimate").get_by_text(re.compile(r"Estimated time: [\d.]+ s/step on cpu")).wait_for()
        assert "activations counted" in page.locator("#lt-estimate").inner_text()

        page.locator("#lt-train").click()
        _wait_for_log(page, r"step 1/100")
        page.wait_for_function("() => Number(document.querySelector('#lt-progress progress')?.value) >= 2")
        screenshot("2-training")

        page.reload()  # the run belongs to the server: a new page re-attaches to it
        page.get_by_role("tab", name="LoRA Training").click()
        _wait_for_log(page, r"step \d+/100")
        assert "Training ui-test" in page.locator("#lt-status").inner_text()
        # The reloaded page shows the running job's form; only Stop can act on it.
        page.wait_for_function(
            "() => document.querySelector('#lt-project textarea, #lt-project input')?.value === 'ui-test'"
        )
        assert _field(page, "lt-steps").input_value() == "100"
        assert page.locator("#lt-stop").is_enabled() and page.locator("#lt-resume").is_disabled()
        assert page.locator("#lt-use").is_disabled()

        page.locator("#lt-stop").click()
        page.get_by_text(re.compile(r"Stopped ui-test")).wait_for(timeout=60_000)
        _wait_for_log(page, r"Checkpoint saved: .*step-")
        assert re.search(r"Resume continues run \d{8}-\d{6}-\w+ from", page.locator("#lt-status").inner_text())
        screenshot("3-stopped")
        assert page.locator("#lt-new-run").is_visible()
        assert "ETA" not in page.locator("#lt-progress").inner_text(), "a stopped run has no time left"

        page.reload()  # Resume straight after a reload: the form comes back from the server
        page.get_by_role("tab", name="LoRA Training").click()
        page.wait_for_function(
            "() => document.querySelector('#lt-project textarea, #lt-project input')?.value === 'ui-test'"
        )
        page.wait_for_function("() => !document.querySelector('#lt-resume').disabled")
        assert page.locator("#lt-stop").is_disabled()
        page.locator("#lt-resume").click()
        page.get_by_text(re.compile(r"Finished ui-test")).wait_for(timeout=180_000)
        assert re.search(r"Resuming run \d{8}-\d{6}-\w+ from step \d+", _log_text(page))
        screenshot("4-finished")

        # The saved LoRA reaches the Generate tab's lists on its own ("generate.refresh_loras").
        page.get_by_role("tab", name="Generate").click()
        page.locator("#generate-lora-2 input").click()
        page.get_by_role("option", name=LABEL, exact=True).wait_for(timeout=30_000)
        page.keyboard.press("Escape")
        page.get_by_role("tab", name="LoRA Training").click()

        # "Use in Generate" goes through the host's action registry: the Generate tab is shown with
        # the run's model, the trigger word and the new LoRA filled in.
        page.locator("#lt-use").click()
        page.locator("#generate-button").wait_for(state="visible")
        assert _field(page, "generate-model").input_value() == DEMO_SDXL_NAME
        page.wait_for_function(
            f"() => document.querySelector('#generate-lora-1 input')?.value === '{LABEL}'",
            timeout=30_000,
        )
        assert _field(page, "generate-prompt").input_value().startswith("ohwx")
        page.locator("#generate-lora-1 input").click()
        page.get_by_role("option", name=LABEL, exact=True).wait_for()
        # The webui copy is for other apps: the Generate tab does not offer it.
        assert page.get_by_role("option").count() == 1, "one entry per LoRA: the webui copy is not offered"
        page.keyboard.press("Escape")
        page.locator("#generate-button").click()
        page.locator("#generate-output img").wait_for(state="visible", timeout=120_000)
        screenshot("5-generated")
        assert page.locator("#generate-status").inner_text().startswith("Done")
