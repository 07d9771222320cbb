"""A sweep continued soon after its worker was killed (within the heartbeat's 30 s grace period, when the dead
trial still looks alive to Optuna) runs the whole budget: the dead worker's slot runs again, once."""

from __future__ import annotations

import json
import subprocess
import sys

from modules.lora_training.sweep import Place, find_study, run_worker
from modules.lora_training.sweep_results import trials_table
from modules.lora_training.sweep_study import claim_trial, create_study, default_storage, open_storage, this_worker

SPACE = {"parameters": {"learning_rate": {"low": 1e-5, "high": 1e-3, "log": True}}, "trial_steps": 2, "reports": 1}


def test_a_sweep_continued_within_the_grace_period_runs_the_killed_trial_s_slot(tmp_path):
    place = Place(tmp_path / "projects", tmp_path / "models", "tiny")  # no base model: each trial fails at once
    storage = open_storage(default_storage(place.paths))  # the default heartbeat: 10 s, grace 30 s
    with create_study(storage, name="s", project="tiny", space_text=json.dumps(SPACE), trials=3, settings={}) as study:
        finished = claim_trial(study)  # the killed worker finished trial 0 and was running trial 1
        study.optuna_study.tell(finished, 0.5)
        killed = claim_trial(study)
        params = study.space.suggest(killed)
        storage.record_heartbeat(killed._trial_id)  # a moment ago
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        killed.set_user_attr("worker_process", {**this_worker(killed.number), "pid": gone.pid})

    with find_study(place, "s") as continued:
        done = run_worker(continued, place=place)
        rows = trials_table(continued)
    assert done.ran == [2, 3], "the budget of 3 less the finished trial: 2 trials, one of them the killed one's slot"
    assert [row["state"] for row in rows[:2]] == ["complete", "fail"]
    assert rows[3]["params"] == params, "the killed trial's slot runs again with its parameters"
    assert [row["error"] for row in rows[2:]] == ["missing option(s): base_model"] * 2, "each failed at once, told why"
