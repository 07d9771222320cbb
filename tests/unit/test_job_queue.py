"""The persistent job queue (core/job_queue.py) and its runner (core/job_runner.py), with real threads and
processes: order, cancel, retry, move, restart, concurrent clients, bad input."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time

import pytest

from core.errors import UserError
from core.job_queue import JobStore
from core.job_runner import JobRunner, JobStatus


class Sleeper:
    """A plugin whose jobs sleep ``payload["seconds"]`` in a thread, in small steps, stoppable."""

    kinds = ("sleep", "fail")

    def __init__(self) -> None:
        self.ran: list[int] = []
        self.running: dict[int, threading.Thread] = {}
        self.stops: dict[int, threading.Event] = {}
        self.outcome: dict[int, str] = {}
        self.concurrent = 0
        self.most_concurrent = 0
        self._lock = threading.Lock()

    def payload(self, kind, project, settings):
        seconds = settings.get("seconds", 0.2)
        if not isinstance(seconds, int | float) or not 0 <= seconds <= 60:
            raise UserError(f"seconds must be between 0 and 60; got {seconds!r}")
        return {"seconds": seconds}

    def check(self, kind, project, payload):
        if project == "refused":
            raise UserError("This project is refused.")

    def start(self, job):
        if job.kind == "fail":
            raise UserError("It cannot start.")
        stop = self.stops[job.id] = threading.Event()
        thread = threading.Thread(target=self._work, args=(job, stop), daemon=True)
        self.running[job.id] = thread
        thread.start()
        return {"job_id": job.id, "attempt": job.attempts, "resume": job.resume}

    def _work(self, job, stop):
        with self._lock:
            self.concurrent += 1
            self.most_concurrent = max(self.most_concurrent, self.concurrent)
            self.ran.append(job.id)
        deadline = time.monotonic() + job.payload["seconds"]
        while time.monotonic() < deadline and not stop.is_set():
            time.sleep(0.01)
        with self._lock:
            self.concurrent -= 1
        self.outcome[job.id] = "cancelled" if stop.is_set() else "finished"

    def poll(self, job):
        if self.running[job.id].is_alive():
            return JobStatus("running", progress=0.5, eta_seconds=1.0)
        return JobStatus(self.outcome[job.id], result=f"result-{job.id}")

    def stop(self, job):
        self.stops[job.id].set()

    def busy(self):
        return False


@pytest.fixture
def runner(tmp_path):
    runner = JobRunner(JobStore(tmp_path / "queue.sqlite"), tick_s=0.02)
    runner.plugin = Sleeper()
    runner.register(runner.plugin)
    runner.start()
    yield runner
    runner.close()


def wait_until(predicate, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def states(runner) -> dict[int, str]:
    return {job.id: job.state for job in runner.list_jobs()}


def test_jobs_run_one_at_a_time_in_their_order(runner):
    first = runner.submit("sleep", "a", '{"seconds": 0.3}')
    assert first["state"] == "running" and first["started"] == {"job_id": 1, "attempt": 1, "resume": False}
    rest = [runner.submit("sleep", name, {"seconds": 0.05}) for name in "bcd"]
    assert [(r["state"], r["position"], r["started"]) for r in rest] == [
        ("queued", 1, None),
        ("queued", 2, None),
        ("queued", 3, None),
    ]
    runner.move(rest[2]["id"], 1)  # d before b and c
    runner.move(rest[0]["id"], "down")  # then c, b
    assert [j.id for j in runner.list_jobs() if j.state == "queued"] == [4, 3, 2]
    wait_until(lambda: set(states(runner).values()) == {"finished"})
    assert runner.plugin.ran == [1, 4, 3, 2]
    assert runner.plugin.most_concurrent == 1
    done = runner.store.get(4)
    assert (done.result, done.progress, done.attempts, done.position) == ("result-4", 1.0, 1, None)
    assert done.started >= done.created and done.ended >= done.started


def test_cancel_a_queued_and_a_running_job_then_retry(runner):
    running = runner.submit("sleep", "a", {"seconds": 30})
    queued = runner.submit("sleep", "b", {"seconds": 30})
    last = runner.submit("sleep", "c", {"seconds": 0.05})
    assert runner.cancel(queued["id"]).state == "cancelled"
    assert runner.store.get(last["id"]).position == 1, "the line closes up"
    started = time.monotonic()
    runner.cancel(running["id"])
    wait_until(lambda: runner.store.get(running["id"]).state == "cancelled")
    assert time.monotonic() - started < 1.5, "a running job stops within a second"
    wait_until(lambda: runner.store.get(last["id"]).state == "finished")
    assert runner.plugin.ran == [running["id"], last["id"]], "the cancelled queued job never ran"
    with pytest.raises(UserError, match="only a queued or running job can be cancelled"):
        runner.cancel(last["id"])
    with pytest.raises(UserError, match="only a failed, cancelled or interrupted job can be retried"):
        runner.retry(last["id"])

    retried = runner.retry(running["id"])
    assert retried.state == "running" and retried.attempts == 2 and retried.resume
    runner.cancel(retried.id)
    wait_until(lambda: runner.store.get(retried.id).state == "cancelled")
    assert runner.plugin.ran.count(running["id"]) == 2


def test_a_job_refused_at_its_start_fails_with_the_reason_and_the_queue_goes_on(runner):
    with pytest.raises(UserError, match="It cannot start"):
        runner.submit("fail", "x", {})
    failed = runner.list_jobs()[0]
    assert (failed.state, failed.error) == ("failed", "It cannot start.")
    assert runner.submit("sleep", "y", {"seconds": 0})["state"] == "running"


@pytest.mark.parametrize(
    ("kind", "project", "settings", "message"),
    [
        ("nope", "p", "{}", "Unknown job kind 'nope'; the kinds are: sleep, fail"),
        ("sleep", "p", "{not json", "settings must be a JSON object"),
        ("sleep", "p", '{"seconds": NaN}', "NaN is not a number JSON allows"),
        ("sleep", "p", {"seconds": float("inf")}, r"settings.seconds must be a finite number"),
        ("sleep", "p", "[1, 2]", "settings must be a JSON object"),
        ("sleep", "p", "[" * 5000, "settings must be a JSON object"),  # nested past Python's stack
        ("sleep", "p", '{"seconds": 1e308}', "seconds must be between 0 and 60"),
        ("sleep", "p", "x" * 70000, "at most 65536 characters"),
        ("sleep", 7, "{}", "project must be text"),
        ("sleep", "refused", "{}", "This project is refused"),
    ],
)
def test_bad_jobs_are_refused_before_they_are_queued(runner, kind, project, settings, message):
    with pytest.raises(UserError, match=message):
        runner.submit(kind, project, settings)
    assert runner.list_jobs() == []


@pytest.mark.parametrize(
    ("job_id", "to", "message"),
    [
        (99, 1, "No job 99 in the queue"),
        ("abc", 1, "job id must be a whole number"),
        (2**80, 1, "job id must be a whole number"),
        (True, 1, "job id must be a whole number"),
        (2, "sideways", "position must be"),
        (2, float("nan"), "position must be"),
        (2, 0, "position must be"),
    ],
)
def test_bad_ids_and_moves_are_refused(runner, job_id, to, message):
    runner.submit("sleep", "a", {"seconds": 5})
    runner.submit("sleep", "b", {"seconds": 5})
    with pytest.raises(UserError, match=message):
        runner.move(job_id, to)
    with pytest.raises(UserError, match="only a queued job can be moved"):
        runner.move(1, 1)
    assert runner.move(2, 10**9).position == 1, "a place past the end is the end"
    runner.cancel(1)


def test_a_restart_marks_the_running_job_interrupted_and_may_queue_it_again(tmp_path):
    path = tmp_path / "queue.sqlite"
    store = JobStore(path)
    store.add("sleep", "a", {"seconds": 0.05})
    store.add("sleep", "b", {"seconds": 0.05})
    gone = store.claim_next(owner="elsewhere-host-name:1")  # another host: left alone
    dead = store.claim_next(owner=f"{__import__('socket').gethostname()}:{2**22 + 12345}")  # no such process
    assert [j.id for j in store.recover(requeue=False)] == [dead.id]
    assert store.get(dead.id).state == "interrupted" and store.get(gone.id).state == "running"

    runner = JobRunner(JobStore(path), tick_s=0.02)
    runner.register(Sleeper())
    assert runner.start(resume_interrupted=True) == [], "nothing is left running by a dead process here"
    try:
        retried = runner.retry(dead.id)
        wait_until(lambda: runner.store.get(dead.id).state == "finished")
        assert retried.resume and runner.store.get(dead.id).attempts == 2
    finally:
        runner.close()

    again = JobStore(path)
    again.add("sleep", "c", {})
    lost = again.claim_next(owner=f"{__import__('socket').gethostname()}:{2**22 + 12346}")
    (recovered,) = again.recover(requeue=True)
    assert recovered.id == lost.id and (recovered.state, recovered.resume, recovered.position) == ("queued", True, 1)


def _add_many(path: str, name: str, count: int) -> None:
    store = JobStore(path)
    for number in range(count):
        store.add("sleep", f"{name}-{number}", {"seconds": number})


def test_two_processes_adding_at_once_get_every_job_once_in_distinct_places(tmp_path):
    path = tmp_path / "queue.sqlite"
    JobStore(path)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_add_many, args=(str(path), name, 40)) for name in ("left", "right")]
    for worker in workers:
        worker.start()
    threads = [threading.Thread(target=_add_many, args=(str(path), f"thread{n}", 20)) for n in range(2)]
    for thread in threads:
        thread.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    for thread in threads:
        thread.join(60)
    jobs = JobStore(path).list_jobs()
    assert len(jobs) == 120
    assert sorted(j.project for j in jobs) == sorted(
        f"{name}-{n}"
        for name, count in (("left", 40), ("right", 40), ("thread0", 20), ("thread1", 20))
        for n in range(count)
    )
    assert sorted(j.position for j in jobs) == list(range(1, 121))
    assert json.loads(json.dumps(jobs[0].as_dict()))["state"] == "queued"
    assert jobs[0].payload == {} and JobStore(path).get(jobs[0].id).payload == {"seconds": 0}, "listed without it"


def test_a_start_keeps_the_newest_ended_jobs_only(tmp_path, monkeypatch):
    import core.job_queue

    monkeypatch.setattr(core.job_queue, "KEPT_ENDED", 3)
    store = JobStore(tmp_path / "queue.sqlite")
    for number in range(6):
        store.add("sleep", f"p{number}", {})
    for _ in range(5):
        job = store.claim_next(owner="elsewhere-host-name:1")
        store.finish(job.id, state="finished")
    store.recover(requeue=False)
    assert sorted(j.id for j in store.list_jobs()) == [3, 4, 5, 6], "the three newest ended ones and the queued one"


def test_a_job_that_just_ended_is_not_pending_even_before_the_next_tick(tmp_path):
    runner = JobRunner(JobStore(tmp_path / "queue.sqlite"), tick_s=60)  # the thread's tick will not come
    plugin = Sleeper()
    runner.register(plugin)
    runner.start()
    try:
        job = runner.submit("sleep", "a", {"seconds": 0})
        assert [j.id for j in runner.pending("a")] in ([job["id"]], [])
        plugin.running[job["id"]].join(5)
        assert runner.pending("a") == [] and runner.store.get(job["id"]).state == "finished"
    finally:
        runner.close()


def test_a_job_left_running_by_a_dead_or_reused_process_can_be_cancelled_at_once(tmp_path):
    import os
    import socket

    store = JobStore(tmp_path / "queue.sqlite")
    for name in ("a", "b", "c"):
        store.add("sleep", name, {})
    host = socket.gethostname()
    dead = store.claim_next(owner=f"{host}:{2**22 + 12347}:1")  # no such process
    reused = store.claim_next(owner=f"{host}:{os.getppid()}:1")  # a live process that started at another time
    alive = store.claim_next(owner=f"{host}:{os.getppid()}:{_start_time_of(os.getppid())}")
    assert store.cancel(dead.id).state == "interrupted", "nothing would ever stop it: closed now"
    assert store.cancel(reused.id).state == "interrupted", "its process id now names another process"
    stopping = store.cancel(alive.id)
    assert stopping.state == "running" and store.cancel_requested(alive.id), "its runner stops it"
    assert [job.id for job in store.recover(requeue=False)] == []


def _start_time_of(pid: int) -> str:
    return open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[19]


@pytest.mark.parametrize("job_id", ["²", "9" * 5000, "١٢"])
def test_ids_that_are_digits_only_to_unicode_are_refused(runner, job_id):
    with pytest.raises(UserError, match="job id must be a whole number"):
        runner.cancel(job_id)
    runner.submit("sleep", "a", {"seconds": 5})
    waiting = runner.submit("sleep", "b", {"seconds": 5})
    with pytest.raises(UserError, match="position must be"):
        runner.move(waiting["id"], job_id)
    runner.cancel(waiting["id"])
    runner.cancel(1)


def test_device_work_outside_the_queue_never_overlaps_a_job(runner):
    """A short device measurement (the Estimate button's timing) holds the queue back, or is skipped."""
    with runner.device_lent("estimate") as free:
        assert free
        waiting = runner.submit("sleep", "a", {"seconds": 0.05})
        time.sleep(0.1)  # a few ticks
        assert runner.store.get(waiting["id"]).state == "queued", "no job starts while the device is lent"
    wait_until(lambda: runner.store.get(waiting["id"]).state == "finished")
    running = runner.submit("sleep", "b", {"seconds": 30})
    with runner.device_lent("estimate") as free:
        assert not free, "a running job keeps the device"
    runner.cancel(running["id"])


def test_the_device_is_free_as_soon_as_the_job_holding_it_ended(tmp_path):
    """No tick has noticed yet that the job ended (the runner's thread is not started): the device is free."""
    runner = JobRunner(JobStore(tmp_path / "queue.sqlite"), tick_s=0.02)
    plugin = Sleeper()
    runner.register(plugin)
    job = runner.submit("sleep", "a", {"seconds": 0.05})  # started at once, in this thread
    plugin.running[job["id"]].join(10)
    with runner.device_lent("estimate") as free:
        assert free, "the ended job no longer holds the device"
    assert runner.store.get(job["id"]).state == "finished"
    runner.close()


def test_a_queue_file_from_before_run_ids_gets_the_column_and_keeps_its_jobs(tmp_path):
    import sqlite3

    from core.job_queue import _SCHEMA

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.execute(_SCHEMA.replace(",\n    run_id TEXT", ""))
        db.execute(
            "INSERT INTO jobs (kind, project, payload, state, position, created) VALUES ('sleep', 'a', '{}', 'queued', 1, 0)"
        )
    store = JobStore(path)
    assert store.get(1).run_id is None and store.get(1).state == "queued"
    store.set_run(1, "20261202-071500-ab12")
    assert [job.run_id for job in store.list_jobs()] == ["20261202-071500-ab12"]


def test_the_line_and_a_jobs_settings_are_bounded(tmp_path):
    from core.job_queue import MAX_PAYLOAD_CHARS

    runner = JobRunner(JobStore(tmp_path / "queue.sqlite", max_waiting=3), tick_s=0.02)
    runner.register(Sleeper())  # its thread not started: the first job starts in the caller's, the rest wait
    for name in "abcd":
        runner.submit("sleep", name, {"seconds": 1})
    with pytest.raises(UserError, match="already holds 3 waiting jobs, the most it takes .QUEUE_MAX_WAITING"):
        runner.submit("sleep", "e", {"seconds": 1})
    runner.cancel(2)
    runner.submit("sleep", "e", {"seconds": 1})  # the cancelled job gave its place
    with pytest.raises(UserError, match="already holds 3 waiting jobs"):
        runner.retry(2)  # a retry joins the line too
    with pytest.raises(UserError, match="settings must be at most 65536 characters of JSON; got 100"):
        runner.submit("sleep", "e", {"seconds": 1, "note": "x" * 100_000})  # an object, not text
    with pytest.raises(UserError, match=f"at most {MAX_PAYLOAD_CHARS} are queued"):
        runner.store.add("sleep", "f", {"rows": "x" * MAX_PAYLOAD_CHARS})
    assert len(runner.list_jobs()) == 5
    runner.cancel(1)


def test_one_job_per_project_holds_when_clients_add_at_once(runner):
    """The refusal is checked inside the store's write: of eight threads adding for one project, one gets in."""
    runner.submit("sleep", "other", {"seconds": 30})  # the device is busy: the rest wait in line
    barrier = threading.Barrier(8)
    added, refused = [], []

    def add():
        barrier.wait()
        try:
            added.append(runner.submit("sleep", "one", {"seconds": 0.05}, one_per_project=True))
        except UserError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=add) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(added) == 1 and len(refused) == 7, (added, refused)
    assert all(f"already has a job in the queue (job {added[0]['id']}, queued)" in text for text in refused)
    first_of_one = runner.submit("sleep", "one", {"seconds": 0.05})  # /queue_add keeps no such rule
    runner.cancel(first_of_one["id"])
    with pytest.raises(UserError, match="already has a job in the queue"):
        runner.retry(first_of_one["id"], one_per_project=True)  # Resume: the same rule, in the same write


