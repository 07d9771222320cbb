"""Failed logins are limited per client: after a few wrong passwords, /login answers 429 for a while.

An ASGI middleware around the Gradio app (Gradio's own auth callable never sees the client's
address). It only watches ``POST /login``: a 400 answer there is a failed login. Each attempt counts as a
failure from the moment it starts (and is taken back when it succeeds), so many attempts sent at once
cannot all reach the password check before the first answer.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable

MAX_FAILURES = 5
WINDOW_SECONDS = 60.0


class LoginThrottle:
    def __init__(
        self,
        app,
        *,
        max_failures: int = MAX_FAILURES,
        window_seconds: float = WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.max_failures = max_failures
        self.window = window_seconds
        self.clock = clock
        self.failures: dict[str, deque[float]] = {}

    def _recent(self, client: str, now: float) -> deque[float]:
        for other in [c for c, times in self.failures.items() if not times or now - times[-1] >= self.window]:
            del self.failures[other]  # addresses whose failures have all expired
        times = self.failures.setdefault(client, deque())
        while times and now - times[0] >= self.window:
            times.popleft()
        return times

    async def __call__(self, scope, receive, send):
        is_login = scope["type"] == "http" and scope.get("method") == "POST" and scope["path"].rstrip("/") == "/login"
        if not is_login:
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("unknown", 0))[0]
        now = self.clock()
        recent = self._recent(client, now)
        if len(recent) >= self.max_failures:
            wait = int(self.window - (now - recent[0])) + 1
            return await _refuse(send, wait)
        recent.append(now)  # reserved before the password is checked; taken back on success
        answered = {}

        async def watch(message):
            if message["type"] == "http.response.start":
                answered["status"] = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        if answered.get("status") != 400 and now in recent:
            recent.remove(now)


async def _refuse(send, wait: int) -> None:
    body = json.dumps({"detail": f"Too many failed logins from this address: try again in {wait} s."}).encode()
    headers = [(b"content-type", b"application/json"), (b"retry-after", str(wait).encode())]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body})
