"""The persistent job queue: one SQLite table of jobs, shared by every thread and process that opens it.

A job is a row: its kind (a name a plugin registered, e.g. "train"), project, payload (the JSON of its typed
configs), state, place in line, progress, ETA, result, error, attempts, timestamps and ``run_id``: the run the
job writes to, recorded by its plugin when the run starts, so a retried or interrupted job continues that
run and no other. States:

    queued ──claim──► running ──► finished | failed | cancelled
      ▲                  │ (the process died: found by the next start)
      └──retry──── interrupted, failed, cancelled

The database runs in WAL mode and every change is one ``BEGIN IMMEDIATE`` transaction, so two API clients,
two threads or two processes adding or moving jobs at once each see a consistent line: positions of queued
jobs are 1..N, without gaps or duplicates. Nothing here knows what a job does (see :mod:`core.job_runner`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError

STATES = ("queued", "running", "interrupted", "finished", "failed", "cancelled")
ENDED = ("finished", "failed", "cancelled")
RETRYABLE = ("failed", "cancelled", "interrupted")
MAX_JOB_ID = 2**53  # ids past this are not ids any JSON client can send exactly
LISTED = 200  # a list holds every queued and running job, then the newest others up to this many rows
MAX_WAITING = 1000  # queued jobs at most, unless the store is told otherwise (config: QUEUE_MAX_WAITING)
MAX_PAYLOAD_CHARS = 8_000_000  # a job's JSON (a batch file of 1 MB, escaped, fits)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    project TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    position INTEGER,
    progress REAL NOT NULL DEFAULT 0,
    eta_seconds REAL,
    message TEXT NOT NULL DEFAULT '',
    result TEXT,
    error TEXT,
    resume INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    created REAL NOT NULL,
    started REAL,
    ended REAL,
    run_id TEXT
)
"""
_ADDED_COLUMNS = {"run_id": "TEXT"}  # columns newer than some queue files: added when such a file is opened


_LISTED_COLUMNS = (  # every column, the payload left out
    "id, kind, project, '{}' AS payload, state, position, progress, eta_seconds, message, result, error, resume, "
    "cancel_requested, attempts, owner, created, started, ended, run_id"
)
KEPT_ENDED = 1000  # ended jobs kept in the file (the newest); older ones are dropped at start


@dataclass(frozen=True)
class QueuedJob:
    id: int
    kind: str
    project: str
    payload: dict
    state: str
    position: int | None
    progress: float
    eta_seconds: float | None
    message: str
    result: str | None
    error: str | None
    resume: bool  # run it from its checkpoint (a retried or interrupted job)
    cancel_requested: bool
    attempts: int
    owner: str | None
    created: float
    started: float | None
    ended: float | None
    run_id: str | None = None  # the run the job writes to, once it started one

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def this_process() -> str:
    """The owner name of jobs run here: host, process id and the process's start time (so a process that
    later gets the same id is not mistaken for this one)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), "" where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 else ""


def _owner_gone(owner: str | None) -> bool:
    """Whether the process that ran a job is gone: on this host, a process id that no longer runs, now
    runs another process, or is ours (we just started); another host's jobs are left to that host."""
    host, pid, start = ((owner or "").split(":") + ["", "", ""])[:3]
    if host != socket.gethostname() or not _is_whole(pid):
        return host == ""
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return bool(start) and _start_time(int(pid)) not in ("", start)


def _is_whole(text: str) -> bool:
    """ASCII digits only, at most 16 of them ("²".isdigit() is true, and int() of 5000 digits raises)."""
    return re.fullmatch(r"[0-9]{1,16}", text) is not None


def job_id_of(value) -> int:
    """A job id from the API: a whole number from 1 (text digits are accepted)."""
    if isinstance(value, str) and _is_whole(value.strip()):
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_JOB_ID:
        raise UserError(f"job id must be a whole number from 1 to {MAX_JOB_ID}; got {value!r}"[:300])
    return value


