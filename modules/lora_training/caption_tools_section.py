"""The LoRA Training tab's Caption tools: the set's tag frequency table, and add / remove / replace a tag,
prefix or suffix text, search and undo across the prepared captions (:mod:`.caption_tools`)."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pandas as pd

from core.errors import UserError, shown_to_user
from core.i18n import shown_message, translate

_BUTTONS = ("add", "remove", "replace", "prefix", "suffix", "search", "undo")


class CaptionToolsSection:
    def __init__(self, tab, *, strings: dict) -> None:
        self.tab = tab
        self.strings = strings

    def build(self, t, *, texts) -> SimpleNamespace:
        page = SimpleNamespace()
        with gr.Accordion(t("caption_tools"), open=False, elem_id="lt-caption-tools"):
            with gr.Row():
                page.tag = gr.Textbox(label=t("tool_tag"), placeholder=t("tool_tag_placeholder"), elem_id="lt-tool-tag")
                page.replacement = gr.Textbox(
                    label=t("tool_replacement"), placeholder=t("tool_replacement_placeholder"), elem_id="lt-tool-with"
                )
            with gr.Row():
                page.buttons = {
                    action: texts.button(t(f"tool_{action}"), elem_id=f"lt-tool-{action}", min_width=90)
                    for action in _BUTTONS
                }
            page.refresh = texts.button(t("tool_frequencies"), elem_id="lt-tool-frequencies")
            with gr.Row():
                page.frequencies = gr.Dataframe(
                    headers=[t("tool_column_tag"), t("tool_column_count")],
                    label=t("tool_frequency_table"),
                    interactive=False,
                    max_height=300,
                    elem_id="lt-tag-frequencies",
                )
                page.matches = gr.Dataframe(
                    headers=[t("tool_column_image"), t("caption")],
                    label=t("tool_matches"),
                    interactive=False,
                    max_height=300,
                    elem_id="lt-tool-matches",
                )
        self.page = page
        return page

    def frames(self, result: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The table and the search results, their columns named in the page's language."""

        def names(*keys):
            return [translate(key, self.strings) for key in keys]

        frequencies = pd.DataFrame(result["frequencies"], columns=names("tool_column_tag", "tool_column_count"))
        matches = pd.DataFrame(result["matches"], columns=names("tool_column_image", "caption"))
        return frequencies, matches

    def wire(self, project, *, gallery) -> None:
        """Each button runs its action on the project; the table, the matches and the gallery follow."""
        page = self.page

        def run(action: str):
            def handler(name: str, tag: str, replacement: str):
                try:
                    result = self.tab.caption_tool(name, action=action, tag=tag, replacement=replacement)
                except UserError as exc:
                    raise shown_to_user(exc, self.strings) from exc
                gr.Info(shown_message(result["message"], self.strings))
                frequencies, matches = self.frames(result)
                shown_matches = matches if action == "search" else gr.skip()
                return frequencies, shown_matches, self.tab.prepared_gallery(name)

            return handler

        inputs = [project, page.tag, page.replacement]
        outputs = [page.frequencies, page.matches, gallery]
        private = {"api_visibility": "private"}
        for action, button in page.buttons.items():
            button.click(run(action), inputs=inputs, outputs=outputs, **private)
        page.refresh.click(run("frequencies"), inputs=inputs, outputs=outputs, **private)
