"""The LoRA Training tab's Evaluate section: how the best checkpoint is chosen, Evaluate and Draw grid
(jobs the status column follows), the figures per checkpoint as charts, the comparison grid, the best
checkpoint, and Save best as LoRA. Everything shown is read back from the run's ``evaluation.json``
and grid files, so a reloaded page (or another browser) shows the same.
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pandas as pd

from core.errors import UserError, shown_to_user
from core.i18n import translate
from modules.lora_training.status_view import series_frame, start_job
from modules.lora_training.validation import BEST_RULES, DEFAULT_MARGIN, DEFAULT_RULE, Evaluation

_LOSS_SERIES = (("validation_loss", "series_held_out"), ("training_images_loss", "series_training_images"))
_CLIP_SERIES = (
    ("subject_similarity", "series_subject"),
    ("prompt_adherence", "series_prompts"),
    ("aesthetic", "series_aesthetic"),
)


def figure_frames(evaluation: Evaluation, strings: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The charts' points: the losses per step, and the CLIP figures per step (one series per figure)."""

    def frame(series: tuple) -> pd.DataFrame:
        rows = [
            (record["step"], float(record[key]), translate(name, strings))
            for record in evaluation.records
            for key, name in series
            if record.get(key) is not None
        ]
        return series_frame(rows, value="value")

    return frame(_LOSS_SERIES), frame(_CLIP_SERIES)


def best_text(evaluation: Evaluation, strings: dict) -> str:
    """ "Best checkpoint (rule): step-000040 (step 40), held-out 0.1234 ..." or why there is none."""
    best = evaluation.best()
    rule = translate(f"rule_{evaluation.rule}", strings)
    if best is None:
        return translate("best_none", strings, rule=rule)
    figures = [
        f"{translate(name, strings)} {best[key]:.4g}"
        for key, name in (*_LOSS_SERIES, *_CLIP_SERIES)
        if best.get(key) is not None
    ]
    return translate(
        "best_line", strings, rule=rule, checkpoint=best["checkpoint"], step=best["step"], figures=", ".join(figures)
    )


class EvaluateSection:
    def __init__(self, tab, *, strings: dict) -> None:
        self.tab = tab
        self.strings = strings

    @property
    def jobs(self):
        return self.tab.jobs

    def build(self, t, *, texts) -> SimpleNamespace:
        button = texts.button
        page = SimpleNamespace()
        with gr.Accordion(t("evaluate_section"), open=False, elem_id="lt-evaluate-section"):
            with gr.Row():
                rules = [(t(f"rule_{rule}"), rule) for rule in BEST_RULES]
                page.rule = gr.Dropdown(rules, value=DEFAULT_RULE, label=t("best_rule"), elem_id="lt-best-rule")
                page.margin = gr.Number(
                    DEFAULT_MARGIN,
                    minimum=0,
                    maximum=1,
                    step=0.01,
                    label=t("margin"),
                    info=t("margin_info"),
                    elem_id="lt-margin",
                )
                page.evaluate = button(t("evaluate"), elem_id="lt-evaluate")
            with gr.Row():
                rows = [(t("rows_checkpoints"), "checkpoints"), (t("rows_weights"), "weights")]
                page.rows = gr.Radio(rows, value="checkpoints", label=t("grid_rows"), elem_id="lt-grid-rows", scale=2)
                page.grid_button = button(t("draw_grid"), elem_id="lt-draw-grid")
            page.best = texts.markdown("", elem_id="lt-best")
            with gr.Row():
                page.best_name = gr.Textbox(
                    label=t("best_name"), placeholder=t("best_name_placeholder"), elem_id="lt-best-name", scale=2
                )
                page.save_best = button(t("save_best"), elem_id="lt-save-best")
            with gr.Row():
                page.loss_plot = self._plot(t("figures_loss"), t, y_title=t("loss"), elem_id="lt-eval-loss")
                page.clip_plot = self._plot(t("figures_clip"), t, y_title=t("clip_cosine"), elem_id="lt-eval-clip")
            page.grid = gr.Image(label=t("grid"), type="filepath", interactive=False, elem_id="lt-grid", height=420)
        self.page = page
        return page

    @staticmethod
    def _plot(label, t, *, y_title, elem_id: str):
        return gr.LinePlot(
            series_frame([], value="value"),
            x="step",
            y="value",
            color="series",
            label=label,
            x_title=t("plot_step"),
            y_title=y_title,
            elem_id=elem_id,
        )

    @property
    def outputs(self) -> list:
        return [self.page.best, *self.plots, self.page.grid, self.page.rule, self.page.margin]

    @property
    def plots(self) -> list:
        return [self.page.loss_plot, self.page.clip_plot]

    def view(self, project: str, *, grid: str | None = None) -> dict:
        """The section's widgets for the project's newest run (empty when it has none); ``grid`` is the
        grid a job just drew (else the run's newest)."""
        from modules.lora_training.evaluate import find_run
        from modules.lora_training.project import ProjectPaths

        try:
            run = find_run(ProjectPaths.for_project(self.tab.config.LORA_PROJECTS_DIR, project), None)
        except UserError:
            return {self.page.best: "", self.page.grid: None}
        evaluation = Evaluation.read(run.evaluation, up_to_step=run.last_step())
        losses, clip = figure_frames(evaluation, self.strings)
        drawn = [path for path in (run.grid("checkpoints"), run.grid("weights")) if path.is_file()]
        newest = max(drawn, key=lambda path: path.stat().st_mtime, default=None)
        return {
            self.page.best: best_text(evaluation, self.strings) if evaluation.records else "",
            self.page.loss_plot: losses,
            self.page.clip_plot: clip,
            self.page.grid: grid or (str(newest) if newest else None),
            self.page.rule: evaluation.rule,  # the rule the figures were ranked by
            self.page.margin: evaluation.margin,
        }

    def wire(self, project) -> None:
        strings = self.strings
        page = self.page

        def on_evaluate(name: str, rule: str, margin) -> None:
            margin = DEFAULT_MARGIN if margin is None else margin
            start_job(lambda: self.tab.evaluate(name, run_id=None, best_rule=rule, margin=margin), strings)

        def on_grid(name: str, rows: str) -> None:
            start_job(lambda: self.tab.comparison_grid(name, run_id=None, rows=rows), strings)

        def on_save_best(name: str, lora_name: str) -> None:
            try:
                path = self.tab.save_checkpoint_lora(
                    name, name=lora_name.strip() or f"{name}_best", step=None, run_id=None, overwrite=False
                )
            except UserError as exc:
                raise shown_to_user(exc, strings) from exc
            gr.Info(translate("saved_best", strings, name=path.stem))

        private = {"api_visibility": "private"}
        page.evaluate.click(on_evaluate, inputs=[project, page.rule, page.margin], **private)
        page.grid_button.click(on_grid, inputs=[project, page.rows], **private)
        page.save_best.click(on_save_best, inputs=[project, page.best_name], **private)
