"""The French message catalog covers every message the core writes as a literal: each ``UserError(...)``
(shown on the page when a request is refused) and each line the training job logs (``_line(...)``),
found by walking the source. A new message without a French entry fails here; messages built from
variables cannot be checked and are counted instead."""

from __future__ import annotations

import ast
import json

import pytest

from core.i18n import Language, LiveStrings, MessageCatalog, has_words, load_catalog
from tests.conftest import ROOT

SOURCE_FOLDERS = ("core", "modules", "families", "model_formats")
CALLS = ("UserError", "_line", "shown_to_user", "Log")  # their first argument is shown on the page
MESSAGE_KEYWORDS = ("message",)  # ``jobs._set(job, message=...)``: the status line's message


def template_of(node: ast.expr) -> str | None:
    """A literal message → its template (each formatted value a ``{n}``); None for anything built otherwise."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value.replace("{", "{{").replace("}", "}}")
    if isinstance(node, ast.JoinedStr):
        parts, count = [], 0
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value).replace("{", "{{").replace("}", "}}"))
            else:
                parts.append(f"{{{count}}}")
                count += 1
        return "".join(parts)
    if isinstance(node, ast.Subscript):  # a literal cut to a length: f"...{value!r}"[:300]
        return template_of(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = template_of(node.left), template_of(node.right)
        return None if left is None or right is None else _renumber(left, right)
    return None


def _renumber(left: str, right: str) -> str:
    import re

    offset = len(re.findall(r"(?<!\{)\{\d+\}", left))
    return left + re.sub(r"(?<!\{)\{(\d+)\}", lambda m: f"{{{int(m.group(1)) + offset}}}", right)


def _name(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def shown_messages() -> tuple[dict[str, str], list[str]]:
    """``{template: where}`` of the literal messages, and where the messages built from variables are."""
    literals, built = {}, []
    for folder in SOURCE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                for argument in _message_arguments(node):
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    template = template_of(argument)
                    if template is None:
                        built.append(where)
                    elif has_words(template):
                        literals.setdefault(template, where)
    return literals, built


def _message_arguments(node: ast.AST) -> list[ast.expr]:
    if not isinstance(node, ast.Call):
        return []
    found = [node.args[0]] if _name(node) in CALLS and node.args else []
    return found + [k.value for k in node.keywords if k.arg in MESSAGE_KEYWORDS]


def test_every_literal_message_has_a_french_translation():
    catalog = load_catalog(ROOT / "locales", "fr")
    literals, built = shown_messages()
    missing = [f"{where}: {template}" for template, where in literals.items() if not catalog.match(template)]
    assert not missing, "no French entry in locales/fr.messages.json for:\n" + "\n".join(missing)
    assert len(literals) > 100  # the walk finds the messages (not an empty folder list)
    print(f"{len(literals)} literal messages covered, {len(built)} built from variables")


def test_french_entries_keep_their_values():
    """Each French template uses exactly the placeholders of its English one (a value is never lost)."""
    import re

    entries = json.loads((ROOT / "locales" / "fr.messages.json").read_text(encoding="utf-8"))
    for english, french in entries.items():
        assert sorted(re.findall(r"(?<!\{)\{\d+\}", english)) == sorted(re.findall(r"(?<!\{)\{\d+\}", french)), english
        assert french.strip() and french != english or not has_words(english), english


@pytest.mark.parametrize(
    ("message", "french"),
    [
        ("Project name is empty: give it a short name such as my_style.", None),
        ("Stopped at step 40. Checkpoint: /p/step-000040", "/p/step-000040"),
        ("Failed: Project name is empty: give it a short name such as my_style.", "Échec"),
    ],
)
def test_messages_are_translated_with_their_values(message, french):
    catalog = load_catalog(ROOT / "locales", "fr")
    shown = catalog.translate(message)
    assert shown != message
    if french:
        assert french in shown
    if message.startswith("Failed: "):
        assert catalog.translate(message.removeprefix("Failed: ")) in shown, "the inner message is translated too"


def test_a_template_captures_and_reorders_values():
    catalog = MessageCatalog({"{0} is not in {1}": "{1} ne contient pas {0}", "Done.": "Terminé."})
    assert catalog.translate("a.png is not in /x") == "/x ne contient pas a.png"
    assert catalog.translate("Done.") == "Terminé."
    assert catalog.translate("Something else") == "Something else"


def test_live_strings_follow_the_language():
    language = Language("en")
    catalogs = {"fr": MessageCatalog({"Done.": "Terminé."})}
    strings = LiveStrings({"en": {"a": "Apple"}, "fr": {"a": "Pomme"}}, language=language, catalogs=catalogs)
    text = strings.text("a")
    assert (strings["a"], text, strings.message("Done.")) == ("Apple", "Apple", "Done.")
    language.code = "fr"
    assert (strings["a"], text.render(), strings.message("Done.")) == ("Pomme", "Pomme", "Terminé.")


def test_the_status_column_shows_the_job_in_french():
    from modules.lora_training.status_view import render_status, shown_log

    tables = json.loads((ROOT / "modules" / "lora_training" / "module.json").read_text(encoding="utf-8"))["language"]
    catalogs = {"fr": load_catalog(ROOT / "locales", "fr")}
    strings = LiveStrings(tables, language=Language("fr"), catalogs=catalogs)
    snapshot = {"state": "finished", "project": "cat", "message": "cat.safetensors is ready in the Generate tab."}
    assert render_status(snapshot, strings) == "cat terminé : cat.safetensors est prêt dans l'onglet Générer."
    log = ["12:00:01  Prepared 3 image(s), skipped 1.", "12:00:09  step 10/100  loss 0.1234  lr 1.00e-04  0.50 s/step"]
    assert shown_log(log, strings) == (
        "12:00:09  étape 10/100  perte 0.1234  taux 1.00e-04  0.50 s/étape\n12:00:01  3 image(s) préparée(s), 1 ignorée(s)."
    )
