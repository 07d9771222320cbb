"""The Generate tab's batch section (a CSV/JSON file → one background batch) and its API endpoints
``/batch_generate``, ``/batch_status`` and ``/batch_stop``. Thin: the work is in batch.py / batch_job.py."""

from __future__ import annotations

from types import SimpleNamespace

from core.errors import UserError, shown_to_user
from core.i18n import shown_message, translate
from modules.generate.batch import read_batch_file
from modules.generate.batch_job import BatchRunner


class BatchSection:
    def __init__(self, runner: BatchRunner, *, queue=None) -> None:
        self.runner = runner
        self.queue = queue  # the server's JobRunner: a batch waits there while another job holds the device
        self.kinds = None
        if queue is not None:
            from modules.generate.batch_kinds import BatchKinds

            self.kinds = BatchKinds(runner)
            queue.register(self.kinds)
        self.strings: dict = {}
        self.widgets = SimpleNamespace()

    def submit(self, text: str, *, base_seed=None) -> dict:
        """Run a batch now when nothing runs, else queue it: its id, folder and rows, or
        ``{"state": "queued", "queue_id", "position"}``."""
        if self.queue is None:
            return self.runner.start(text, base_seed=base_seed)
        row = self.queue.enqueue("batch", "", self.kinds.batch_payload(text, base_seed=base_seed))
        if row["started"] is not None:
            return {**row["started"], "queue_id": row["id"]}
        return {"id": row["payload"]["batch_id"], "queue_id": row["id"], "state": "queued", "position": row["position"]}

    def _waiting(self, batch_id: str):
        """The queued job of batch ``batch_id`` (with "": the newest waiting batch), or None."""
        if self.queue is None or not isinstance(batch_id, str):
            return None
        waiting = [job for job in self.queue.list_jobs() if job.kind == "batch" and job.state == "queued"]
        for job in sorted(waiting, key=lambda job: job.id, reverse=True):
            full = self.queue.store.get(job.id)  # the list leaves payloads out
            if not batch_id or full.payload.get("batch_id") == batch_id:
                return full
        return None

    def status(self, batch_id: str = "") -> dict:
        """A batch's progress: a batch waiting in the queue as "waiting"; with "": the running batch, else the
        newest waiting one, else the last that ran."""
        latest = self.runner.job("") if not batch_id else None
        waiting = None if latest is not None and latest.running else self._waiting(batch_id)
        if waiting is None:
            return self.runner.status(batch_id)
        return _waiting_snapshot(waiting, state="waiting")

    def stop(self, batch_id: str = "") -> dict:
        """Stop a running batch between rows, or take a waiting one out of the queue (as "" in :meth:`status`)."""
        latest = self.runner.job("") if not batch_id else None
        waiting = None if latest is not None and latest.running else self._waiting(batch_id)
        if waiting is None:
            return self.runner.stop(batch_id)
        self.queue.cancel(waiting.id)
        return _waiting_snapshot(waiting, state="stopped")

    # ----- plain functions (the page's handlers and the API) ---------------------
    def progress_text(self, snapshot: dict) -> str:
        strings = self.strings
        if not snapshot.get("id"):
            return ""
        state = translate(f"batch_state_{snapshot['state']}", strings)
        line = translate(
            "batch_progress",
            strings,
            done=snapshot["done"],
            total=snapshot["total"],
            failed=snapshot["failed"],
            state=state,
            folder=snapshot["folder"],
        )
        message = snapshot.get("message")
        return f"{line}  \n{shown_message(message, strings)}" if message else line

    def gallery_items(self, snapshot: dict) -> list[tuple[str, str]]:
        items = [(row_path, f"#{n}") for n, row_path in _numbered_images(snapshot)]
        if snapshot.get("contact_sheet"):
            items.append((snapshot["contact_sheet"], translate("batch_contact_sheet", self.strings)))
        return items

    def run_file(self, path) -> dict:
        if not path:
            raise UserError("Choose a batch file (CSV or JSON) first.")
        return self.submit(read_batch_file(str(path)))

    # ----- API -------------------------------------------------------------------
    def register_api(self) -> None:
        import gradio as gr

        def batch_generate(batch: str, base_seed: int | None = None) -> dict:
            """Run a batch in the background (queued while another job holds the device): `batch` is the text of a CSV or JSON file of rows (prompt, negative,
            model, loras, seed, width, height, steps, guidance; all but prompt optional); a row without a seed
            gets base_seed + its index (a random base seed when none). Returns the batch's id, folder, rows."""
            try:
                return self.submit(batch, base_seed=base_seed)
            except UserError as exc:
                raise shown_to_user(exc, self.strings) from exc

        def batch_status(batch_id: str = "") -> dict:
            """A batch's progress (rows done/total), state, per-row results and folder; the latest when no id."""
            try:
                return self.status(batch_id)
            except UserError as exc:
                raise shown_to_user(exc, self.strings) from exc

        def batch_stop(batch_id: str = "") -> dict:
            """Stop a batch (the latest when no id) between rows; the row in flight stops at its next step."""
            try:
                return self.stop(batch_id)
            except UserError as exc:
                raise shown_to_user(exc, self.strings) from exc

        gr.api(batch_generate, api_name="batch_generate")
        gr.api(batch_status, api_name="batch_status", queue=False)
        gr.api(batch_stop, api_name="batch_stop", queue=False)

    # ----- UI --------------------------------------------------------------------
    def build(self, t, *, button) -> None:
        import gradio as gr

        w = self.widgets
        with gr.Accordion(t("batch"), open=False, elem_id="generate-batch"):
            with gr.Row():
                w.file = gr.File(
                    label=t("batch_file"), file_types=[".csv", ".json"], type="filepath", scale=3, height=120
                )
                with gr.Column(scale=1, min_width=160):
                    w.run = button(t("batch_run"), variant="primary", elem_id="generate-batch-run")
                    w.stop = button(t("batch_stop"), elem_id="generate-batch-stop")
            w.progress = gr.Markdown(elem_id="generate-batch-progress")
            w.gallery = gr.Gallery(
                label=t("batch_images"), columns=6, height=280, elem_id="generate-batch-gallery", interactive=False
            )
        w.timer = gr.Timer(1.0, active=False)

    def wire(self, strings) -> None:
        import gradio as gr

        self.strings = strings
        w = self.widgets
        private = {"api_visibility": "private"}

        def poll():
            snapshot = self.status()
            running = snapshot["state"] in ("queued", "running", "waiting")
            return self.progress_text(snapshot), self.gallery_items(snapshot), gr.Timer(active=running)

        def run(path):
            try:
                started = self.run_file(path)
            except UserError as exc:
                raise shown_to_user(exc, strings) from exc
            if started.get("state") == "queued":
                gr.Info(translate("batch_queued", strings, queue_id=started["queue_id"], position=started["position"]))
            return poll()

        def stop():
            self.stop()
            return poll()

        outputs = [w.progress, w.gallery, w.timer]
        w.run.click(run, inputs=[w.file], outputs=outputs, **private)
        w.stop.click(stop, outputs=outputs, queue=False, **private)
        w.timer.tick(poll, outputs=outputs, show_progress="hidden", queue=False, **private)


def _waiting_snapshot(job, *, state: str) -> dict:
    """What /batch_status shows of a batch still in the queue (nothing has run)."""
    return {
        "id": job.payload.get("batch_id"),
        "state": state,
        "queue_id": job.id,
        "position": job.position if state == "waiting" else None,
        "done": 0,
        "total": 0,
        "failed": 0,
        "rows": [],
        "images": [],
        "folder": "",
        "contact_sheet": None,
        "message": "",
    }


def _numbered_images(snapshot: dict) -> list[tuple[int, str]]:
    folder = snapshot.get("folder") or ""
    return [(row["row"], f"{folder}/{row['file']}") for row in snapshot.get("rows", []) if row.get("file")]