def test_a_row_with_unreadable_settings_fails_alone_and_can_be_cancelled(tmp_path):
    """Review 9 #5: a damaged payload in the queue file fails that job ("unreadable"); the line goes on."""
    import sqlite3

    from core.job_queue import UNREADABLE

    path = tmp_path / "queue.sqlite"
    runner = JobRunner(JobStore(path), tick_s=0.02)
    runner.register(Sleeper())
    bad, kept, good = (runner.store.add("sleep", name, {"seconds": 0.01}) for name in "abc")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE jobs SET payload = 'not json' WHERE id IN (?, ?)", (bad.id, kept.id))
    assert runner.cancel(kept.id).state == "cancelled"
    assert runner.submit("sleep", "d", {"seconds": 0.01})["state"] == "queued"
    runner.start()
    try:
        wait_until(
            lambda: set(states(runner).values()) == {"failed", "cancelled", "finished"} and len(states(runner)) == 4
        )
        assert states(runner) == {bad.id: "failed", kept.id: "cancelled", good.id: "finished", 4: "finished"}
        assert runner.store.get(bad.id).error == UNREADABLE
    finally:
        runner.close()


@pytest.mark.parametrize(
    ("project", "message"),
    [("x" * 5_000_000, "5000000 characters long; a project name has at most 200"), ("a\n<b>", "control characters")],
)
def test_a_jobs_project_is_short_text_for_every_kind(runner, project, message):
    """Review 9 #8: the project is stored, listed every second and printed by the CLI: bounded for every kind;
    a batch belongs to no project."""
    from modules.generate.batch_kinds import BatchKinds

    with pytest.raises(UserError, match=message):
        runner.submit("sleep", project, {"seconds": 0.01})
    with pytest.raises(UserError, match="belongs to no project"):
        BatchKinds(runner=None).check("batch", "evil", {})
    assert runner.list_jobs() == []


def test_the_list_holds_every_waiting_job_past_the_listed_rows(tmp_path):
    """Review 9 #9: 250 queued jobs are all listed (and can be picked), ended ones fill what is left of 200."""
    from core.job_queue import LISTED

    store = JobStore(tmp_path / "queue.sqlite")
    for index in range(LISTED + 50):
        store.add("sleep", f"p{index}", {})
    assert [job.position for job in store.list_jobs()] == list(range(1, LISTED + 51))
    for job_id in range(1, 61):
        store.cancel(job_id)
    listed = store.list_jobs()
    assert [job.state for job in listed] == ["queued"] * (LISTED - 10) + ["cancelled"] * 10
    assert [job.id for job in listed[-10:]] == list(range(60, 50, -1))
