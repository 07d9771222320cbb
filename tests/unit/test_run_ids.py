"""Review 9 #24: run folders whose names only look like run ids (Unicode digits, non-hex tails, a trailing
newline, an impossible or future date) are not runs: they broke or skewed every new run of the project."""

import re

from modules.lora_training.project import ProjectPaths
from modules.lora_training.runs import LEGACY_RUN_ID, latest_run, list_runs, new_run


def _project(tmp_path, *names):
    paths = ProjectPaths.for_project(tmp_path, "p")
    for name in names:
        (paths.root / "runs" / name).mkdir(parents=True)
    return paths


def test_odd_run_folders_are_not_runs(tmp_path):
    odd = [
        "99991231-000000-zzzz",
        "99991231-235959-ffff",
        "20991231-000000-00ab",
        "20261399-000000-00ab",
        "2026\u0661231-000000-00ab",
        "20260101-000000-00ab\n",
    ]
    paths = _project(tmp_path, "20250101-000000-00ab", LEGACY_RUN_ID, *odd)
    assert [run.run_id for run in list_runs(paths)] == [LEGACY_RUN_ID, "20250101-000000-00ab"]


def test_a_new_run_starts_now_whatever_odd_folders_are_there(tmp_path):
    paths = _project(tmp_path, "99991231-235959-ffff", "99991231-000000-zzzz", "20991231-000000-00ab")
    run = new_run(paths)
    assert re.fullmatch(r"20[0-9]{6}-[0-9]{6}-[0-9a-f]{4}", run.run_id) and run.run_id < "2099"
    run.root.mkdir()
    assert latest_run(paths).run_id == run.run_id
