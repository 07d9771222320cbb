"""Translations: flat string tables (a missing key shows as ``[key]``: visible, never a crash), the app's
current language, texts that can be rendered again in another language, and the catalog that translates
the English messages of the core (errors, log lines) where the page shows them.

The core writes English (logs, CLI, exceptions); only the page translates, at display time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

PLACEHOLDER = re.compile(r"(\{\{|\}\}|\{\d+\})")
_LETTER = re.compile(r"[^\W\d_]")


def translate(key: str, strings: Mapping[str, str], **values) -> str:
    text = strings.get(key)
    if text is None:
        return f"[{key}]"
    return text.format(**values) if values else text


def load_locale(locales_dir: Path, language: str) -> dict[str, str]:
    """English strings overlaid with ``language``'s, so an untranslated key falls back to English."""
    strings = json.loads((Path(locales_dir) / "en.json").read_text(encoding="utf-8"))
    if language != "en":
        strings.update(json.loads((Path(locales_dir) / f"{language}.json").read_text(encoding="utf-8")))
    return strings


def load_table(locales_dir: Path, language: str) -> dict[str, str]:
    """``language``'s strings alone (:class:`LiveStrings` fills the gaps with English)."""
    return json.loads((Path(locales_dir) / f"{language}.json").read_text(encoding="utf-8"))


def module_strings(language_table: dict[str, dict[str, str]], language: str) -> dict[str, str]:
    strings = dict(language_table.get("en", {}))
    strings.update(language_table.get(language, {}))
    return strings


class Text(str):
    """A shown text that knows how to render itself again: ``render()`` gives it in the current language.

    Gradio keeps labels, infos, placeholders, choice labels and plot titles as given, so the page can be
    re-labelled after a language switch by rendering each ``Text`` it holds again."""

    render: Callable[[], str]
    renderings: Callable[[], list[str]]  # the text in every language (to size a widget for the longest)

    def __new__(cls, render: Callable[[], str], renderings: Callable[[], list[str]] | None = None):
        text = super().__new__(cls, render())
        text.render = render
        text.renderings = renderings or (lambda: [render()])
        return text

    def __getnewargs__(self):  # copies (Gradio copies components' properties) render again
        return (self.render, self.renderings)


def every_rendering(text: str) -> list[str]:
    """``text`` in every language it can be shown in (a plain string: itself)."""
    return text.renderings() if isinstance(text, Text) else [text]


@dataclass
class Language:
    """The app's language (config.json's LANGUAGE): one for the whole server, changed by the page's switch."""

    code: str


def template_regex(template: str) -> re.Pattern:
    """``"Stopped at step {0}. Checkpoint: {1}"`` → a regex matching the whole message, one group per value."""
    parts = []
    for token in PLACEHOLDER.split(template):
        if token in ("{{", "}}"):
            parts.append(re.escape(token[0]))
        elif PLACEHOLDER.fullmatch(token):
            parts.append(f"(?P<v{token[1:-1]}>.*?)")
        else:
            parts.append(re.escape(token))
    return re.compile("".join(parts), re.DOTALL)


def has_words(template: str) -> bool:
    """Whether a template has text of its own to translate (``"{0}: {1}"`` has none)."""
    return bool(_LETTER.search(PLACEHOLDER.sub("", template)))


@dataclass
class MessageCatalog:
    """English message templates (``{0}``, ``{1}``: values kept as they are) → their translation.

    A message matching no template is shown in English; the values a template captures are translated
    too when they are messages of their own (``"Failed: {0}"`` around an error message)."""

    entries: dict[str, str]
    _exact: dict[str, str] = field(init=False, repr=False)
    _patterns: list[tuple[re.Pattern, str]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        plain = {k: v for k, v in self.entries.items() if not PLACEHOLDER.search(k)}
        self._exact = plain
        templated = [(k, v) for k, v in self.entries.items() if k not in plain and has_words(k)]
        # The longest literal text first: "Failed: {0}" must not catch what a longer template names.
        templated.sort(key=lambda kv: -len(PLACEHOLDER.sub("", kv[0])))
        self._patterns = [(template_regex(k), v) for k, v in templated]

    def match(self, template: str) -> bool:
        """Whether ``template`` (with ``{0}``-style placeholders) has an entry."""
        return template in self.entries

    def translate(self, message: str) -> str:
        if message in self._exact:
            return self._exact[message]
        for pattern, translation in self._patterns:
            found = pattern.fullmatch(message)
            if found:
                values = {int(name[1:]): value for name, value in found.groupdict().items()}
                inner = [self.translate(values[i]) if values[i] != message else values[i] for i in sorted(values)]
                return translation.format(*inner)
        return message


def load_catalog(locales_dir: Path, language: str) -> MessageCatalog:
    """``locales/<language>.messages.json``; English (or a language without one) translates nothing."""
    path = Path(locales_dir) / f"{language}.messages.json"
    if language == "en" or not path.is_file():
        return MessageCatalog({})
    return MessageCatalog(json.loads(path.read_text(encoding="utf-8")))


class LiveStrings(Mapping):
    """A string table that follows the app's language: each lookup uses the language of that moment.

    ``tables`` maps a language code to its strings (English fills the gaps); ``catalogs`` to the
    :class:`MessageCatalog` that :meth:`message` uses. Equal to nothing but itself (it is no dict)."""

    __hash__ = object.__hash__
    __eq__ = object.__eq__

    def __init__(
        self, tables: Mapping[str, Mapping[str, str]], *, language: Language, catalogs: Mapping, page=None
    ) -> None:
        self.tables = tables
        self.language = language
        self.catalogs = catalogs
        self.page = page  # the app's core.page_texts.PageTexts, where tabs register their button and Markdown texts
        self._merged: dict[str, dict[str, str]] = {}

    def table(self, code: str | None = None) -> dict[str, str]:
        code = code or self.language.code
        if code not in self._merged:
            self._merged[code] = {**self.tables.get("en", {}), **self.tables.get(code, {})}
        return self._merged[code]

    def __getitem__(self, key: str) -> str:
        return self.table()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.table())

    def __len__(self) -> int:
        return len(self.table())

    def text(self, key: str, **values) -> Text:
        """``key`` translated now, and again in whatever language the page is switched to."""
        return Text(
            lambda: translate(key, self, **values),
            lambda: [translate(key, self.table(code), **values) for code in self.tables],
        )

    def message(self, message: str | Exception) -> str:
        """An English message of the core (an error, a log line) in the current language."""
        catalog = self.catalogs.get(self.language.code)
        return catalog.translate(str(message)) if catalog else str(message)


def shown_message(message: str | Exception, strings: Mapping | None) -> str:
    """``message`` as the page shows it: translated when ``strings`` follows a language (plain dicts do not)."""
    if isinstance(message, Text):
        return message.render()
    return strings.message(message) if isinstance(strings, LiveStrings) else str(message)


def text_of(strings: Mapping, key: str, **values) -> str:
    """A re-renderable :class:`Text` from live strings, a plain translation from a plain dict."""
    if isinstance(strings, LiveStrings):
        return strings.text(key, **values)
    return translate(key, strings, **values)
