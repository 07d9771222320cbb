"""Caption tools in a browser: the tag frequency table, a replace across the set, and its undo."""

import shutil

import pytest

from modules.lora_training.caption_tools import read_captions
from modules.lora_training.project import ProjectPaths
from tests.conftest import write_config
from tests.server import running_app

pytestmark = pytest.mark.ui

CAPTIONS = ["ohwx, red shirt, smiling", "ohwx, red shirt, outdoors", "ohwx, blue shirt", "ohwx, smiling, outdoors"]


_ROWS = """() => [...document.querySelectorAll('#lt-tag-frequencies div[role=row]')]
    .map(row => [...row.querySelectorAll('[role=gridcell], td')].map(cell => cell.innerText.trim()))"""


def _table_rows(page) -> list[tuple[str, str]]:
    """The frequency table's body rows as (tag, count) (Gradio draws them as div rows of cells)."""
    return [tuple(cells[:2]) for cells in page.evaluate(_ROWS)]


def _wait_for_row(page, tag: str, count: str) -> None:
    page.wait_for_function(
        """([tag, count]) => [...document.querySelectorAll('#lt-tag-frequencies div[role=row]')].some(row => {
            const cells = [...row.querySelectorAll('[role=gridcell], td')].map(cell => cell.innerText.trim());
            return cells[0] === tag && cells[1] === count;
        })""",
        arg=[tag, count],
        timeout=30_000,
    )


def test_frequency_table_replace_and_undo(tmp_path, models_dir, sdxl_project, browser_page, screenshot):
    page = browser_page
    projects, name = sdxl_project
    shutil.copytree(projects, tmp_path / "projects")
    paths = ProjectPaths.for_project(tmp_path / "projects", name)
    for image, caption in zip(sorted(read_captions(paths)), CAPTIONS, strict=True):
        (paths.images / image).with_suffix(".txt").write_text(caption + "\n")
    config = write_config(tmp_path, models_dir)
    with running_app(config, tmp_path / "app.log") as url:
        page.goto(url)
        page.get_by_role("tab", name="LoRA Training").click()
        page.locator("#lt-project textarea, #lt-project input").first.fill(name)
        page.locator("#lt-caption-tools .label-wrap").click()
        page.locator("#lt-tool-frequencies").click()
        _wait_for_row(page, "red shirt", "2")
        assert _table_rows(page)[0] == ("ohwx", "4")
        screenshot("table")

        page.locator("#lt-tool-tag textarea, #lt-tool-tag input").first.fill("red shirt")
        page.locator("#lt-tool-with textarea, #lt-tool-with input").first.fill("green shirt")
        page.locator("#lt-tool-replace").click()
        _wait_for_row(page, "green shirt", "2")
        assert "red shirt" not in [tag for tag, _ in _table_rows(page)]
        assert sorted(read_captions(paths).values())[-1] == "ohwx, smiling, outdoors"
        assert sum("green shirt" in c for c in read_captions(paths).values()) == 2
        page.get_by_text("replace: 2 caption(s) changed.").first.wait_for(timeout=10_000)
        screenshot("replaced")

        page.locator("#lt-tool-undo").click()
        _wait_for_row(page, "red shirt", "2")
        assert sorted(read_captions(paths).values()) == sorted(CAPTIONS)
