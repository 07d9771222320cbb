"""The Evaluate section in a browser: after a run, Evaluate shows the figures' charts, the comparison grid and
the best checkpoint; Draw grid with LoRA weights replaces the grid; a reloaded page shows the same."""

import pytest

from modules.lora_training.comparison_grid import CELL, HEADER_HEIGHT, LABEL_WIDTH
from tests.conftest import seven_image_copy, write_config
from tests.demo_names import DEMO_SDXL_NAME
from tests.server import running_app
from tests.ui.dropdowns import choose_option

pytestmark = pytest.mark.ui

GRID_WIDTH = LABEL_WIDTH + 4 * CELL


def _trained_project(tmp_path, sdxl_project, models_dir):
    from modules.lora_training.config import TrainConfig, config_from_dict
    from modules.lora_training.train import train

    projects, name = seven_image_copy(sdxl_project, tmp_path / "projects")
    values = {"project": name, "base_model": DEMO_SDXL_NAME, "rank": 4, "learning_rate": 3e-3, "steps": 4}
    values |= {"save_every_steps": 2, "sample_every_steps": 0, "sample_steps": 2, "also_save_webui": False}
    config = config_from_dict(TrainConfig, values)
    result = train(config, projects_dir=projects, models_dir=models_dir, loras_dir=tmp_path / "loras")
    assert result.status == "finished", result.message
    return name


def _grid_shows(page, name: str, *, rows: int) -> None:
    """Wait until the grid image is ``name`` and loaded at its full size (``rows`` rows)."""
    page.wait_for_function(
        """([name, width, height]) => {
            const img = document.querySelector('#lt-grid img');
            return !!img && img.complete && img.src.includes(name)
                && img.naturalWidth === width && img.naturalHeight === height;
        }""",
        arg=[name, GRID_WIDTH, HEADER_HEIGHT + rows * CELL],
        timeout=120_000,
    )


def _charts_show(page) -> None:
    """Both charts draw their lines, each in a colour of its own, and name them in the legend."""
    for elem_id, series in (("lt-eval-loss", "held-out images"), ("lt-eval-clip", "subject vs base")):
        page.wait_for_function(
            """([id, series]) => {
                const chart = document.getElementById(id);
                const lines = [...chart.querySelectorAll('path[aria-roledescription="line mark"]')];
                const strokes = new Set(lines.map(line => line.getAttribute('stroke')));
                const legend = chart.querySelector('[aria-roledescription="legend"]')?.getAttribute('aria-label') || '';
                return lines.length >= 2 && !strokes.has(null) && strokes.size === lines.length
                    && legend.includes(series);
            }""",
            arg=[elem_id, series],
            timeout=30_000,
        )


def test_evaluate_shows_charts_grid_and_best(tmp_path, models_dir, sdxl_project, browser_page, screenshot):
    page = browser_page
    name = _trained_project(tmp_path, sdxl_project, models_dir)
    config = write_config(tmp_path, models_dir, LORA_PROJECTS_DIR=str(tmp_path / "projects"))
    with running_app(config, tmp_path / "app.log") as url:
        page.goto(url)
        page.get_by_role("tab", name="LoRA Training").click()
        page.locator("#lt-project textarea, #lt-project input").first.fill(name)
        page.locator("#lt-evaluate-section .label-wrap").click()  # opens the section
        choose_option(page, "lt-best-rule", "CLIP subject")
        margin = page.locator("#lt-margin input").first
        margin.fill("1")
        margin.press("Tab")
        page.locator("#lt-evaluate").click()
        best = page.locator("#lt-best")
        # The line may first show the figures training wrote (ranked by held-out loss): wait for this job's.
        best.get_by_text("(by CLIP subject): step-00000").wait_for(timeout=120_000)
        _grid_shows(page, "comparison-checkpoints.png", rows=3)
        screenshot("evaluated")
        _charts_show(page)

        page.get_by_label("LoRA weights").check()
        page.locator("#lt-draw-grid").click()
        _grid_shows(page, "comparison-weights.png", rows=4)
        screenshot("weights-grid")

        page.reload()
        page.get_by_role("tab", name="LoRA Training").click()
        page.locator("#lt-evaluate-section .label-wrap").click()
        page.locator("#lt-best").get_by_text("Best checkpoint").wait_for(timeout=30_000)
        _grid_shows(page, "comparison-weights.png", rows=4)
        _charts_show(page)
