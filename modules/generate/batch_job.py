"""Batch generation, the running side: one background thread per batch, through the ModelManager.

A :class:`BatchJob` runs its checked requests in order, writes each image (PNG with its settings, as the
Generate tab writes them), a ``manifest.json`` after every row and a contact sheet at the end, all under
``outputs/batch-<id>/`` and all atomically. ``snapshot()`` answers at once while it runs; ``stop()``
stops it between rows, and the row in flight at its next check: while it waits for the pipeline, before
its model and each LoRA load (a load under way ends first), at its next denoising step. A row that fails is recorded
with its error and the next one runs; when training takes the GPU the batch stops there.
:class:`BatchRunner` starts batches (one at a time) and finds them by id. No gradio import here.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import secrets
import threading
import time
from pathlib import Path

from core.atomic import atomic_path, write_text_atomic
from core.errors import GenerationCancelled, GpuBusyError, UserError
from core.model_manager import GenerationRequest
from modules.generate.batch import MAX_SEED, BatchDefaults, parse_batch
from modules.generate.outputs import save_png
from modules.generate.tab import whole_number

log = logging.getLogger(__name__)

CONTACT_SHEET = "contact-sheet.png"
MANIFEST = "manifest.json"
KEPT_JOBS = 20


def request_settings(request: GenerationRequest) -> dict:
    """A row as resolved: every setting the image is made with (the manifest's ``settings``)."""
    return {
        "prompt": request.prompt,
        "negative": request.negative_prompt,
        "model": request.model,
        "loras": [{"name": c.name, "weight": c.weight} for c in request.loras],
        "seed": request.seed,
        "width": request.width,
        "height": request.height,
        "steps": request.steps,
        "guidance": request.guidance,
    }


class BatchJob:
    def __init__(self, *, batch_id: str, folder: Path, requests: list[GenerationRequest], manager, base_seed: int):
        self.batch_id = batch_id
        self.folder = Path(folder)
        self.requests = list(requests)
        self.manager = manager
        self.base_seed = base_seed
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.state = "queued"
        self.message = ""
        self.contact_sheet: str | None = None
        self.rows = [
            {"row": n, "status": "pending", "settings": request_settings(r), "file": None, "error": None}
            for n, r in enumerate(self.requests, start=1)
        ]

    # ----- control -------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"batch-{self.batch_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop between rows; the row in flight stops at its next check (see the module's docstring)."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self.state in ("queued", "running")

    def snapshot(self) -> dict:
        """Progress and per-row results, copied under the lock (answers at once while rows run)."""
        with self._lock:
            finished = [row for row in self.rows if row["status"] in ("done", "failed")]
            return {
                "id": self.batch_id,
                "state": self.state,
                "message": self.message,
                "done": len(finished),
                "total": len(self.rows),
                "failed": sum(row["status"] == "failed" for row in self.rows),
                "base_seed": self.base_seed,
                "folder": str(self.folder),
                "images": [str(self.folder / row["file"]) for row in self.rows if row["file"]],
                "contact_sheet": str(self.folder / self.contact_sheet) if self.contact_sheet else None,
                "rows": [dict(row) for row in self.rows],
            }

    # ----- the thread ------------------------------------------------------------
    def _set(self, *, state: str | None = None, message: str | None = None) -> None:
        with self._lock:
            self.state = state or self.state
            self.message = self.message if message is None else message

    def _run(self) -> None:
        self._set(state="running")
        self._write_manifest()
        try:
            stopped_by = None
            for index, request in enumerate(self.requests):
                if self._stop.is_set():
                    stopped_by = "user"
                    break
                if self._run_row(index, request) == "gpu":
                    stopped_by = "gpu"
                    break
            self._finish(stopped_by)
        except Exception as exc:  # a bug, not a row's problem: the batch ends, the server goes on
            log.exception("batch %s failed", self.batch_id)
            self._set(state="failed", message=f"Batch failed: {type(exc).__name__}: {exc}"[:500])
        self._write_manifest()

    def _finish(self, stopped_by: str | None) -> None:
        with self._lock:
            for row in self.rows:
                if row["status"] == "pending":
                    row["status"] = "not run"
        self._write_contact_sheet()
        if stopped_by == "user":
            self._set(state="stopped", message="Batch stopped: the rows not run are marked in the manifest.")
        elif stopped_by == "gpu":
            self._set(state="stopped", message="Batch stopped: a training run took the GPU.")
        else:
            self._set(state="done", message="")

    def _run_row(self, index: int, request: GenerationRequest) -> str:
        row = self.rows[index]
        outcome = "done"
        try:
            result = self.manager.generate(request, client_present=lambda: not self._stop.is_set())
            name = f"row-{index + 1:03d}-seed{result.seed}.png"
            save_png(result.image, result.parameters, self.folder / name)
            update = {"status": "done", "file": name}
        except GenerationCancelled:
            update = {"status": "not run", "error": "Stopped by the user."}
        except GpuBusyError as exc:
            update, outcome = {"status": "not run", "error": str(exc)}, "gpu"
        except UserError as exc:
            update = {"status": "failed", "error": str(exc)}
        except Exception as exc:
            log.exception("batch %s row %d failed", self.batch_id, index + 1)
            update = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:500]}
        with self._lock:
            row.update(update)
        self._write_manifest()
        return outcome

    def _write_manifest(self) -> None:
        snapshot = self.snapshot()
        manifest = {key: snapshot[key] for key in ("id", "state", "message", "base_seed", "total", "rows")}
        manifest["contact_sheet"] = self.contact_sheet
        write_text_atomic(self.folder / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False))

    def _write_contact_sheet(self) -> None:
        try:
            write_contact_sheet(self.snapshot()["rows"], self.folder)
        except Exception:
            log.exception("batch %s: the contact sheet could not be drawn", self.batch_id)
            return
        with self._lock:
            self.contact_sheet = CONTACT_SHEET


