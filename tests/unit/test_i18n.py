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


def test_saving_the_language_keeps_the_rest_of_config_json(tmp_path):
    import pytest

    from core.config import save_language
    from core.errors import UserError

    path = tmp_path / "config.json"
    original = '{\n  "MODELS_DIR": "models",\n  "LANGUAGE": "en",\n  "IMAGE_ROOTS": ["~", "datasets"]\n}\n'
    path.write_text(original)
    save_language(path, "fr")
    assert path.read_text() == original.replace('"en"', '"fr"')
    with pytest.raises(UserError, match="LANGUAGE must be one of en, fr"):
        save_language(path, "de")
    path.write_text('{"MODELS_DIR": "models"}')
    save_language(path, "fr")
    assert json.loads(path.read_text()) == {"MODELS_DIR": "models", "LANGUAGE": "fr"}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"], "no temporary file is left behind"


def test_the_page_is_relabelled_in_the_new_language():
    import gradio as gr

    from core.i18n import Language, LiveStrings
    from core.page_texts import PageTexts

    language, page = Language("en"), PageTexts()
    tables = {
        "en": {"name": "Name", "go": "Go", "short": "short"},
        "fr": {"name": "Nom", "go": "Lancer", "short": "court"},
    }
    strings = LiveStrings(tables, language=language, catalogs={}, page=page)
    with gr.Blocks() as demo, gr.Tabs(), gr.Tab(strings.text("go")) as tab:
        box = gr.Textbox(label=strings.text("name"), placeholder=strings.text("short"))
        choice = gr.Dropdown([(strings.text("short"), "s"), "other"], label="fixed")
        go = page.button(strings.text("go"))
        page.collect(demo)
    assert (box.label, go.value) == ("Name", "Go")
    language.code = "fr"
    updates = dict(zip(page.outputs, page.updates(), strict=True))
    assert updates[box] == {"__type__": "update", "label": "Nom", "placeholder": "court"}
    assert updates[choice]["choices"] == [("court", "s"), ("other", "other")]
    assert updates[go] == {"__type__": "update", "value": "Lancer"}
    assert go.min_width >= 105, "sized for its longest translation"
    assert updates[tab] == {"__type__": "update", "label": "Lancer"}
    page.apply()  # a page opened from now on gets French from Gradio's config
    config = json.dumps(demo.get_config_file(), ensure_ascii=False)
    assert '"label": "Nom"' in config and '"value": "Lancer"' in config and "Name" not in config
