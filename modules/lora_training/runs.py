"""Training runs of a project: ``<project>/runs/<run id>/`` holds one run's checkpoints, samples,
metrics and config. A run with a checkpoint and no ``finished.json`` can be resumed."""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from core.errors import UserError
from modules.lora_training.checkpoints import latest_checkpoint, list_checkpoints
from modules.lora_training.project import ProjectPaths, write_json

# Sorts before every real id: a project's pre-runs files are its oldest run.
LEGACY_RUN_ID = "00000000-000000-legacy"
_LEGACY_ITEMS = ("checkpoints", "samples", "logs", "training_config.json")
_STAMP = "%Y%m%d-%H%M%S"
# ASCII digits and hex only (\d matches any Unicode digit; "$" lets a trailing newline through)
_RUN_ID = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9a-f]{4,8}", re.ASCII)
_FUTURE_MARGIN = timedelta(days=1)  # clocks differ a little between machines; a run id later than this is not ours


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def run_id(self) -> str:
        return self.root.name

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def evaluation(self) -> Path:
        """Validation figures per checkpoint and the best one (:mod:`.validation`)."""
        return self.root / "evaluation.json"

    def grid(self, rows: str) -> Path:
        """The comparison grid PNG whose rows are ``rows`` ("checkpoints" or "weights")."""
        return self.root / f"comparison-{rows}.png"

    @property
    def training_config(self) -> Path:
        return self.root / "training_config.json"

    @property
    def finished_marker(self) -> Path:
        return self.root / "finished.json"

    @property
    def finished(self) -> bool:
        return self.finished_marker.is_file()

    @property
    def resumable(self) -> bool:
        return not self.finished and latest_checkpoint(self.checkpoints) is not None

    def last_step(self) -> int:
        found = list_checkpoints(self.checkpoints)
        return int(found[-1].name.split("-")[-1]) if found else 0


def new_run_id(*, after: str = "") -> str:
    """A sortable id, UTC time + 4 random hex, that sorts after ``after`` (the newest run's id) even
    when both start in the same second: "newest" must mean the last one started."""
    stamp = time.strftime(_STAMP, time.gmtime())
    floor = 0
    if after[:15] >= stamp:
        stamp, floor = after[:15], int(after[16:], 16) + 1
    if floor > 0xFFFF:
        later = datetime.strptime(stamp, _STAMP) + timedelta(seconds=1)
        stamp, floor = later.strftime(_STAMP), 0
    return f"{stamp}-{floor + secrets.randbelow(0x10000 - floor):04x}"


def runs_dir(paths: ProjectPaths) -> Path:
    return paths.root / "runs"


def new_run(paths: ProjectPaths) -> RunPaths:
    newest = latest_run(paths)
    return RunPaths(runs_dir(paths) / new_run_id(after=newest.run_id if newest else ""))


def migrate_legacy(paths: ProjectPaths) -> str | None:
    """Move a project's pre-runs files into ``runs/<legacy id>/`` (one rename each), keeping a stopped run resumable."""
    present = [name for name in _LEGACY_ITEMS if (paths.root / name).exists()]
    if not present:
        return None
    target = runs_dir(paths) / LEGACY_RUN_ID
    target.mkdir(parents=True, exist_ok=True)
    for name in present:
        if (target / name).exists():
            raise UserError(
                f"Project {paths.name!r} has both {paths.root / name} and {target / name}: "
                f"move one of them away, then try again."
            )
        os.replace(paths.root / name, target / name)
    return LEGACY_RUN_ID


def list_runs(paths: ProjectPaths) -> list[RunPaths]:
    """The project's runs, oldest first."""
    migrate_legacy(paths)
    folder = runs_dir(paths)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if (p.name == LEGACY_RUN_ID or _is_run_id(p.name)) and p.is_dir()]
    return [RunPaths(p) for p in sorted(found, key=lambda p: p.name)]


def _is_run_id(name: str) -> bool:
    """A run id new_run_id could have made: a real UTC time, not after tomorrow (a folder dated 2099 would
    make every new run of the project get a 2099 id, and 9999-12-31 23:59:59 has no next second)."""
    if not _RUN_ID.fullmatch(name):
        return False
    try:
        stamp = datetime.strptime(name[:15], _STAMP)
    except ValueError:
        return False
    return stamp <= datetime.now(timezone.utc).replace(tzinfo=None) + _FUTURE_MARGIN


def latest_run(paths: ProjectPaths) -> RunPaths | None:
    runs = list_runs(paths)
    return runs[-1] if runs else None


def resumable_runs(paths: ProjectPaths) -> list[RunPaths]:
    return [run for run in list_runs(paths) if run.resumable]


def run_to_resume(paths: ProjectPaths, run_id: str | None = None) -> RunPaths:
    """The named run, or the newest resumable one; a UserError when there is none to resume."""
    runs = resumable_runs(paths)
    if run_id is None:
        if not runs:
            raise UserError(f"Project {paths.name!r} has no stopped run to resume; start a new run.")
        return runs[-1]
    for run in runs:
        if run.run_id == run_id:
            return run
    known = ", ".join(r.run_id for r in runs) or "none"
    raise UserError(
        f"Project {paths.name!r} has no resumable run {run_id!r} (resumable runs: {known}); "
        "pick one of those, or leave the run out to resume the newest."
    )


def check_can_start(paths: ProjectPaths) -> None:
    """Refuse a new run while a stopped one could still be resumed."""
    runs = resumable_runs(paths)
    if runs:
        run = runs[-1]
        raise UserError(
            f"Project {paths.name} has a stopped run {run.run_id} at step {run.last_step()}: Resume it, "
            "or start a new run with --new-run (tab: tick 'Start a new run')."
        )


def mark_finished(run: RunPaths, *, step: int) -> None:
    write_json(run.finished_marker, {"step": step, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