class JobStore:
    """The queue's table in the SQLite file ``path`` (made on first use)."""

    def __init__(self, path: Path, *, max_waiting: int = MAX_WAITING) -> None:
        self.path = Path(path)
        self.max_waiting = max_waiting
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connection() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("BEGIN IMMEDIATE")  # two processes opening an old file at once: one adds the columns
            try:
                db.execute(_SCHEMA)
                present = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
                for name, kind in _ADDED_COLUMNS.items():
                    if name not in present:
                        db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        # One short-lived connection per operation: safe across threads, and a writer waits for another's
        # transaction (busy timeout) instead of failing.
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous=NORMAL")  # with WAL: a crash of the app loses nothing committed
        try:
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connection() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # ----- reading -------------------------------------------------------------------------
    def get(self, job_id: int) -> QueuedJob:
        with self._connection() as db:
            return self._get(db, job_id)

    def _get(self, db: sqlite3.Connection, job_id: int) -> QueuedJob:
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id_of(job_id),)).fetchone()
        if row is None:
            raise UserError(f"No job {job_id} in the queue; /queue_list shows the jobs and their ids.")
        return _job(row)

    def list_jobs(self, *, limit: int = LISTED) -> list[QueuedJob]:
        """Every running job, then every queued one in line (at most ``max_waiting`` of those wait), then the
        others, newest first, up to ``limit`` rows in all; without their payloads (a batch's can be a
        megabyte, and the page lists the jobs every second): ``get`` has them."""
        with self._connection() as db:
            rows = db.execute(
                f"SELECT {_LISTED_COLUMNS} FROM jobs WHERE state IN ('running', 'queued') "
                "ORDER BY CASE state WHEN 'running' THEN 0 ELSE 1 END, position, id LIMIT ?",
                (self.max_waiting + limit,),
            ).fetchall()
            rows += db.execute(
                f"SELECT {_LISTED_COLUMNS} FROM jobs WHERE state NOT IN ('running', 'queued') ORDER BY id DESC LIMIT ?",
                (max(0, limit - len(rows)),),
            ).fetchall()
        return [_job(row) for row in rows]

    # ----- the line ------------------------------------------------------------------------
    def add(
        self, kind: str, project: str, payload: dict, *, resume: bool = False, one_per_project: bool = False
    ) -> QueuedJob:
        """A new job at the end of the line; refused when ``max_waiting`` jobs wait already or, with
        ``one_per_project``, when ``project`` has a queued or running job (checked inside the write, so two
        clients adding at once cannot both get in)."""
        text = json.dumps(payload, allow_nan=False, sort_keys=True)
        if len(text) > MAX_PAYLOAD_CHARS:
            raise UserError(
                f"This job's settings are {len(text)} characters of JSON; at most {MAX_PAYLOAD_CHARS} are queued. "
                "Split the work into smaller jobs."
            )
        with self._transaction() as db:
            if one_per_project:
                _refuse_a_second_job(db, project)
            (last, waiting) = db.execute(
                "SELECT COALESCE(MAX(position), 0), COUNT(*) FROM jobs WHERE state = 'queued'"
            ).fetchone()
            self._check_room(waiting)
            cursor = db.execute(
                "INSERT INTO jobs (kind, project, payload, state, position, resume, created) "
                "VALUES (?, ?, ?, 'queued', ?, ?, ?)",
                (kind, project, text, last + 1, int(resume), time.time()),
            )
            return self._get(db, cursor.lastrowid)

    def claim_next(self, *, owner: str) -> QueuedJob | None:
        """The first queued job, now running for ``owner`` (None when the line is empty)."""
        with self._connection() as db:  # an idle runner asks often: a read, no write lock
            if db.execute("SELECT 1 FROM jobs WHERE state = 'queued' LIMIT 1").fetchone() is None:
                return None
        with self._transaction() as db:
            row = _next_readable(db)
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'running', position = NULL, owner = ?, started = ?, ended = NULL, "
                "attempts = attempts + 1, progress = 0, eta_seconds = NULL, error = NULL, message = '' WHERE id = ?",
                (owner, time.time(), row["id"]),
            )
            _renumber(db)
            return self._get(db, row["id"])

    def move(self, job_id: int, to: int | str) -> QueuedJob:
        """Put a queued job at place ``to`` (1 is next), or one place "up" or "down"."""
        with self._transaction() as db:
            job = self._get(db, job_id)
            if job.state != "queued":
                raise UserError(f"Job {job.id} is {job.state}; only a queued job can be moved.")
            line = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY position")]
            line.remove(job.id)
            line.insert(_new_place(to, current=job.position, length=len(line) + 1) - 1, job.id)
            for place, other in enumerate(line, start=1):
                db.execute("UPDATE jobs SET position = ? WHERE id = ?", (place, other))
            return self._get(db, job.id)

    def cancel(self, job_id: int) -> QueuedJob:
        """A queued job leaves the line (cancelled); a running one gets ``cancel_requested`` (its runner stops
        it and records how it ended)."""
        with self._transaction() as db:
            job = self._get(db, job_id)
            if job.state == "queued":
                db.execute(
                    "UPDATE jobs SET state = 'cancelled', position = NULL, ended = ?, message = ? WHERE id = ?",
                    (time.time(), "Cancelled before it started.", job.id),
                )
                _renumber(db)
            elif job.state == "running" and job.owner != this_process() and _owner_gone(job.owner):
                # Its process died (and no app has started since to mark it): close it, so it can be retried.
                db.execute(
                    "UPDATE jobs SET state = 'interrupted', ended = ?, eta_seconds = NULL, message = ? WHERE id = ?",
                    (time.time(), "The app stopped while this job ran.", job.id),
                )
            elif job.state == "running":
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job.id,))
            else:
                raise UserError(f"Job {job.id} is {job.state}; only a queued or running job can be cancelled.")
            return self._get(db, job.id)

    def retry(self, job_id: int, *, resume: bool = True, one_per_project: bool = False) -> QueuedJob:
        """A failed, cancelled or interrupted job back at the end of the line (from its checkpoint when it
        has one and ``resume``); ``one_per_project`` as in :meth:`add`."""
        with self._transaction() as db:
            job = self._get(db, job_id)
            if job.state not in RETRYABLE:
                raise UserError(
                    f"Job {job.id} is {job.state}; only a failed, cancelled or interrupted job can be retried."
                )
            if one_per_project:
                _refuse_a_second_job(db, job.project)
            self._check_room(db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()[0])
            _requeue(db, job.id, resume=resume)
            return self._get(db, job.id)

    def _check_room(self, waiting: int) -> None:
        if waiting >= self.max_waiting:
            raise UserError(
                f"The queue already holds {waiting} waiting jobs, the most it takes (QUEUE_MAX_WAITING in "
                "config.json); wait for some to run, or cancel some."
            )

    # ----- the runner's side ---------------------------------------------------------------
    def report(self, job_id: int, *, progress: float, eta_seconds: float | None, message: str = "") -> bool:
        """Progress of a running job; returns whether someone asked to cancel it."""
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET progress = ?, eta_seconds = ?, message = ? WHERE id = ? AND state = 'running'",
                (progress, eta_seconds, message, job_id),
            )
        return self.cancel_requested(job_id)

    def set_run(self, job_id: int, run_id: str) -> None:
        """Record the run a job writes to (its plugin calls this when the run starts)."""
        with self._transaction() as db:
            db.execute("UPDATE jobs SET run_id = ? WHERE id = ?", (run_id, job_id))

    def cancel_requested(self, job_id: int) -> bool:
        with self._connection() as db:
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row["cancel_requested"])

    def finish(
        self, job_id: int, *, state: str, result: str | None = None, error: str | None = None, message: str = ""
    ) -> QueuedJob:
        if state not in ENDED:
            raise ValueError(f"a job ends as one of {ENDED}, not {state!r}")
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = ?, result = ?, error = ?, message = ?, ended = ?, cancel_requested = 0, "
                "progress = CASE WHEN ? = 'finished' THEN 1 ELSE progress END, eta_seconds = NULL WHERE id = ?",
                (state, result, error, message, time.time(), state, job_id),
            )
            return self._get(db, job_id)

    def recover(self, *, requeue: bool) -> list[QueuedJob]:
        """At start: jobs left running by a process that is gone become interrupted (and, with ``requeue``,
        go back to the end of the line to resume from their checkpoints). Returns them."""
        with self._transaction() as db:
            rows = db.execute("SELECT id, owner FROM jobs WHERE state = 'running' ORDER BY started").fetchall()
            found = [row["id"] for row in rows if _owner_gone(row["owner"])]
            for job_id in found:
                db.execute(
                    "UPDATE jobs SET state = 'interrupted', ended = ?, cancel_requested = 0, eta_seconds = NULL, "
                    "message = ? WHERE id = ?",
                    (time.time(), "The app stopped while this job ran.", job_id),
                )
                if requeue:
                    _requeue(db, job_id, resume=True)
            db.execute(
                "DELETE FROM jobs WHERE state IN ('finished', 'failed', 'cancelled') AND id NOT IN "
                "(SELECT id FROM jobs WHERE state IN ('finished', 'failed', 'cancelled') ORDER BY id DESC LIMIT ?)",
                (KEPT_ENDED,),
            )
            return [self._get(db, job_id) for job_id in found]


