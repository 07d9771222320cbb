"""Every text the page shows, as functions of the language, so the language switch re-labels the page in place.

Labels, infos, placeholders, choice labels and plot titles given as :class:`core.i18n.Text` are found by
walking the built page; Gradio turns a button's or a Markdown's value into a plain ``str``, so those are
registered here when they are made (:meth:`PageTexts.button`, :meth:`PageTexts.markdown`). Texts that
depend on the page's values (the run plan) are refreshed by handlers added with :meth:`PageTexts.refresh`.

The switch sends the open page :meth:`PageTexts.updates`; :meth:`PageTexts.apply` writes the same texts
into the components themselves, from which Gradio's page config is rebuilt, so a page opened (or reloaded)
afterwards arrives in the new language (no update after loading: nothing flickers, an open menu stays open).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from core.i18n import Text

TEXT_PROPERTIES = ("label", "info", "placeholder", "title", "x_title", "y_title", "caption")


@dataclass
class Refresher:
    fn: Callable
    inputs: list | set  # a set: ``fn`` takes one dict, as Gradio passes it
    outputs: list


@dataclass
class PageTexts:
    values: dict = field(default_factory=dict)  # component → Text of its value (buttons, Markdown)
    properties: dict = field(default_factory=dict)  # component → {property: Text or a choices renderer}
    refreshers: list[Refresher] = field(default_factory=list)

    def button(self, text: str, **kwargs):
        """:func:`core.widgets.button` whose text follows the language."""
        from core.widgets import button

        return self._value(button(text, **kwargs), text)

    def markdown(self, text: str, **kwargs):
        import gradio as gr

        return self._value(gr.Markdown(text, **kwargs), text)

    def _value(self, component, text: str):
        if isinstance(text, Text):
            self.values[component] = text
        return component

    def refresh(self, fn: Callable, *, inputs: list, outputs: list) -> None:
        """Run ``fn`` after the page is re-labelled (texts computed from the page's values)."""
        self.refreshers.append(Refresher(fn, inputs, outputs))

    def collect(self, blocks) -> None:
        """Find the :class:`Text` properties of every component of ``blocks`` (a built ``gr.Blocks``)."""
        for block in blocks.blocks.values():
            found = {name: value for name in TEXT_PROPERTIES if isinstance(value := getattr(block, name, None), Text)}
            choices = getattr(block, "choices", None)
            if choices and any(isinstance(choice, tuple) and isinstance(choice[0], Text) for choice in choices):
                found["choices"] = _choices_renderer(choices)
            if found:
                self.properties[block] = found

    @property
    def outputs(self) -> list:
        return list(dict.fromkeys([*self.properties, *self.values]))

    def apply(self) -> None:
        """Set every registered text on its component, in the current language (for the page config)."""
        for component, found in self.properties.items():
            for name, value in found.items():
                setattr(
                    component, name, Text(value.render, value.renderings) if isinstance(value, Text) else value.render()
                )
        for component, text in self.values.items():
            component.value = component.postprocess(text.render())

    def updates(self) -> list:
        """One ``gr.update`` per component of :attr:`outputs`, every text rendered in the current language.
        Widths stay: widgets are sized for their longest translation when built."""
        import gradio as gr

        updates = []
        for component in self.outputs:
            changes = {name: value.render() for name, value in self.properties.get(component, {}).items()}
            if component in self.values:
                changes["value"] = self.values[component].render()
            updates.append(gr.update(**changes))
        return updates


@dataclass(frozen=True)
class _ChoicesRenderer:
    choices: tuple

    def render(self) -> list:
        return [(label.render() if isinstance(label, Text) else label, value) for label, value in self.choices]


def _choices_renderer(choices: list) -> _ChoicesRenderer:
    return _ChoicesRenderer(
        tuple(tuple(choice) if isinstance(choice, tuple) else (choice, choice) for choice in choices)
    )


def page_texts_of(strings) -> PageTexts:
    """The app's PageTexts a tab registers its texts with (a throwaway one for a tab built with a plain dict)."""
    return getattr(strings, "page", None) or PageTexts()
