"""The LoRA Training tab's Sweeps section: the search space (JSON), the trial budget, Start sweep (a job the
status column follows), the trials table, parameter importance, the parallel-coordinates picture and Train with
the best settings. Everything shown is read from the study's storage (:mod:`.sweep_results`). The table and its
summary line follow the sweep the server runs, through the status column's poll (:mod:`.sweep_follow`); Show
results reads any study, with its importance and picture.
API: ``/sweep_start``, ``/sweep_status``, ``/sweep_train_best``."""

from __future__ import annotations

import json
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from core.errors import UserError, shown_to_user
from core.i18n import text_of
from core.page_texts import page_texts_of
from modules.lora_training.status_view import start_job

EXAMPLE_SPACE = {
    "parameters": {
        "learning_rate": {"low": 1e-5, "high": 1e-3, "log": True},
        "rank": [4, 8, 16],
        "alpha": [4, 8, 16],
    },
    "trial_steps": 100,
    "reports": 4,
    "pruner": {"type": "median", "startup_trials": 2},
}
DEFAULT_TRIALS = 8
_COLUMNS = ("sweep_col_number", "sweep_col_state", "sweep_col_value", "sweep_col_pruned", "sweep_col_params")
_COLUMNS += ("sweep_col_error",)


def _headers(strings: dict) -> list[str]:
    from core.i18n import translate

    return [translate(key, strings) for key in _COLUMNS]


def _objective(row: dict) -> float | None:
    """The trial's objective; a running trial's last reported figure until it has one."""
    value = row["value"] if row["value"] is not None else row.get("last_value")
    return None if value is None else round(value, 5)


def _state(row: dict) -> str:
    """The trial's state; a running trial's with the step of its last report (its objective is from there)."""
    if row["state"] == "running" and row.get("last_step") is not None:
        return f"running @{row['last_step']}"
    return row["state"]


def table_frame(summary: dict, strings: dict) -> pd.DataFrame:
    rows = [
        (
            row["number"],
            _state(row),
            _objective(row),
            row["pruned_at_step"],
            json.dumps(row["params"]),
            row["error"][:200],
        )
        for row in summary.get("trials", [])
    ]
    return pd.DataFrame(rows, columns=_headers(strings))


def importance_frame(summary: dict) -> pd.DataFrame:
    found = summary.get("importance", {})
    return pd.DataFrame({"parameter": list(found), "importance": [float(v) for v in found.values()]})


def summary_line(found: dict, strings: dict) -> str:
    """ "Study s1: 4 trials (2 complete, 1 running). Best: {...}" in the page's language."""
    from core.i18n import translate

    best = found["best"]
    return translate(
        "sweep_summary",
        strings,
        study=found["study"],
        budget=found["budget"],
        counts=", ".join(f"{count} {state}" for state, count in found["counts"].items()),
        best=json.dumps(best["params"]) if best else "-",
    )