UNREADABLE = "This job's settings in the queue file are unreadable (the file was edited or damaged); add the job again."


def _payload(text) -> dict | None:
    """A row's payload; None when it is not a JSON object (a queue file edited or damaged)."""
    try:
        payload = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return None
    return payload if isinstance(payload, dict) else None


def _next_readable(db: sqlite3.Connection) -> sqlite3.Row | None:
    """The first queued row whose payload reads; each unreadable one before it ends failed, so one damaged
    row never stalls the line."""
    while True:
        row = db.execute("SELECT id, payload FROM jobs WHERE state = 'queued' ORDER BY position LIMIT 1").fetchone()
        if row is None or _payload(row["payload"]) is not None:
            return row
        db.execute(
            "UPDATE jobs SET state = 'failed', position = NULL, ended = ?, error = ?, message = ? WHERE id = ?",
            (time.time(), UNREADABLE, "Unreadable settings.", row["id"]),
        )
        _renumber(db)


def _job(row: sqlite3.Row) -> QueuedJob:
    values = dict(row)
    values["payload"] = _payload(values["payload"]) or {}  # unreadable: still listed, cancelled, retried
    values["resume"] = bool(values["resume"])
    values["cancel_requested"] = bool(values["cancel_requested"])
    return QueuedJob(**values)


