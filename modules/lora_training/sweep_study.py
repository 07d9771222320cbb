"""A sweep's Optuna study: where it is stored, how it is created or joined, and its trial budget.

The budget is a set of slots: creating a study with N trials enqueues N waiting trials (the ``enqueue`` rows of
the search space first, then empty ones the sampler fills). A worker only ever runs a waiting trial, which it
claims atomically in the database, so any number of workers, on any number of machines, run exactly N trials
between them and none twice. A trial whose worker died (its heartbeat stopped) is marked failed by the next
worker and a waiting copy with the same parameters takes its slot; so does a trial the user stopped. A worker
that died on this machine is known dead at once (its process is gone): a sweep continued within the heartbeat's
grace period runs that trial's slot again too, instead of leaving it "running" until a later worker comes.

Storage: ``sqlite:///<project>/sweeps/sweeps.db`` by default, or any database URL Optuna supports
(``postgresql://user:password@host/db``) so workers on several machines share one study. Optuna never closes
a storage's connections (its engine keeps a pool until it is garbage-collected, a PostgreSQL connection per
status call), so whoever opens one closes it: :meth:`Study.close` (a ``with`` block), :func:`close_storage`.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from modules.lora_training.project import ProjectPaths
from modules.lora_training.sweep_space import SweepSpace, check_trials, parse_space

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 30  # a running trial whose heartbeat is older than this belongs to a dead worker
MAX_RETRIES = 3  # a trial whose worker died is run again this often, then left failed
_STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_URL = re.compile(r"^[a-z][a-z0-9+]*://")


def sweeps_dir(paths: ProjectPaths) -> Path:
    return paths.root / "sweeps"


def default_storage(paths: ProjectPaths) -> str:
    return f"sqlite:///{sweeps_dir(paths) / 'sweeps.db'}"


def shown_url(url: str) -> str:
    """The storage URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def check_study_name(name: str) -> str:
    if not isinstance(name, str) or not _STUDY_NAME.match(name.strip()):
        raise UserError(
            f"Study name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit."
        )
    return name.strip()


def new_study_name() -> str:
    # The random part: two sweeps started in the same second get their own studies.
    return time.strftime("sweep-%Y%m%d-%H%M%S", time.gmtime()) + f"-{secrets.token_hex(2)}"


def open_storage(url: str, *, heartbeat: int = HEARTBEAT_SECONDS, grace: int = GRACE_SECONDS):
    """Optuna's database storage at ``url`` (tables created on first use), with heartbeats so a dead
    worker's trial is found and run again."""
    import optuna
    import sqlalchemy.exc

    if not isinstance(url, str) or not _URL.match(url):
        raise UserError(f"Storage {url!r} is not a database URL such as sqlite:///sweeps.db or postgresql://host/db.")
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeats are "experimental" in Optuna's words
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=heartbeat, grace_period=grace, heartbeat_stale_trial_callback=retry
            )
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as exc:
        raise UserError(f"Cannot open the sweep storage {shown_url(url)}: {str(exc).splitlines()[0]}") from exc


def close_storage(storage) -> None:
    """Close every database connection ``storage`` holds (it can still be used: it reconnects)."""
    if storage is None:
        return
    storage.remove_session()
    storage.engine.dispose()


def build_sampler(space: SweepSpace, *, trial_number: int = 0):
    """The sampler for one trial. A seeded sweep seeds each trial by its number, so two workers never draw the
    same random parameters and a rerun draws what the first run drew."""
    import optuna

    seed = space.sampler.get("seed")
    seed = None if seed is None else seed + trial_number
    if space.sampler["type"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, space.pruner["startup_trials"]))


def build_pruner(space: SweepSpace):
    import optuna

    pruner = space.pruner
    if pruner["type"] == "none":
        return optuna.pruners.NopPruner()
    if pruner["type"] == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=space.reports)
    return optuna.pruners.PercentilePruner(
        50.0 if pruner["type"] == "median" else float(pruner["percentile"]),
        n_startup_trials=pruner["startup_trials"],
        n_warmup_steps=pruner["warmup_steps"],
    )


@dataclass
class Study:
    """An open study with what its workers need: the checked space, the project and the training settings
    every trial and the full run share."""

    optuna_study: object
    storage: object
    space: SweepSpace
    project: str
    settings: dict
    budget: int

    @property
    def name(self) -> str:
        return self.optuna_study.study_name

    def close(self) -> None:
        """Close the storage's database connections (a worker's heartbeat must have ended)."""
        close_storage(self.storage)

    def __enter__(self) -> Study:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def rank_key(self, value: float) -> float:
        """Sorts values best first: the validation loss is minimised, the CLIP score maximised."""
        return -value if self.space.objective == "subject_similarity" else value


def _load(storage, name: str):
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        known = ", ".join(optuna.get_all_study_names(storage))
        raise UserError(f"No sweep study named {name!r} in this storage (studies: {known or 'none'}).") from None


def _opened(optuna_study, storage) -> Study:
    attrs = optuna_study.user_attrs
    budget = int(attrs.get("budget", 0))
    space = parse_space(attrs.get("space", ""), trials=budget)
    optuna_study.pruner = build_pruner(space)
    return Study(optuna_study, storage, space, attrs.get("project", ""), dict(attrs.get("settings", {})), budget)


