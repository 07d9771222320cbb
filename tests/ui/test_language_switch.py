"""The page's language switch: started in English, switched to French through the page, no English text of
the project is left on either tab (in place, then after a reload), no French text is wrapped or clipped,
and config.json says "fr".

The English texts looked for come from the locale tables (locales/en.json, each module's "en" table) and
the message catalog (locales/fr.messages.json): every run of two words or more that the French text
does not share. The browser's language is French too, so Gradio's own texts (upload prompts) are French."""

from __future__ import annotations

import json
import re

import pytest

from core.i18n import PLACEHOLDER
from tests.conftest import ROOT, write_config
from tests.server import running_app
from tests.ui.conftest import ARTIFACTS
from tests.ui.test_layout import FIND_PROBLEMS

pytestmark = pytest.mark.ui

# What the page shows: its visible text, the values of visible fields (a dropdown shows its choice there),
# and the placeholders, titles and aria labels of visible elements.
VISIBLE_TEXT = """
() => {
  const shown = (el) => { const box = el.getBoundingClientRect(); return box.width > 0 && box.height > 0; };
  const texts = [document.body.innerText];
  for (const el of document.querySelectorAll('input, textarea')) {
    if (shown(el) && el.type !== 'file') texts.push(el.value);
  }
  for (const el of document.querySelectorAll('[placeholder], [title], [aria-label]')) {
    if (!shown(el)) continue;
    for (const name of ['placeholder', 'title', 'aria-label']) {
      if (el.getAttribute(name)) texts.push(el.getAttribute(name));
    }
  }
  return texts.join('\\n');
}
"""


def _fragments(template: str) -> list[str]:
    """The literal runs of a template (placeholders and Markdown emphasis removed), of two words or more."""
    pieces = re.split(r"\{[a-z_]+(?::[^}]*)?\}|\{\d+\}", template.replace("**", ""))
    stripped = [piece.strip(" :;,.·()") for piece in pieces]
    return [piece for piece in stripped if sum(bool(re.search(r"[^\W\d_]", word)) for word in piece.split()) >= 2]


def english_texts() -> set[str]:
    """Every English run of words the project can show that its French translation does not contain."""
    pairs = []
    for name in ("en",):
        english = json.loads((ROOT / "locales" / f"{name}.json").read_text(encoding="utf-8"))
        french = json.loads((ROOT / "locales" / "fr.json").read_text(encoding="utf-8"))
        pairs += [(text, french[key]) for key, text in english.items()]
    for manifest in sorted((ROOT / "modules").glob("*/module.json")):
        tables = json.loads(manifest.read_text(encoding="utf-8"))["language"]
        pairs += [(text, tables["fr"][key]) for key, text in tables["en"].items()]
    catalog = json.loads((ROOT / "locales" / "fr.messages.json").read_text(encoding="utf-8"))
    pairs += [(PLACEHOLDER.sub("{0}", english), french) for english, french in catalog.items()]
    found = set()
    for english, french in pairs:
        found |= {fragment for fragment in _fragments(english) if fragment and fragment not in french}
    return found


def _english_left(page, *, english: set[str]) -> list[str]:
    text = page.evaluate(VISIBLE_TEXT)
    return sorted(fragment for fragment in english if fragment in text)


def _open_sections(page) -> None:
    for accordion in page.locator(".label-wrap").all():  # the Training and Advanced sections
        if accordion.is_visible():
            accordion.click()


def _check_both_tabs(page, *, english: set[str], stage: str) -> list[str]:
    """English texts left, and texts wrapped or clipped (the French ones are longer), on both tabs."""
    page.get_by_role("tab", name="Générer").click()
    page.locator("#generate-button").wait_for()
    problems = [f"{stage}, Generate: {text!r}" for text in _english_left(page, english=english)]
    problems += [f"{stage}, Generate: {problem}" for problem in page.evaluate(FIND_PROBLEMS)]
    page.get_by_role("tab", name="Entraînement LoRA").click()
    page.locator("#lt-train").wait_for()
    page.locator("#lt-plan", has_text=re.compile("[ÉéE]tapes")).wait_for(timeout=20_000)  # refreshed after the labels
    _open_sections(page)
    page.screenshot(path=str(ARTIFACTS / f"language-switch-{stage}.png"), full_page=True)
    problems += [f"{stage}, LoRA Training: {problem}" for problem in page.evaluate(FIND_PROBLEMS)]
    return problems + [f"{stage}, LoRA Training: {text!r}" for text in _english_left(page, english=english)]


def test_switching_to_french_leaves_no_english_text(tmp_path, models_dir, french_browser_page):
    page = french_browser_page
    english = english_texts()
    assert {"Prepare and Train", "Log (newest first", "No job is running"} <= english
    config = write_config(tmp_path, models_dir, LANGUAGE="en")
    ARTIFACTS.mkdir(exist_ok=True)
    with running_app(config, tmp_path / "app.log") as url:
        page.goto(url)
        page.get_by_role("tab", name="Generate").wait_for(timeout=60_000)
        assert _english_left(page, english=english), "the page starts in English"
        page.locator("#language input").click()
        page.get_by_role("option", name="Français").click()
        page.get_by_role("tab", name="Générer").wait_for(timeout=20_000)
        page.locator("#generate-button", has_text="Générer").wait_for(timeout=20_000)
        problems = _check_both_tabs(page, english=english, stage="switched")
        assert json.loads(config.read_text(encoding="utf-8"))["LANGUAGE"] == "fr"
        page.reload()
        page.get_by_role("tab", name="Générer").wait_for(timeout=60_000)
        page.locator("#generate-button", has_text="Générer").wait_for(timeout=20_000)
        problems += _check_both_tabs(page, english=english, stage="reloaded")
    assert problems == [], "\n".join(problems)
