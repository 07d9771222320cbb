"""The queue's API endpoints: ``/queue_add``, ``/queue_list``, ``/queue_cancel``, ``/queue_move``, ``/queue_retry``.

Registered by the host inside its ``gr.Blocks`` (they belong to no tab: any plugin's kind is queued
through them). A refusal is a ``gr.Error`` with the message in the page's language.
"""

from __future__ import annotations

from core.errors import UserError, shown_to_user
from core.job_queue import QueuedJob
from core.job_runner import JobRunner

SHOWN = ("id", "kind", "project", "state", "position", "progress", "eta_seconds", "message", "result", "error")
SHOWN += ("attempts", "resume", "created", "started", "ended", "run_id")


def job_view(job: QueuedJob) -> dict:
    return {name: getattr(job, name) for name in SHOWN}


class QueueApi:
    def __init__(self, runner: JobRunner, *, strings=None) -> None:
        self.runner = runner
        self.strings = strings

    def register(self) -> None:
        import gradio as gr

        # Not through Gradio's queue: two clients adding at once really add at once (the store orders them).
        gr.api(self.queue_add, api_name="queue_add", queue=False)
        gr.api(self.queue_list, api_name="queue_list", queue=False)
        gr.api(self.queue_cancel, api_name="queue_cancel", queue=False)
        gr.api(self.queue_move, api_name="queue_move", queue=False)
        gr.api(self.queue_retry, api_name="queue_retry", queue=False)

    def _answer(self, work):
        try:
            return work()
        except UserError as exc:
            raise shown_to_user(exc, self.strings) from exc

    def queue_add(self, kind: str, project: str, settings: str = "{}") -> dict:
        """Queue a job: `kind` (prepare, train, prepare+train, evaluate, ...), `project`, `settings` a JSON
        object of its settings (train: TrainConfig fields such as {"base_model": "...", "steps": 500};
        prepare: {"images_dir", "trigger", "captioner", ...}; prepare+train: {"prepare": {...}, "train":
        {...}}). It starts at once when nothing runs. Returns the job (id, state, position, ...)."""

        def add():
            row = self.runner.submit(kind, project, settings)
            return {**job_view(self.runner.store.get(row["id"])), "started": row["started"] is not None}

        return self._answer(add)

    def queue_list(self) -> list[dict]:
        """The jobs: the running one, the queued ones in their order, then the others (newest first)."""
        return [job_view(job) for job in self.runner.list_jobs()]

    def queue_cancel(self, job_id: int) -> dict:
        """Take a queued job out of the line, or stop the running one (its checkpoint is kept)."""
        return self._answer(lambda: job_view(self.runner.cancel(job_id)))

    def queue_move(self, job_id: int, to: str = "up") -> dict:
        """Move a queued job: `to` is its new place (1 is next) or "up" / "down"."""
        return self._answer(lambda: job_view(self.runner.move(job_id, to)))

    def queue_retry(self, job_id: int) -> dict:
        """Queue a failed, cancelled or interrupted job again (a training continues from its checkpoint)."""
        return self._answer(lambda: job_view(self.runner.retry(job_id)))
