"""Whether the browser or API client that sent a queued Gradio request is still there.

Gradio marks a queued event as dead (``event.alive = False``) when its client's event stream
closes or the client cancels it, but it cannot interrupt a synchronous function already running
in a worker thread. Long work (a generation) asks ``client_present()`` between steps and stops.
"""

from __future__ import annotations

from collections.abc import Callable


def always_present() -> bool:
    return True


def presence_check(request) -> Callable[[], bool]:
    """A cheap check, ``True`` while an event of this request's session is running and alive.

    Falls back to "always present" when the request is not a queued Gradio request (direct
    calls, tests, another Gradio layout): never cancel work on a guess.
    """
    session = getattr(request, "session_hash", None)
    try:
        queue = request.request.app.get_blocks()._queue
        queue.active_jobs  # noqa: B018 - probes the attribute this check depends on
    except AttributeError:
        return always_present
    mine = _running_events(queue, session) if session else []
    if not mine:
        return always_present

    def client_present() -> bool:
        # A cancelled event leaves the active jobs; a disconnected one stays, marked not alive.
        running = _running_events(queue, session)
        return any(event.alive and event in running for event in mine)

    return client_present


def _running_events(queue, session: str) -> list:
    return [event for job in list(queue.active_jobs) if job for event in job if event.session_hash == session]
