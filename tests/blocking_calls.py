"""Run a call that might block on a FIFO in a thread, so a test sees "blocked" instead of hanging."""

from __future__ import annotations

import threading

BLOCKED = "blocked"


def outcome_within(call, *, seconds: float = 5.0):
    """What ``call()`` returned or raised, or :data:`BLOCKED` when it has not ended after ``seconds``."""
    outcome = []

    def run():
        try:
            outcome.append(call())
        except Exception as exc:  # the test looks at what came out
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    return outcome[0] if outcome else BLOCKED
