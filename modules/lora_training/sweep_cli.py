"""``python -m modules.lora_training sweep``: run (or join) a hyper-parameter sweep from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.errors import UserError


def add_sweep_parser(commands) -> None:
    sweep = commands.add_parser(
        "sweep", help="an Optuna study over training settings: short trials, pruned early, then the best settings"
    )
    sweep.add_argument("--project", required=True, help="a prepared project (5 images or more)")
    sweep.add_argument("--trials", type=int, help="the study's budget of trials (all workers together)")
    sweep.add_argument("--space", type=Path, help="the search space, a JSON file (see the README's Sweeps)")
    sweep.add_argument("--base-model", default="", help="the base model every trial trains on")
    sweep.add_argument("--storage", default="", help="an Optuna database URL (default: the project's SQLite file)")
    sweep.add_argument("--study", default="", help="the new study's name (default: sweep-<UTC time>)")
    sweep.add_argument("--join", metavar="STUDY", default="", help="add this worker to an existing study, or resume it")
    sweep.add_argument("--heartbeat", type=int, default=None, help="seconds between a worker's heartbeats")
    sweep.add_argument("--grace", type=int, default=None, help="seconds without a heartbeat before a trial is failed")
    sweep.add_argument("--results", action="store_true", help="print the study's results and run no trial")


def _space_text(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"Cannot read the search space {path}: {exc}") from exc


def _print_results(study) -> None:
    from modules.lora_training.sweep_results import summary

    found = summary(study)
    print(f"study {found['study']} on {found['project']}: budget {found['budget']}, {found['counts']}")
    for row in found["trials"]:
        value = "" if row["value"] is None else f"{row['value']:.5f}"
        pruned = f" pruned at step {row['pruned_at_step']}" if row["pruned_at_step"] is not None else ""
        print(f"  #{row['number']:<4} {row['state']:<9} {value:<9} {json.dumps(row['params'])}{pruned} {row['error']}")
    if found["importance"]:
        print("importance: " + ", ".join(f"{k} {v:.2f}" for k, v in found["importance"].items()))
    if found["best"]:
        print(f"best: trial {found['best']['number']} {json.dumps(found['best']['params'])}")


def run_sweep_command(args: argparse.Namespace, app_config, *, print_event) -> int:
    from modules.lora_training.sweep import Place, open_sweep, run_worker
    from modules.lora_training.sweep_study import GRACE_SECONDS, HEARTBEAT_SECONDS

    if not args.join and args.space is None:
        raise UserError("Give the search space of a new sweep (--space space.json), or --join STUDY.")
    for name in ("heartbeat", "grace"):
        value = getattr(args, name)
        if value is not None and not 1 <= value <= 3600:
            raise UserError(f"--{name} must be from 1 to 3600 seconds; got {value}.")
    place = Place(app_config.LORA_PROJECTS_DIR, app_config.MODELS_DIR, args.project)
    study = open_sweep(
        place,
        space_text=_space_text(args.space),
        trials=args.trials,
        base_model=args.base_model,
        study=args.join or args.study,
        storage_url=args.storage,
        join=bool(args.join),
        heartbeat=args.heartbeat or HEARTBEAT_SECONDS,
        grace=args.grace or GRACE_SECONDS,
    )
    with study:  # its database connections closed at the end
        if not args.results:
            print(f"sweep {study.name}: joining with --join {study.name} adds a worker", file=sys.stderr)
            done = run_worker(study, place=place, on_event=print_event)
            print(done.describe())
            print("trials run by this worker: " + json.dumps(done.ran))
        _print_results(study)
    return 0
