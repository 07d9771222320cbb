"""A person opens the page, types a prompt, clicks Generate and sees an image."""

import pytest

from tests.conftest import write_config
from tests.server import running_app

pytestmark = pytest.mark.ui


def test_generate_with_the_demo_model(tmp_path, models_dir, browser_page, screenshot):
    page = browser_page
    config = write_config(tmp_path, models_dir)
    with running_app(config, tmp_path / "app.log") as url:
        page.goto(url)
        page.get_by_text("LoRA Studio").first.wait_for(timeout=60_000)
        page.locator("#generate-prompt textarea").fill("a lighthouse at dusk")
        screenshot("filled")
        page.locator("#generate-button").click()
        image = page.locator("#generate-output img")
        image.wait_for(state="visible", timeout=120_000)
        assert page.locator("#generate-status").inner_text(timeout=10_000).startswith("Done")
        screenshot("generated")
        assert image.evaluate("img => img.naturalWidth") == 64


def test_page_speaks_french(tmp_path, models_dir, browser_page):
    page = browser_page
    config = write_config(tmp_path, models_dir, LANGUAGE="fr")
    with running_app(config, tmp_path / "app.log") as url:
        page.goto(url)
        page.get_by_role("tab", name="Générer").wait_for(timeout=60_000)
        page.locator("#generate-button").get_by_text("Générer").wait_for()
        page.locator("#generate-button").click()
        page.get_by_text("Le prompt est vide").first.wait_for(timeout=60_000)  # the core's message, translated
