"""Small Gradio helpers shared by the tabs."""

from __future__ import annotations

PIXELS_PER_CHARACTER = 9.5  # Gradio's button font, with a margin for wide letters
BUTTON_PADDING = 48


# Checkbox labels sit beside the box and slider labels beside the number: room for both.
BESIDE_LABEL = {"checkbox": 70, "slider": 130}
LABEL_PIXELS_PER_CHARACTER = 8.5


def label_width(label: str, kind: str) -> int:
    """The width a checkbox or slider (``kind``) needs for ``label`` on one line beside it, in any language
    the page can switch to; 0 for other kinds."""
    from core.i18n import every_rendering

    extra = BESIDE_LABEL.get(kind)
    longest = max(len(variant) for variant in every_rendering(label))
    return round(longest * LABEL_PIXELS_PER_CHARACTER) + extra if extra else 0


def button_width(text: str) -> int:
    """The width a button needs to show ``text`` on one line."""
    return round(len(text) * PIXELS_PER_CHARACTER + BUTTON_PADDING)


def button(text: str, **kwargs):
    """A ``gr.Button`` never narrower than its text on one line, in any language the page can switch to: in a
    crowded row the row wraps, not the text (a translation longer than the English one keeps working)."""
    import gradio as gr

    from core.i18n import every_rendering

    width = max(kwargs.pop("min_width", 0), *(button_width(variant) for variant in every_rendering(text)))
    return gr.Button(text, min_width=width, **kwargs)
