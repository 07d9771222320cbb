"""Batch generation as a queued job (:class:`core.job_runner.JobKinds`, kind "batch"): a batch waits while
a training or another batch holds the device, instead of losing its rows to it.

The payload is the batch's text and its base seed, drawn when the job is queued, so a retried batch makes
the same images. The whole file is checked before it joins the line.
"""

from __future__ import annotations

from core.errors import UserError
from core.job_queue import QueuedJob
from core.job_runner import JobStatus
from modules.generate.batch import parse_batch
from modules.generate.batch_job import BatchRunner, base_seed_of, new_batch_id


class BatchKinds:
    kinds = ("batch",)

    def __init__(self, runner: BatchRunner) -> None:
        self.runner = runner
        self._batch_ids: dict[int, str] = {}  # queue job id → batch id

    def payload(self, kind: str, project: str, settings: dict) -> dict:
        unknown = sorted(set(settings) - {"batch", "base_seed"})
        if unknown:
            raise UserError(f"settings of a batch job hold batch and base_seed; not {', '.join(unknown)}"[:300])
        text = settings.get("batch")
        if not isinstance(text, str):
            raise UserError("settings.batch must be the text of a CSV or JSON batch file")
        return self.batch_payload(text, base_seed=settings.get("base_seed"))

    def batch_payload(self, text: str, *, base_seed=None) -> dict:
        seed = base_seed_of(base_seed)
        parse_batch(text, defaults=self.runner.defaults(), base_seed=seed)  # refused now, not by a failed job
        # Its id from now on: /batch_status and /batch_stop know it while it waits in the queue.
        return {"batch": text, "base_seed": seed, "batch_id": new_batch_id()}

    def check(self, kind: str, project: str, payload: dict) -> None:
        """The payload was checked when it was made; a batch belongs to no project."""
        if project:
            raise UserError("A batch job belongs to no project: leave project empty.")

    def start(self, job: QueuedJob) -> dict:
        payload = job.payload
        shown = self.runner.start(payload["batch"], base_seed=payload["base_seed"], batch_id=payload.get("batch_id"))
        self._batch_ids[job.id] = shown["id"]
        return shown

    def poll(self, job: QueuedJob) -> JobStatus:
        batch_id = self._batch_ids.get(job.id)
        if batch_id is None:
            return JobStatus("failed", error="The job was lost: another job took its place.")
        status = self.runner.status(batch_id)
        progress = status["done"] / status["total"] if status["total"] else 0.0
        if status["state"] in ("queued", "running"):
            return JobStatus("running", progress=progress)
        self._batch_ids.pop(job.id, None)
        state = {"done": "finished", "stopped": "cancelled"}.get(status["state"], "failed")
        error = status["message"] if state == "failed" else None
        result = status["contact_sheet"] or status["folder"]  # the sheet: one picture of the whole batch
        return JobStatus(state, progress=progress, message=status["message"], result=result, error=error)

    def stop(self, job: QueuedJob) -> None:
        batch_id = self._batch_ids.get(job.id)
        if batch_id is not None:
            self.runner.stop(batch_id)

    def busy(self) -> bool:
        return self.runner.status()["state"] in ("queued", "running")
