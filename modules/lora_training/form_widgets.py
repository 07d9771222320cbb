"""Gradio widgets for the declared form (``form.OPTIONS``), and the mapping between them and field names."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import gradio as gr

from core.i18n import Text
from core.widgets import button, label_width
from modules.lora_training.form import OPTIONS, SECTIONS, Option, default_widget_values


def _range_text(bounds: tuple[float, float], t: Callable) -> str:
    """``"1 to 1,000"``, its thousands grouped as the language groups them ("de 1 à 1 000")."""

    def render() -> str:
        group = str(t("thousands_separator"))
        low, high = (f"{value:,}".replace(",", group) if isinstance(value, int) else f"{value:g}" for value in bounds)
        return str(t("range", minimum=low, maximum=high))

    return Text(render) if isinstance(t("range"), Text) else render()


def _joined(first: str, second: str) -> str:
    """``"first · second"``, rendered again in another language when both parts can be."""
    if isinstance(first, Text) and isinstance(second, Text):
        return Text(lambda: f"{first.render()} · {second.render()}")
    return f"{first} · {second}"


# A widget never gets narrower than this: a row wraps to the next line instead of wrapping labels.
MIN_WIDTHS = {"checkbox": 190, "slider": 230, "dropdown": 200, "model": 260, "integer": 150, "number": 150}


class FormWidgets:
    """The form's widgets, built section by section inside the caller's layout.

    ``initial`` overrides first values (the base model the tab picks); ``choices`` gives the
    choices of options whose values the app knows (the base models); ``family_of`` names a
    base model's family for the visibility rules; ``button`` makes buttons (the page's, whose text
    follows the language).
    """

    def __init__(
        self, t: Callable, *, initial: dict, choices: dict, family_of: Callable, info: dict, button=button
    ) -> None:
        self.t = t
        self.button = button
        self.initial = {**default_widget_values(), **initial}
        self.choices = choices
        self.family_of = family_of
        self.info = info
        self.widgets: dict[str, gr.components.Component] = {}
        self.names: dict[gr.components.Component, str] = {}

    def __getitem__(self, name: str):
        return self.widgets[name]

    @property
    def inputs(self) -> set:
        return set(self.widgets.values())

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Build the rows of section ``name`` (in an accordion when it is one); the caller may add
        its own widgets inside before the section closes."""
        section = SECTIONS[name]
        context = self.initial | {"family": self.family_of(self.initial.get("base_model"))}
        with gr.Accordion(self.t(name), open=False) if section.accordion else contextlib.nullcontext():
            for row in section.rows:
                with gr.Row():
                    for option in row:
                        self._add(option, visible=option.shown(context))
            yield

    def build(self, name: str) -> None:
        """Build section ``name`` alone."""
        with self.section(name):
            pass

    def _add(self, option: Option, *, visible: bool) -> None:
        widget = self._widget(option, visible=visible)
        self.widgets[option.name] = widget
        self.names[widget] = option.name

    def _widget(self, option: Option, *, visible: bool):
        common = {
            "label": self.t(option.name),
            "value": self.initial[option.name],
            "elem_id": option.elem_id or f"lt-{option.name.replace('_', '-')}",
            "visible": visible,
            "scale": option.scale,
        }
        common["min_width"] = max(MIN_WIDTHS.get(option.kind, 160), label_width(common["label"], option.kind))
        if option.name in self.info:
            common["info"] = self.info[option.name]
        if option.kind in ("text", "prompts"):
            placeholder = self.t(option.placeholder) if option.placeholder else None
            return gr.Textbox(lines=2 if option.kind == "prompts" else 1, placeholder=placeholder, **common)
        if option.kind == "checkbox":
            return gr.Checkbox(**common)
        if option.kind == "dropdown":
            labels = dict(option.choice_labels)
            choices = [(self.t(labels[value]), value) if value in labels else value for value in option.choices]
            return gr.Dropdown(choices, **common)
        if option.kind == "model":
            return self._model_dropdown(option, common)
        low, high = option.bounds
        if option.kind == "slider":
            return gr.Slider(low, high, step=option.step, **common)
        # Numbers keep no minimum/maximum: config_from_dict names the field when one is out of range.
        bounds = _range_text((low, high), self.t)
        common["info"] = _joined(common["info"], bounds) if "info" in common else bounds
        precision = 0 if option.kind == "integer" else None
        placeholder = self.t(option.placeholder) if option.placeholder else None
        return gr.Number(precision=precision, step=option.step or 1, placeholder=placeholder, **common)

    def _model_dropdown(self, option: Option, common: dict):
        names = self.choices[option.name]
        dropdown = gr.Dropdown(choices=names(), **common)
        refresh = self.button(self.t("refresh"), scale=1)
        refresh.click(
            lambda current: gr.Dropdown(choices=names(), value=current),
            inputs=[dropdown],
            outputs=[dropdown],
            api_visibility="private",
        )
        return dropdown

    def values(self, data: dict) -> dict:
        """``{component: value}`` from a handler with a set of inputs → ``{field name: value}``."""
        return {name: data[widget] for widget, name in self.names.items() if widget in data}

    def updates(self, values: dict) -> dict:
        """``{field name: value}`` → ``{component: value}`` for the declared widgets among them."""
        return {self.widgets[name]: value for name, value in values.items() if name in self.widgets}

    def wire_visibility(self) -> None:
        """Show each option only for the values its rule names (its family, its scheduler, ...)."""
        rules: dict[str, list[Option]] = {}
        for option in OPTIONS:
            if option.shown_when and option.name in self.widgets:
                rules.setdefault(option.shown_when[0], []).append(option)
        for key, dependents in rules.items():
            source = self.widgets["base_model" if key == "family" else key]
            to_key = self.family_of if key == "family" else (lambda value: value)

            def show(value, dependents=dependents, key=key, to_key=to_key):
                context = {key: to_key(value)}
                return [gr.update(visible=option.shown(context)) for option in dependents]

            source.change(
                show,
                inputs=[source],
                outputs=[self.widgets[o.name] for o in dependents],
                api_visibility="private",
                show_progress="hidden",
            )
