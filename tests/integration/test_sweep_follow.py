"""The Sweeps section's trials table follows a running sweep through the status column's poll: read from the
study's SQLite storage only when the sweep reported something new and at most every few seconds, in the
background (a slow database never holds the poll up), with each trial's state and objective (a running
trial's last report)."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

from modules.lora_training.sweep import Place, find_study
from modules.lora_training.sweep_follow import TrialsFollower
from modules.lora_training.sweep_section import SweepSection
from modules.lora_training.sweep_study import claim_trial, create_study, default_storage, open_storage
from tests.conftest import ROOT

SPACE = {"parameters": {"learning_rate": {"low": 1e-5, "high": 1e-3, "log": True}}, "trial_steps": 4, "reports": 2}
INTERVAL = 0.5


def _section(tmp_path):
    """A Sweeps section on a 2-trial study "s1" of project "tiny" (no training: the test plays the worker)."""
    config = SimpleNamespace(LORA_PROJECTS_DIR=tmp_path / "projects", MODELS_DIR=tmp_path / "models", IMAGE_ROOTS=None)
    place = Place(config.LORA_PROJECTS_DIR, config.MODELS_DIR, "tiny")
    storage = open_storage(default_storage(place.paths))
    with create_study(storage, name="s1", project="tiny", space_text=json.dumps(SPACE), trials=2, settings={}):
        pass
    strings = json.loads((ROOT / "modules" / "lora_training" / "module.json").read_text())["language"]["en"]
    section = SweepSection(SimpleNamespace(config=config), strings=strings)
    section.page = SimpleNamespace(summary="summary", table="table")  # the widgets, as the poll's update keys
    section.reads, section.gate = [], threading.Event()
    section.gate.set()

    def counted_read(project: str, study: str) -> dict:
        section.reads.append(time.monotonic())
        section.gate.wait(10)  # a slow database while the test holds the gate
        return section.read_trials(project, study)

    section.follower = TrialsFollower(counted_read, min_interval=INTERVAL)
    return section, place


def _snapshot(revision: int, state: str = "training") -> dict:
    return {"kind": "sweep", "project": "tiny", "study": "s1", "job_id": 1, "state": state, "revision": revision}


def _poll_until_shown(section, seen: dict, revision: int, *, timeout: float = 10) -> tuple[dict, dict]:
    """Poll as the page does (but faster) until the table is updated; each poll must answer at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        asked = time.monotonic()
        updates, kept = section.follow(_snapshot(revision), seen)
        assert time.monotonic() - asked < 0.05, "the poll waited on the database"
        seen = {**seen, **kept}
        if updates:
            return updates, seen
        time.sleep(0.05)
    raise AssertionError("the table was never updated")


def _rows(updates: dict) -> list[list]:
    return updates["table"].values.tolist()


def test_the_trials_table_follows_a_running_sweep_cheaply(tmp_path):
    section, place = _section(tmp_path)
    updates, seen = _poll_until_shown(section, {}, 0)
    assert [row[:3] for row in _rows(updates)] == [[0, "waiting", None], [1, "waiting", None]]
    assert updates["summary"].startswith("Study s1: 2 trials (2 waiting)")

    quiet_until = time.monotonic() + 3 * INTERVAL
    while time.monotonic() < quiet_until:  # nothing new: the storage is not opened again, the page not updated
        updates, kept = section.follow(_snapshot(0), seen)
        assert updates == {} and kept == seen
        time.sleep(0.05)
    assert len(section.reads) == 1

    with find_study(place, "s1") as study:  # a worker starts trial 0 and reports its first figure
        trial = claim_trial(study)
        trial.report(0.25, 2)
        updates, seen = _poll_until_shown(section, seen, 1)
        assert _rows(updates)[0][1:3] == ["running @2", 0.25], "a running trial shows its last report"

        section.gate.clear()  # the database is slow now
        study.optuna_study.tell(trial, 0.2)
        for revision in range(2, 2 + int(4 * INTERVAL / 0.05)):  # many new events while the read waits
            updates, kept = section.follow(_snapshot(revision), seen)
            assert updates == {}
            time.sleep(0.05)
        section.gate.set()
        updates, seen = _poll_until_shown(section, seen, revision + 1)
        assert _rows(updates)[0][1:3] == ["complete", 0.2]
        assert updates["summary"].startswith("Study s1: 2 trials (1 complete, 1 waiting)")
    gaps = [later - earlier for earlier, later in zip(section.reads, section.reads[1:], strict=False)]
    assert len(section.reads) <= 4 and min(gaps) >= INTERVAL, f"one read at a time, at most every {INTERVAL} s"


def test_a_page_opened_later_gets_the_table_and_other_jobs_leave_it_alone(tmp_path):
    section, _ = _section(tmp_path)
    _poll_until_shown(section, {}, 0)
    updates, seen = section.follow(_snapshot(0), {})  # a new page: the copy read, without a new read
    assert _rows(updates)[0][:2] == [0, "waiting"] and len(section.reads) == 1
    assert section.follow({"kind": "train", "project": "tiny", "state": "training"}, seen) == ({}, seen)
