import json

from core.i18n import load_locale, module_strings, translate
from tests.conftest import ROOT


def test_missing_key_is_visible_not_a_crash():
    assert translate("nope", {}) == "[nope]"
    assert translate("hi", {"hi": "Hello {name}"}, name="Ann") == "Hello Ann"


def test_french_overlays_english():
    strings = load_locale(ROOT / "locales", "fr")
    assert strings["app_subtitle"].startswith("Générez")
    assert module_strings({"en": {"a": "A", "b": "B"}, "fr": {"a": "Á"}}, "fr") == {"a": "Á", "b": "B"}


def test_every_english_string_has_a_french_one():
    en = json.loads((ROOT / "locales" / "en.json").read_text())
    fr = json.loads((ROOT / "locales" / "fr.json").read_text())
    assert set(en) == set(fr)
    for manifest in (ROOT / "modules").glob("*/module.json"):
        language = json.loads(manifest.read_text())["language"]
        assert set(language["en"]) == set(language["fr"]), manifest