def _add_slots(optuna_study, count: int, rows: tuple[dict, ...] = ()) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index in range(count):
            optuna_study.enqueue_trial(rows[index] if index < len(rows) else {})


def create_study(storage, *, name: str, project: str, space_text: str, trials: int, settings: dict) -> Study:
    """A new study of ``trials`` trials over the search space ``space_text`` (JSON) on ``project``."""
    import optuna

    space = parse_space(space_text, trials=trials)
    name = check_study_name(name)
    try:
        direction = "maximize" if space.objective == "subject_similarity" else "minimize"
        created = optuna.create_study(study_name=name, storage=storage, direction=direction)
    except optuna.exceptions.DuplicatedStudyError:
        raise UserError(
            f"A sweep study named {name!r} already exists: join it (--join {name}) or pick another name."
        ) from None
    created.set_user_attr("project", project)
    created.set_user_attr("space", space_text)
    created.set_user_attr("budget", trials)
    created.set_user_attr("settings", {**space.fixed, **settings})
    _add_slots(created, trials, space.enqueue)
    return _opened(created, storage)


def join_study(storage, *, name: str, project: str, trials: int | None = None, space_text: str = "") -> Study:
    """An existing study, to add a worker to it (or resume it); ``trials`` above its budget raises the budget."""
    study = _opened(_load(storage, check_study_name(name)), storage)
    if project and study.project != project:
        raise UserError(f"Study {study.name!r} sweeps project {study.project!r}, not {project!r}.")
    if space_text.strip() and _canonical(space_text) != _canonical(study.optuna_study.user_attrs["space"]):
        raise UserError(f"Study {study.name!r} has another search space: leave the space out to join it as it is.")
    if trials is not None and check_trials(trials) > study.budget:
        _add_slots(study.optuna_study, trials - study.budget)
        study.optuna_study.set_user_attr("budget", trials)
        study.budget = trials
    return study


def _canonical(text: str) -> str:
    try:
        return json.dumps(json.loads(text), sort_keys=True)
    except ValueError:
        return text


def fail_stale_trials(study: Study) -> None:
    """Mark the running trials of dead workers failed; each gets a waiting copy (:data:`MAX_RETRIES`)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study.optuna_study)


def this_worker(trial_number: int) -> dict:
    """Where trial ``trial_number`` runs: the machine, the process and its PID namespace (containers on one host
    may share a host name; only a process of the same namespace can tell whether a pid lives)."""
    import os
    import socket

    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = None
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_ns": namespace, "trial": trial_number}


def _died_here(frozen) -> bool:
    """Whether the running trial ``frozen`` belongs to a process of this machine that no longer exists."""
    import os

    where = frozen.user_attrs.get("worker_process")
    me = this_worker(frozen.number)
    if not isinstance(where, dict) or me["pid_ns"] is None or where.get("pid") == me["pid"]:
        return False
    if any(where.get(key) != me[key] for key in ("host", "pid_ns", "trial")):  # "trial": not a retry's copy
        return False
    try:
        os.kill(int(where["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, TypeError, OverflowError):
        return False  # alive (another user's process) or not a pid: the heartbeat decides
    return False


def fail_dead_local_trials(study: Study) -> list[int]:
    """Mark failed the running trials of workers that died on this machine (their heartbeat may still look
    fresh); each gets a waiting copy, as :func:`fail_stale_trials` gives a stale one. Returns their numbers."""
    import optuna
    from optuna.trial import TrialState

    failed = []
    for frozen in study.optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _died_here(frozen):
            continue
        try:
            if study.storage.set_trial_state_values(frozen._trial_id, state=TrialState.FAIL):
                failed.append(frozen)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first
    retry = study.storage.get_heartbeat_stale_trial_callback()
    for frozen in failed:
        log.warning("sweep trial %s: its worker on this machine has gone; its slot runs again", frozen.number)
        if retry is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                retry(study.optuna_study, study.storage.get_trial(frozen._trial_id))
    return [frozen.number for frozen in failed]


def claim_trial(study: Study):
    """A waiting trial, now running and this worker's; None when none is left. Only waiting trials are run:
    the budget is their number, whatever the number of workers."""
    import optuna
    from optuna.trial import TrialState

    storage = study.storage
    # Read through the study (Optuna's caching layer), not the bare storage: the cache learns the trials'
    # ids there, and a study joined in this process (not created in it) would not know them otherwise.
    for frozen in study.optuna_study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if not storage.set_trial_state_values(frozen._trial_id, state=TrialState.RUNNING):
                continue  # another worker took it first
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        study.optuna_study.sampler = build_sampler(study.space, trial_number=frozen.number)
        return optuna.Trial(study.optuna_study, frozen._trial_id)
    return None


class Heartbeat:
    """Tells the storage, every few seconds, that this worker still runs its trial."""

    def __init__(self, storage, trial_id: int, *, every: float) -> None:
        self.storage, self.trial_id, self.every = storage, trial_id, every
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"sweep-heartbeat-{trial_id}", daemon=True)

    def _beat(self) -> None:
        while not self._done.is_set():
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # noqa: BLE001 - a missed beat is retried; a dead beat would fail the live trial
                log.warning("sweep heartbeat of trial %s failed; retrying", self.trial_id, exc_info=True)
            self._done.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
