"""The queue's runner: one thread per server that hands the next queued job to the plugin that does it.

Plugins register a :class:`JobKinds` for the kinds they run ("train", "evaluate", ...). The runner starts a
job only when no job holds the device: none of its own, and no registered owner reports ``busy()`` (a job
started outside the queue). So the whole server runs one device job at a time, whatever the number of
pages and API clients. ``submit`` checks a job (a bad one is refused before it is queued), queues it and,
when nothing runs, starts it at once in the caller's thread, so a click starts work without waiting for
a tick.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from core.errors import UserError
from core.job_queue import JobStore, QueuedJob, job_id_of, this_process

log = logging.getLogger(__name__)

MAX_SETTINGS_CHARS = 65536
MAX_PROJECT_CHARS = 200  # project names are 64 at most (names.MAX_NAME_LENGTH); other kinds may use more


@dataclass(frozen=True)
class JobStatus:
    """How a started job stands: ``state`` is running, finished, failed or cancelled."""

    state: str
    progress: float = 0.0  # 0..1
    eta_seconds: float | None = None
    message: str = ""
    result: str | None = None  # e.g. the LoRA file a training wrote
    error: str | None = None


class JobKinds(Protocol):
    """What a plugin registers: the kinds it runs and how."""

    kinds: tuple[str, ...]

    def payload(self, kind: str, project: str, settings: dict) -> dict:
        """The job's payload (the JSON of its typed configs) from the API's settings; UserError when bad."""

    def check(self, kind: str, project: str, payload: dict) -> None:
        """Raises UserError for a job that could not start (checked before it is queued)."""

    def start(self, job: QueuedJob) -> dict:
        """Begin the job (return at once, the work goes on in the plugin's thread); what to show of it."""

    def poll(self, job: QueuedJob) -> JobStatus: ...

    def stop(self, job: QueuedJob) -> None: ...

    def busy(self) -> bool:
        """Whether the plugin holds the device outside the queue (then no queued job starts)."""


def settings_of(settings) -> dict:
    """The API's settings: a JSON object (as text or already parsed); NaN and infinities are refused."""
    if isinstance(settings, str):
        if len(settings) > MAX_SETTINGS_CHARS:
            raise UserError(f"settings must be at most {MAX_SETTINGS_CHARS} characters of JSON; got {len(settings)}")
        try:
            settings = json.loads(settings or "{}", parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested past Python's stack
            raise UserError(f'settings must be a JSON object such as {{"steps": 500}}: {exc}'[:300]) from exc
    if not isinstance(settings, dict):
        raise UserError(f'settings must be a JSON object such as {{"steps": 500}}; got {settings!r}'[:300])
    _check_finite(settings)
    size = len(json.dumps(settings))  # an object sent as JSON, not as text, is held to the same size
    if size > MAX_SETTINGS_CHARS:
        raise UserError(f"settings must be at most {MAX_SETTINGS_CHARS} characters of JSON; got {size}")
    return settings


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _check_finite(value, where: str = "settings") -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where} must be a finite number; got {value!r}")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for item in value:
            _check_finite(item, where)


def project_of(project) -> str:
    """A job's project from the API, stripped: short text without control characters (it is stored, listed
    on every page each second and printed by the CLI); each kind checks more of it."""
    if not isinstance(project, str):
        raise UserError(f"project must be text; got {project!r}"[:300])
    project = project.strip()
    if len(project) > MAX_PROJECT_CHARS:
        raise UserError(f"project is {len(project)} characters long; a project name has at most {MAX_PROJECT_CHARS}.")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in project):
        raise UserError("project contains control characters (a line break?): give the project's name.")
    return project


