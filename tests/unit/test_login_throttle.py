"""Failed logins are limited per client address."""

import asyncio

from core.login_throttle import LoginThrottle


def _app_answering(status: int):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return app


def _post(throttle, client: str, path: str = "/login") -> int:
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": "POST", "path": path, "client": (client, 1234)}
    asyncio.run(throttle(scope, receive, send))
    return sent[0]["status"]


def test_wrong_passwords_from_one_client_are_refused_for_a_while():
    now = [1000.0]
    throttle = LoginThrottle(_app_answering(400), max_failures=5, window_seconds=60, clock=lambda: now[0])
    assert [_post(throttle, "10.0.0.1") for _ in range(5)] == [400] * 5
    assert _post(throttle, "10.0.0.1") == 429, "the sixth try within the window is refused"
    assert _post(throttle, "10.0.0.2") == 400, "another client is not affected"
    assert _post(throttle, "10.0.0.1", path="/config") == 400, "only /login is limited"
    now[0] += 61
    assert _post(throttle, "10.0.0.1") == 400, "the window passed"


def test_successful_logins_do_not_count():
    throttle = LoginThrottle(_app_answering(200), max_failures=2, window_seconds=60)
    assert [_post(throttle, "10.0.0.1") for _ in range(5)] == [200] * 5


def test_parallel_wrong_logins_are_counted_when_they_start():
    checked = []

    async def slow_login(scope, receive, send):
        checked.append(1)
        await asyncio.sleep(0.05)
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    throttle = LoginThrottle(slow_login, max_failures=5, window_seconds=60)

    async def attempt():
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "method": "POST", "path": "/login", "client": ("10.0.0.9", 1)}
        await throttle(scope, receive, send)
        return sent[0]["status"]

    async def many():
        return await asyncio.gather(*(attempt() for _ in range(50)))

    statuses = asyncio.run(many())
    assert len(checked) == 5 and statuses.count(429) == 45


def test_expired_addresses_are_forgotten():
    now = [0.0]
    throttle = LoginThrottle(_app_answering(400), max_failures=5, window_seconds=60, clock=lambda: now[0])
    for index in range(20):
        _post(throttle, f"10.1.0.{index}")
    now[0] += 61
    _post(throttle, "10.2.0.1")
    assert list(throttle.failures) == ["10.2.0.1"]
