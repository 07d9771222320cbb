"""The Queue view's rows (modules/lora_training/queue_section.py) on a real queue: the ETA of waiting jobs
(the time until they start, where the jobs ahead have one) and the result as a markdown link where the app
serves the file or, for a LoRA, to the page that opens it in Generate; escaped text otherwise."""

from __future__ import annotations

import time

from core.job_queue import JobStore
from core.job_runner import JobRunner, JobStatus
from modules.lora_training.queue_section import QueueSection
from tests.unit.test_job_queue import Sleeper, wait_until


class Writer(Sleeper):
    """Sleeper jobs whose result is the file named in their settings; the running one has 125 s left."""

    def payload(self, kind, project, settings):
        return {**super().payload(kind, project, settings), "result": settings.get("result", "")}

    def poll(self, job):
        if self.running[job.id].is_alive():
            return JobStatus("running", progress=0.5, eta_seconds=125.0)
        return JobStatus(self.outcome[job.id], result=job.payload["result"] or None)


def test_waiting_jobs_show_when_they_start_and_results_link_where_served(tmp_path):
    served, private = tmp_path / "outputs", tmp_path / "loras"
    (served / "batch-1").mkdir(parents=True)
    private.mkdir()
    sheet = served / "batch-1" / "contact-sheet.png"
    sheet.write_bytes(b"png")
    (private / "cat_[v2]*.safetensors").write_bytes(b"lora")
    runner = JobRunner(JobStore(tmp_path / "queue.sqlite"), tick_s=0.02)
    runner.register(Writer())
    runner.start()
    try:
        for result in (sheet, private / "cat_[v2]*.safetensors"):
            job = runner.submit("sleep", "done", {"seconds": 0, "result": str(result)})
            wait_until(lambda job=job: runner.store.get(job["id"]).state == "finished")
        runner.submit("sleep", "a", {"seconds": 30})
        runner.submit("sleep", "b", {"seconds": 1})
        runner.submit("sleep", "c", {"seconds": 1})
        time.sleep(0.1)  # a tick records the running job's ETA
        view = QueueSection(runner, strings={"queue_starts_in": "starts in {eta}"}, served=(served,))
        rows = {row[2] + str(row[0]): row for row in view.rows()}
        assert [rows["a3"][5], rows["b4"][5], rows["c5"][5]] == ["2m05s", "starts in 2m05s", ""]
        link = rows["done1"][6]
        assert link.startswith("[batch\\-1/contact\\-sheet\\.png](gradio_api/file=") and link.endswith(
            "outputs/batch-1/contact-sheet.png)"
        ), link
        assert rows["done2"][6] == "loras/cat\\_\\[v2\\]\\*\\.safetensors", "not served: escaped text, no link"
        # A LoRA links to the app's page that opens it in the Generate tab (the host's "?lora=" link).
        with_loras = QueueSection(runner, strings={}, served=(served,), loras=private)
        lora_row = next(row for row in with_loras.rows() if row[0] == 2)
        assert lora_row[6] == "[loras/cat\\_\\[v2\\]\\*\\.safetensors](?lora=cat_%5Bv2%5D%2A.safetensors)", lora_row
        runner.cancel(3)
    finally:
        runner.close()