def _shorten(text: str, length: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= length else text[: length - 1] + "…"


def _label_font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1: the bitmap font, one size
        return ImageFont.load_default()


def write_contact_sheet(rows: list[dict], folder: Path, *, thumb: int = 128) -> Path:
    """A grid of the batch's thumbnails, each labelled with its row number and a shortened prompt
    (a grey tile for a row without an image)."""
    from PIL import Image, ImageDraw

    columns = max(1, min(10, math.ceil(math.sqrt(len(rows)))))
    lines = max(1, math.ceil(len(rows) / columns))
    pad, label = 8, 20
    sheet = Image.new("RGB", (pad + columns * (thumb + pad), pad + lines * (thumb + label + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    font = _label_font(12)
    for k, row in enumerate(rows):
        x = pad + (k % columns) * (thumb + pad)
        y = pad + (k // columns) * (thumb + label + pad)
        if row.get("file"):
            with Image.open(Path(folder) / row["file"]) as image:
                tile = image.convert("RGB")
            tile.thumbnail((thumb, thumb))
            sheet.paste(tile, (x + (thumb - tile.width) // 2, y + (thumb - tile.height) // 2))
        else:
            draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), fill=(200, 200, 200))
            draw.text((x + 6, y + thumb // 2 - 6), row.get("status", ""), fill=(90, 0, 0), font=font)
        text = f"#{row['row']} {_shorten(row['settings']['prompt'], 18)}"
        try:
            draw.text((x, y + thumb + 3), text, fill=(0, 0, 0), font=font)
        except UnicodeEncodeError:  # the bitmap font knows Latin-1 only
            draw.text((x, y + thumb + 3), text.encode("ascii", "replace").decode(), fill=(0, 0, 0), font=font)
    path = Path(folder) / CONTACT_SHEET
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


BATCH_ID = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9a-f]{6}", re.ASCII)


def new_batch_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def base_seed_of(value) -> int:
    """The API's optional base seed: a whole number from 0 (None or -1: a random one, recorded)."""
    seed = whole_number("base seed", value, default=-1)
    if seed == -1:
        return random.randrange(2**31)
    if not 0 <= seed <= MAX_SEED - 500:
        raise UserError(f"base seed must be a whole number between 0 and {MAX_SEED - 500} (got {seed!r}).")
    return seed


class BatchRunner:
    """The app's batches: one runs at a time (the GPU is one), the last few are kept for ``status``."""

    def __init__(self, *, manager, outputs_dir: Path, defaults) -> None:
        self.manager = manager
        self.outputs_dir = Path(outputs_dir)
        self.defaults = defaults  # a callable giving the BatchDefaults of the moment
        self._jobs: dict[str, BatchJob] = {}
        self._lock = threading.Lock()

    def start(self, text: str, *, base_seed=None, batch_id: str | None = None) -> dict:
        """Check the whole batch, then run it in the background; returns its id, folder and row count.
        ``batch_id``: the id given when it was queued (a new one when it already ran, e.g. a retried job)."""
        seed = base_seed_of(base_seed)
        defaults: BatchDefaults = self.defaults()
        requests = parse_batch(text, defaults=defaults, base_seed=seed)
        with self._lock:
            running = next((job for job in self._jobs.values() if job.running), None)
            if running:
                raise UserError(f"Batch {running.batch_id} is still running: stop it or wait for it to finish.")
            fresh = isinstance(batch_id, str) and BATCH_ID.fullmatch(batch_id) and batch_id not in self._jobs
            if not fresh or (self.outputs_dir / f"batch-{batch_id}").exists():
                batch_id = new_batch_id()
            folder = self.outputs_dir / f"batch-{batch_id}"
            folder.mkdir(parents=True)
            job = BatchJob(batch_id=batch_id, folder=folder, requests=requests, manager=self.manager, base_seed=seed)
            self._jobs[batch_id] = job
            for old in list(self._jobs)[:-KEPT_JOBS]:
                del self._jobs[old]
        job.start()
        return {"id": batch_id, "folder": str(folder), "total": len(requests), "base_seed": seed}

    def job(self, batch_id: str = "") -> BatchJob | None:
        if not isinstance(batch_id, str):
            raise UserError(f"batch_id must be text (got {batch_id!r}).")
        with self._lock:
            if not batch_id:
                return next(reversed(self._jobs.values()), None)
            return self._jobs.get(batch_id)

    def status(self, batch_id: str = "") -> dict:
        job = self.job(batch_id)
        if job is None:
            if batch_id:
                raise UserError(f"No batch {batch_id!r}: it never ran here or is older than the last {KEPT_JOBS}.")
            return {"id": None, "state": "idle", "done": 0, "total": 0, "failed": 0, "rows": [], "images": []}
        return job.snapshot()

    def stop(self, batch_id: str = "") -> dict:
        job = self.job(batch_id)
        if job is not None:
            job.stop()
        return self.status(batch_id)