class JobRunner:
    def __init__(self, store: JobStore, *, tick_s: float = 0.5) -> None:
        self.store = store
        self.tick_s = tick_s
        self.owner = this_process()
        self._handlers: dict[str, JobKinds] = {}
        self._lock = threading.RLock()
        self._current: QueuedJob | None = None
        self._reported: tuple | None = None  # the running job's last progress written to the store
        self._lent: str | None = None  # what holds the device outside the queue (see ``device_lent``)
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    # ----- set-up --------------------------------------------------------------------------
    def register(self, handler: JobKinds) -> None:
        for kind in handler.kinds:
            if kind in self._handlers:
                raise ValueError(f"job kind {kind!r} is registered twice")
            self._handlers[kind] = handler

    def kinds(self) -> tuple[str, ...]:
        return tuple(self._handlers)

    def start(self, *, resume_interrupted: bool = False) -> list[QueuedJob]:
        """Recover what a killed process left running, then run the queue in a thread; returns the jobs
        found interrupted."""
        interrupted = self.store.recover(requeue=resume_interrupted)
        then = "queued again to resume from its checkpoint" if resume_interrupted else "Retry runs it again"
        for job in interrupted:
            log.warning("job %s (%s of %s) was interrupted: %s", job.id, job.kind, job.project, then)
        self._thread = threading.Thread(target=self._loop, name="job-queue", daemon=True)
        self._thread.start()
        return interrupted

    def close(self, timeout: float | None = 5) -> None:
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ----- commands --------------------------------------------------------------------------
    def submit(self, kind: str, project: str, settings, *, one_per_project: bool = False) -> dict:
        """Check and queue a job; it starts at once when nothing runs. Returns the job's row, with
        ``started`` (what its plugin shows of it) when it started."""
        project = project_of(project)
        payload = self._handler(kind).payload(kind, project, settings_of(settings))
        return self.enqueue(kind, project, payload, one_per_project=one_per_project)

    def enqueue(self, kind: str, project: str, payload: dict, *, one_per_project: bool = False) -> dict:
        """Queue a job whose payload is already typed (a tab's own configs); as :meth:`submit`. A job that
        started at once and was refused at its start raises that refusal (it stays listed, failed). With
        ``one_per_project`` it is refused while ``project`` has a queued or running job."""
        self._handler(kind).check(kind, project, payload)
        with self._lock:  # the runner's thread must not start it between the two: the caller gets its start
            if self._current is not None:
                self._follow(self._current)  # a job that just ended no longer holds its project
            job = self.store.add(kind, project, payload, one_per_project=one_per_project)
            started = self.tick(wanted=job.id)
        row = self.store.get(job.id)
        if row.state == "failed" and started is None:
            raise UserError(row.error or "The job could not start.")
        return {**row.as_dict(), "started": started}

    def cancel(self, job_id) -> QueuedJob:
        job = self.store.cancel(job_id_of(job_id))
        with self._lock:
            if job.state == "running" and self._current is not None and self._current.id == job.id:
                self._handlers[job.kind].stop(job)
        self._wake.set()
        return self.store.get(job.id)

    def retry(self, job_id, *, one_per_project: bool = False) -> QueuedJob:
        with self._lock:
            if self._current is not None:
                self._follow(self._current)
        job = self.store.retry(job_id_of(job_id), one_per_project=one_per_project)
        self.tick()
        return self.store.get(job.id)

    def move(self, job_id, to) -> QueuedJob:
        return self.store.move(job_id_of(job_id), to)

    def list_jobs(self) -> list[QueuedJob]:
        return self.store.list_jobs()

    def pending(self, project: str) -> list[QueuedJob]:
        """The queued and running jobs of ``project`` (the running job's end is recorded first when it just
        ended: the queue does not lag behind its plugin)."""
        with self._lock:
            if self._current is not None:
                self._follow(self._current)
        return [job for job in self.store.list_jobs() if job.project == project and job.state in ("queued", "running")]

    def running(self) -> QueuedJob | None:
        with self._lock:
            return self._current

    @contextlib.contextmanager
    def device_lent(self, reason: str) -> Iterator[bool]:
        """For a short piece of device work that is no job (a timing measurement): yields True with the
        device lent (no queued job starts until the block ends), or False when a job holds it (then skip
        the device work)."""
        with self._lock:
            if self._current is not None:
                self._follow(self._current)  # a job that just ended no longer holds the device
            free = self._lent is None and self._current is None and not self._plugins_busy()
            if free:
                self._lent = reason
        try:
            yield free
        finally:
            if free:
                with self._lock:
                    self._lent = None
                self._wake.set()

    def _plugins_busy(self) -> bool:
        return any(handler.busy() for handler in set(self._handlers.values()))

    # ----- the work ------------------------------------------------------------------------
    def _handler(self, kind) -> JobKinds:
        handler = self._handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            known = ", ".join(self._handlers) or "none"
            raise UserError(f"Unknown job kind {kind!r}; the kinds are: {known}."[:300])
        return handler

    def _loop(self) -> None:
        while not self._closed.is_set():
            try:
                self.tick()
            except Exception:  # the runner outlives any one bad tick (a locked file, a plugin's bug)
                log.exception("job queue: a tick failed")
            self._wake.wait(self.tick_s)
            self._wake.clear()

    def tick(self, *, wanted: int | None = None) -> dict | None:
        """Follow the running job; start the next one when the device is free. Returns what the plugin shows
        of job ``wanted`` when this tick started it."""
        with self._lock:
            if self._current is not None:
                self._follow(self._current)
            if self._current is not None or self._lent is not None or self._plugins_busy():
                return None
            job = self.store.claim_next(owner=self.owner)
            if job is None:
                return None
            shown = self._begin(job)
            return shown if job.id == wanted else None

    def _begin(self, job: QueuedJob) -> dict | None:
        handler = self._handlers.get(job.kind)
        if handler is None:
            self.store.finish(job.id, state="failed", error=f"No plugin runs jobs of kind {job.kind!r} here.")
            return None
        try:
            shown = handler.start(job)
        except UserError as exc:
            self.store.finish(job.id, state="failed", error=str(exc))
            return None
        except Exception as exc:  # a plugin's bug fails its job, not the queue
            log.exception("job %s could not start", job.id)
            self.store.finish(job.id, state="failed", error=f"Unexpected error: {type(exc).__name__}: {exc}")
            return None
        self._current, self._reported = job, None
        log.info("job %s started: %s of %s (attempt %s)", job.id, job.kind, job.project, job.attempts)
        return shown

    def _follow(self, job: QueuedJob) -> None:
        handler = self._handlers[job.kind]
        try:
            status = handler.poll(job)
        except Exception as exc:  # noqa: BLE001 - a plugin's bug fails its job, not the queue
            log.exception("job %s: its status could not be read", job.id)
            status = JobStatus("failed", error=f"Unexpected error: {type(exc).__name__}: {exc}")
        if status.state == "running":
            shown = (round(status.progress, 3), status.message)
            if shown != self._reported:  # written when it changed: the page shows it, the disk is not a log
                self._reported = shown
                cancel = self.store.report(
                    job.id, progress=status.progress, eta_seconds=status.eta_seconds, message=status.message
                )
            else:
                cancel = self.store.cancel_requested(job.id)
            if cancel:
                handler.stop(job)
            return
        self.store.finish(job.id, state=status.state, result=status.result, error=status.error, message=status.message)
        log.info("job %s %s", job.id, status.state)
        self._current = None
