"""Browser fixtures: Debian's Chromium driven by Playwright, a fresh profile per test."""

from __future__ import annotations

import contextlib

import pytest

from tests.conftest import ROOT
from tests.server import CHROMIUM, CHROMIUM_ARGS

ARTIFACTS = ROOT / "test-artifacts"


@contextlib.contextmanager
def _chromium_page(profile, **options):
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (./test.sh installs it when run as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            user_data_dir=str(profile),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1400, "height": 1000},
            **options,
        )
        try:
            yield context.new_page()
        finally:
            context.close()


@pytest.fixture
def browser_page(tmp_path):
    with _chromium_page(tmp_path / "profile") as page:
        yield page


@pytest.fixture
def french_browser_page(tmp_path):
    """A browser whose language is French: Gradio's own texts (upload prompts, footer) follow it."""
    with _chromium_page(tmp_path / "profile", locale="fr-FR") as page:
        yield page


@pytest.fixture
def screenshot(browser_page, request):
    ARTIFACTS.mkdir(exist_ok=True)

    def take(stage: str):
        browser_page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-{stage}.png"), full_page=True)

    return take
