"""The tab's Queue view: the server's jobs as a table (refreshed by the status column's polling) and
cancel / retry / up / down for a chosen job id. Thin: the queue is :class:`core.job_runner.JobRunner`.

The ETA column: the time left of the running job, and for a waiting job the time until it starts (the ETAs
of the jobs ahead of it added up; blank while one of them has none, as a job has none before it runs). The
result column is markdown: a LoRA links to the app's page with it ready in the Generate tab (``?lora=NAME``,
the host's link to "generate.use_lora"); a file the app serves (under ``served``, the folders given to Gradio's
``allowed_paths``: a batch's contact sheet in outputs/) links to the file; else its name. Every text is escaped.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote

import gradio as gr

from core.errors import UserError, shown_to_user
from core.i18n import shown_message, text_of, translate
from modules.lora_training.status_view import format_eta

COLUMNS = ("id", "kind", "project", "state", "progress", "eta", "result")


class QueueSection:
    def __init__(self, runner, *, strings, served: tuple[Path, ...] = (), loras: Path | None = None) -> None:
        self.runner = runner
        self.strings = strings
        self.served = tuple(Path(folder).resolve() for folder in served)
        self.loras = Path(loras).resolve() if loras is not None else None

    # ----- plain functions -------------------------------------------------------------------
    def rows(self) -> list[list]:
        """One row per job: id, kind, project, state (translated), progress, ETA, result (or the error)."""
        rows, ahead = [], 0.0  # seconds until the next waiting job starts; None once unknown
        for job in self.runner.list_jobs():  # the running job first, then the waiting ones in line
            state = translate(f"queue_state_{job.state}", self.strings)
            eta = ""
            if job.state == "running":
                eta = format_eta(job.eta_seconds) if job.eta_seconds is not None else ""
                ahead = job.eta_seconds
            elif job.state == "queued":
                state = f"{state} #{job.position}"
                if ahead:
                    eta = translate("queue_starts_in", self.strings, eta=format_eta(ahead))
                ahead = None  # its own length is not known before it runs
            outcome = (
                self.result_cell(job.result) if job.result else _escaped(shown_message(job.error or "", self.strings))
            )
            rows.append([job.id, job.kind, job.project, state, f"{job.progress:.0%}", eta, outcome])
        return rows

    def result_cell(self, result: str) -> str:
        """The result as markdown: a link to the file when the app serves it, else its name."""
        name = _escaped(_short(result))
        path = Path(result)
        try:
            resolved = path.resolve() if path.is_file() else None
        except OSError:
            resolved = None
        if resolved is None:
            return name
        if self.loras is not None and resolved.suffix == ".safetensors" and resolved.is_relative_to(self.loras):
            return f"[{name}](?lora={quote(resolved.relative_to(self.loras).as_posix())})"
        if any(resolved.is_relative_to(folder) for folder in self.served):
            return f"[{name}](gradio_api/file={quote(str(resolved))})"
        return name

    def act(self, action: str, job_id) -> str:
        """Cancel, retry or move (up / down) job ``job_id``; what happened, for a notice."""
        if job_id is None:
            raise UserError("Type the id of a job from the queue table first.")
        if action == "cancel":
            job = self.runner.cancel(job_id)
        elif action == "retry":
            job = self.runner.retry(job_id)
        else:
            job = self.runner.move(job_id, action)
        return translate(f"queue_done_{action}", self.strings, job_id=job.id, position=job.position or "")

    # ----- UI --------------------------------------------------------------------------------
    def build(self, t, *, button) -> None:
        with gr.Accordion(t("queue"), open=True, elem_id="lt-queue"):
            headers = [text_of(self.strings, f"queue_col_{name}") for name in COLUMNS]
            self.table = gr.Dataframe(
                value=self.rows(),
                headers=headers,
                datatype=["number", "str", "str", "str", "str", "str", "markdown"],
                interactive=False,
                elem_id="lt-queue-table",
                wrap=True,
            )
            with gr.Row(equal_height=True):
                self.job_id = gr.Number(label=t("queue_job_id"), precision=0, minimum=1, elem_id="lt-queue-id")
                self.buttons = {
                    action: button(t(f"queue_{action}"), elem_id=f"lt-queue-{action}")
                    for action in ("cancel", "retry", "up", "down")
                }

    def wire(self) -> None:
        def run(action: str):
            def handler(job_id):
                try:
                    gr.Info(self.act(action, job_id))
                except UserError as exc:
                    raise shown_to_user(exc, self.strings) from exc
                return self.rows()

            return handler

        for action, widget in self.buttons.items():
            widget.click(run(action), inputs=[self.job_id], outputs=[self.table], api_visibility="private")

    def tick(self) -> dict:
        """The table's new rows, for the status column's poll."""
        return {self.table: self.rows()}


def _escaped(text: str) -> str:
    """Plain text in a markdown cell: its markup characters escaped (a name or an error is never markup)."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~&])", r"\\\1", text)


def _short(path: str) -> str:
    """The end of a result's path that names it: ``loras/cat.safetensors``, ``cat/images``."""
    return "/".join(Path(path).parts[-2:])