class SweepSection:
    def __init__(self, tab, *, strings: dict) -> None:
        from modules.lora_training.sweep_follow import TrialsFollower

        self.tab = tab
        self.strings = strings
        self.follower = TrialsFollower(self.read_trials)

    def place(self, project: str):
        from modules.lora_training.sweep import Place

        config = self.tab.config
        return Place(config.LORA_PROJECTS_DIR, config.MODELS_DIR, project, image_roots=config.IMAGE_ROOTS)

    # ----- plain functions (the API and the buttons) ---------------------------------------------------------
    def start(self, project: str, *, base_model: str, space_text: str, trials, study: str = "") -> dict:
        """The sweep starts now when nothing runs, else waits its turn in the queue (its study exists then)."""
        if self.tab.queue is None:
            return self.tab.jobs.sweep(
                project, space_text=space_text, trials=trials, base_model=base_model, study=study
            )
        settings = {"space": space_text, "trials": trials, "base_model": base_model, "study": study}
        return self.tab.submit("sweep", project, settings)

    def status(self, project: str, study: str = "") -> dict:
        """The study's summary (:func:`.sweep_results.summary`) and its parallel-coordinates PNG (``plot``)."""
        from modules.lora_training.sweep import find_study
        from modules.lora_training.sweep_results import parallel_coordinates, summary
        from modules.lora_training.sweep_study import sweeps_dir

        place = self.place(project)
        with find_study(place, study) as found:  # its database connections closed after
            result = summary(found)
            plot = parallel_coordinates(found, sweeps_dir(place.paths) / found.name / "parallel-coordinates.png")
        return {**result, "plot": str(plot) if plot else None}

    def read_trials(self, project: str, study: str) -> dict:
        """The study's summary without importance or plot: what the table shows while a sweep runs."""
        from modules.lora_training.sweep import find_study
        from modules.lora_training.sweep_results import summary

        with find_study(self.place(project), study) as found:
            return summary(found, with_importance=False)

    def follow(self, snapshot: dict, seen: dict) -> tuple[dict, dict]:
        """For the status column's poll: the summary line and the trials table of the sweep the server runs
        (or ran last), when they changed since this page showed them (``seen["sweep_version"]``), and what the
        page shows now. Never waits on the database (:class:`.sweep_follow.TrialsFollower`)."""
        shown = seen.get("sweep_version")
        if snapshot.get("kind") != "sweep" or not snapshot.get("study"):
            return {}, {"sweep_version": shown}
        revision = (snapshot.get("job_id"), snapshot["state"], snapshot.get("revision"))
        version, found = self.follower.follow(snapshot["project"], snapshot["study"], revision)
        if found is None or version == shown:
            return {}, {"sweep_version": shown}
        updates = {
            self.page.summary: summary_line(found, self.strings),
            self.page.table: table_frame(found, self.strings),
        }
        return updates, {"sweep_version": version}

    def train_best(self, project: str, study: str = "", *, new_run: bool = False) -> dict:
        """Queue the full run with the best trial's parameters (it starts at once when nothing runs)."""
        from modules.lora_training.sweep import best_train_config, find_study

        with find_study(self.place(project), study) as found:
            config = best_train_config(found)
        if self.tab.queue is None:
            return self.tab.jobs.start(train_config=config, new_run=new_run)
        return self.tab.start(prepare=None, train=config, new_run=new_run)

    # ----- the page ---------------------------------------------------------------------------------------------
    def build(self, t, *, texts) -> SimpleNamespace:
        button = texts.button
        page = SimpleNamespace()
        with gr.Accordion(t("sweep_section"), open=False, elem_id="lt-sweep-section"):
            page.space = gr.Code(
                json.dumps(EXAMPLE_SPACE, indent=2), language="json", label=t("sweep_space"), elem_id="lt-sweep-space"
            )
            with gr.Row():
                page.trials = gr.Number(
                    DEFAULT_TRIALS,
                    minimum=1,
                    maximum=500,
                    precision=0,
                    label=t("sweep_trials"),
                    elem_id="lt-sweep-trials",
                )
                page.study = gr.Textbox(
                    label=t("sweep_study"), placeholder=t("sweep_study_placeholder"), elem_id="lt-sweep-study", scale=2
                )
            with gr.Row():
                page.start = button(t("sweep_start"), variant="primary", elem_id="lt-sweep-start")
                page.refresh = button(t("sweep_refresh"), elem_id="lt-sweep-refresh")
                page.train_best = button(t("sweep_train_best"), elem_id="lt-sweep-train-best")
            page.summary = texts.markdown("", elem_id="lt-sweep-summary")
            page.table = gr.Dataframe(
                [],
                headers=[text_of(self.strings, key) for key in _COLUMNS],  # a reload shows the page's language
                label=t("sweep_table"),
                interactive=False,
                elem_id="lt-sweep-table",
            )
            with gr.Row():
                page.importance = gr.BarPlot(
                    importance_frame({}),
                    x="parameter",
                    y="importance",
                    label=t("sweep_importance"),
                    elem_id="lt-sweep-importance",
                )
                page.plot = gr.Image(
                    label=t("sweep_plot"), type="filepath", interactive=False, elem_id="lt-sweep-plot", height=320
                )
        self.page = page
        return page

    def wire(self, project, *, base_model, new_run) -> None:
        strings, page = self.strings, self.page

        def on_start(name: str, model: str, space: str, trials, study: str) -> None:
            start_job(lambda: self.start(name, base_model=model, space_text=space, trials=trials, study=study), strings)

        def on_refresh(name: str, study: str):
            try:
                found = self.status(name, study)
            except UserError as exc:
                raise shown_to_user(exc, strings) from exc
            return summary_line(found, strings), table_frame(found, strings), importance_frame(found), found["plot"]

        def relabelled_table(name: str, study: str) -> pd.DataFrame:
            """The table again in the page's new language (its headers are the frame's columns)."""
            from modules.lora_training.sweep import find_study
            from modules.lora_training.sweep_results import summary

            try:
                with find_study(self.place(name), study) as found:
                    return table_frame(summary(found), strings)
            except UserError:
                return table_frame({}, strings)

        page_texts_of(strings).refresh(relabelled_table, inputs=[project, page.study], outputs=[page.table])

        def on_train_best(name: str, study: str, fresh: bool) -> None:
            start_job(lambda: self.train_best(name, study, new_run=bool(fresh)), strings)

        private = {"api_visibility": "private"}
        page.start.click(on_start, inputs=[project, base_model, page.space, page.trials, page.study], **private)
        page.refresh.click(
            on_refresh,
            inputs=[project, page.study],
            outputs=[page.summary, page.table, page.importance, page.plot],
            **private,
        )
        page.train_best.click(on_train_best, inputs=[project, page.study, new_run], **private)