def _refuse_a_second_job(db: sqlite3.Connection, project: str) -> None:
    row = db.execute(
        "SELECT id, state FROM jobs WHERE project = ? AND state IN ('queued', 'running') ORDER BY id LIMIT 1",
        (project,),
    ).fetchone()
    if row is not None:  # a second click on the same project is a mistake more often than a plan
        raise UserError(
            f"Project {project} already has a job in the queue (job {row['id']}, {row['state']}): "
            "wait for it to end, or cancel it in the Queue."
        )


def _renumber(db: sqlite3.Connection) -> None:
    line = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY position")]
    for place, job_id in enumerate(line, start=1):
        db.execute("UPDATE jobs SET position = ? WHERE id = ?", (place, job_id))


def _requeue(db: sqlite3.Connection, job_id: int, *, resume: bool) -> None:
    (last,) = db.execute("SELECT COALESCE(MAX(position), 0) FROM jobs WHERE state = 'queued'").fetchone()
    db.execute(
        "UPDATE jobs SET state = 'queued', position = ?, resume = ?, cancel_requested = 0, ended = NULL, "
        "eta_seconds = NULL WHERE id = ?",
        (last + 1, int(resume), job_id),
    )


def _new_place(to: int | str, *, current: int, length: int) -> int:
    """The 1-based place a move asks for, within the line."""
    if to in ("up", "down"):
        return min(length, max(1, current + (-1 if to == "up" else 1)))
    if isinstance(to, str) and _is_whole(to.strip()):
        to = int(to.strip())
    if isinstance(to, float) and to.is_integer():
        to = int(to)
    if not isinstance(to, int) or isinstance(to, bool) or not 1 <= to <= MAX_JOB_ID:
        raise UserError(f'position must be "up", "down" or a whole number from 1 (the next job); got {to!r}'[:300])
    return min(to, length)
