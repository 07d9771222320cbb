"""The trials of a running sweep, for a page that polls every second: read from the study's storage in a
background thread, only when the sweep reported something new and at most every few seconds, so the poll
never opens the database itself nor waits on a slow or locked one (it gets the last copy read).

``follow(project, study, revision)`` answers at once with ``(version, summary)``: the last summary read
(:func:`.sweep_results.summary`, without importance) and its version, which grows each time a read finds
something new. A page shows the summary when the version differs from the one it shows. No gradio here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable

log = logging.getLogger(__name__)

MIN_INTERVAL_S = 3.0  # the storage is read at most this often


class TrialsFollower:
    def __init__(self, read: Callable[[str, str], dict], *, min_interval: float = MIN_INTERVAL_S) -> None:
        self._read = read  # (project, study) -> summary; opens and closes the storage
        self.min_interval = min_interval
        self._lock = threading.Lock()
        self._read_key: tuple | None = None  # what the last good read was asked for
        self._shown_study: tuple | None = None
        self._summary: dict | None = None
        self._version = 0
        self._reading = False
        self._last_read = -float("inf")

    def follow(self, project: str, study: str, revision: Hashable) -> tuple[int, dict | None]:
        """The last summary of ``study`` read (None before the first) and its version; starts a read in the
        background when ``revision`` (what the sweep reported so far) is newer than the last read, no read
        runs and the last one is ``min_interval`` old."""
        key = (project, study, revision)
        with self._lock:
            due = time.monotonic() - self._last_read >= self.min_interval
            if key != self._read_key and not self._reading and due:
                self._reading = True
                threading.Thread(target=self._refresh, args=(key,), name="sweep-trials", daemon=True).start()
            if self._shown_study != (project, study):
                return self._version, None
            return self._version, self._summary

    def _refresh(self, key: tuple) -> None:
        project, study, _ = key
        try:
            found = self._read(project, study)
        except Exception as exc:  # noqa: BLE001 - a locked or unreachable database: the next poll tries again
            log.info("the trials of sweep %s could not be read yet: %s", study, exc)
            found = None
        with self._lock:
            self._reading, self._last_read = False, time.monotonic()
            if found is None:
                return
            self._read_key = key
            if found != self._summary or self._shown_study != (project, study):
                self._summary, self._shown_study = found, (project, study)
                self._version += 1
