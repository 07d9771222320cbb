"""The Sweeps section in a browser, on the tiny demo model: Start sweep with a 2-trial space; the trials table
follows the running sweep (no Show results click) with each trial's state and objective; Train with best
queues the full run, which the queue view shows."""

import json
import re

import pytest

from tests.conftest import seven_image_copy, write_config
from tests.server import running_app

pytestmark = pytest.mark.ui

SPACE = {
    "parameters": {"learning_rate": [0.1, 0.05]},
    "fixed": {"steps": 2, "rank": 2, "seed": 3},  # the full run's length and rank
    "trial_steps": 2,
    "reports": 1,
    "pruner": {"type": "none"},
    "enqueue": [{"learning_rate": 0.1}, {"learning_rate": 0.05}],
}
# "# / state / objective" of a trial in the table's text.
OBJECTIVE = r"-?\d+(\.\d+)?(e-?\d+)?"
BOTH_COMPLETE = rf"(^|\n)0\s+complete\s+{OBJECTIVE}\s[\s\S]*\n1\s+complete\s+{OBJECTIVE}\s"


def _field(page, elem_id):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def _wait_for_text(page, selector: str, pattern: str, *, timeout: int) -> None:
    try:
        page.wait_for_function(
            "([selector, pattern]) => new RegExp(pattern).test(document.querySelector(selector)?.innerText || '')",
            arg=[selector, pattern],
            timeout=timeout,
        )
    except Exception as exc:  # what the page shows, to see which cell differs
        raise AssertionError(f"{selector} never matched {pattern!r}:\n{page.locator(selector).inner_text()}") from exc


@pytest.mark.slow  # about 33 s on two loaded cores: the app's start, two trials, the full run's start
def test_a_sweep_fills_its_table_as_it_runs_and_trains_the_best(
    tmp_path, models_dir, sdxl_project, browser_page, screenshot
):
    page = browser_page
    projects, name = seven_image_copy(sdxl_project, tmp_path / "projects")
    config = write_config(tmp_path, models_dir, LORA_PROJECTS_DIR=str(projects), BUILD_DEMO_MODELS=False)
    with running_app(config, tmp_path / "app.log") as url:
        page.goto(url)
        page.get_by_role("tab", name="LoRA Training").click()
        _field(page, "lt-project").fill(name)
        page.locator("#lt-sweep-section .label-wrap").click()  # opens the section
        editor = page.locator("#lt-sweep-space .cm-content")
        editor.click()
        page.keyboard.press("Control+a")
        page.keyboard.insert_text(json.dumps(SPACE))
        trials = _field(page, "lt-sweep-trials")
        trials.fill("2")
        trials.press("Tab")
        _field(page, "lt-sweep-study").fill("ui")
        page.locator("#lt-sweep-start").click()

        table = "#lt-sweep-table"
        _wait_for_text(page, table, r"(^|\n)0\s+(running|complete)", timeout=30_000)  # it follows the sweep
        _wait_for_text(page, table, BOTH_COMPLETE, timeout=60_000)
        assert "Study ui: 2 trials (2 complete)" in page.locator("#lt-sweep-summary").inner_text()
        screenshot("swept")

        page.locator("#lt-sweep-train-best").click()
        _wait_for_text(page, "#lt-queue-table", rf"(^|\n)\d+\s+train\s+{re.escape(name)}\s", timeout=30_000)
        _wait_for_text(page, "#lt-queue-table", rf"(^|\n)\d+\s+sweep\s+{re.escape(name)}\s+finished", timeout=5_000)
        screenshot("queued")
