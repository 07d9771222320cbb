"""The page's layout holds at 1400 and 1024 px wide, in English and French: no label or button text is
clipped or wrapped, Generate is visible without scrolling at 900 px high, images show at a useful size.
Screenshots of both tabs in both languages go to test-artifacts/."""

from __future__ import annotations

import pytest

from tests.conftest import write_config
from tests.server import running_app
from tests.ui.conftest import ARTIFACTS

pytestmark = pytest.mark.ui

# Every visible button, label and checkbox text of the app (Gradio's footer aside): one line, all shown.
FIND_PROBLEMS = """
() => {
  const problems = [];
  const shown = (el) => {
    const box = el.getBoundingClientRect();
    return box.width > 0 && box.height > 0 && !el.closest('footer') && !el.closest('[data-testid="upload-area"]');
  };
  const texts = document.querySelectorAll(
    'button, [data-testid="block-info"], label > span, [role="tab"]'
  );
  for (const el of texts) {
    if (!shown(el)) continue;
    const box = el.getBoundingClientRect();
    const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      const text = node.textContent.trim();
      if (text.length < 2) continue;  // an icon such as the accordion's arrow
      const range = document.createRange();
      range.selectNodeContents(node);
      const rects = [...range.getClientRects()].filter((r) => r.width > 1);
      if (new Set(rects.map((r) => Math.round(r.top / 4))).size > 1) problems.push(`wrapped: ${JSON.stringify(text)}`);
      if (rects.some((r) => r.right > box.right + 1 || r.left < box.left - 1)) {
        problems.push(`clipped: ${JSON.stringify(text)}`);
      }
    }
  }
  return [...new Set(problems)];
}
"""


def _check(page, *, where: str) -> list[str]:
    return [f"{where}: {problem}" for problem in page.evaluate(FIND_PROBLEMS)]


def _show_tag_settings(page) -> None:
    """Captioner Florence-2 + tags: the tagger's settings appear under it."""
    page.locator("#lt-captioner input").click()
    page.get_by_role("option", name="Florence-2 + tags").click()
    page.locator("#lt-tag-threshold").wait_for(state="visible")


def _generated_image_is_large(page) -> None:
    page.locator("#generate-prompt textarea").fill("a lighthouse")
    page.locator("#generate-button").click()
    image = page.locator("#generate-output img")
    image.wait_for(state="visible", timeout=120_000)
    assert image.bounding_box()["height"] >= 256, "a 64 px demo image is shown scaled up, not as a thumbnail"


@pytest.mark.parametrize("language", ["en", "fr"])
def test_both_tabs_hold_at_1400_and_1024_px(tmp_path, models_dir, browser_page, language):
    page = browser_page
    tab_names = {"en": ("Generate", "LoRA Training"), "fr": ("Générer", "Entraînement LoRA")}[language]
    config = write_config(tmp_path, models_dir, LANGUAGE=language)
    problems = []
    with running_app(config, tmp_path / "app.log") as url:
        for width in (1400, 1024):
            page.set_viewport_size({"width": width, "height": 900})
            page.goto(url)
            page.get_by_role("tab", name=tab_names[0]).wait_for(timeout=60_000)
            button = page.locator("#generate-button").bounding_box()
            assert button["y"] + button["height"] <= 900, f"{language} {width}px: Generate is below the fold"
            problems += _check(page, where=f"{language} {width}px Generate")
            page.screenshot(path=str(ARTIFACTS / f"layout-{language}-{width}-generate.png"), full_page=True)

            if language == "en" and width == 1400:
                _generated_image_is_large(page)
            page.get_by_role("tab", name=tab_names[1]).click()
            page.locator("#lt-train").wait_for()
            for accordion in page.locator(".label-wrap").all():  # the Training and Advanced sections
                if accordion.is_visible():
                    accordion.click()
            problems += _check(page, where=f"{language} {width}px Training")
            page.screenshot(path=str(ARTIFACTS / f"layout-{language}-{width}-training.png"), full_page=True)
            _show_tag_settings(page)
            problems += _check(page, where=f"{language} {width}px Training, tag settings")
    assert problems == [], "\n".join(problems)
