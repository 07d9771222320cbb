"""``python -m modules.lora_training queue list|add|cancel|retry|move``: the app's job queue from a shell.

It works on the queue's file (``QUEUE_DB``) directly, as a second client beside the app: a job added here
is checked like one from the API and waits in line until the app (started now or later) runs it; cancelling
a running job asks the app that runs it to stop it at its next tick.
"""

from __future__ import annotations

import argparse
import json

from core.job_queue import JobStore, job_id_of
from core.job_runner import project_of, settings_of


def add_queue_parser(commands) -> None:
    queue = commands.add_parser("queue", help="list, add, cancel, retry or move the app's queued jobs")
    actions = queue.add_subparsers(dest="queue_action", required=True)
    actions.add_parser("list", help="the jobs: running, queued in order, then the others")
    add = actions.add_parser("add", help="queue a job (the app runs it when its turn comes)")
    add.add_argument("kind", help="prepare, train, prepare+train, evaluate, grid, sweep or batch")
    add.add_argument("project")
    add.add_argument(
        "settings", nargs="?", default="{}", help='a JSON object, e.g. \'{"base_model": "...", "steps": 500}\''
    )
    for name, text in (("cancel", "take a queued job out, or stop the running one"), ("retry", "queue it again")):
        actions.add_parser(name, help=text).add_argument("job_id")
    move = actions.add_parser("move", help="move a queued job: a place (1 is next), up or down")
    move.add_argument("job_id")
    move.add_argument("to")


def run_queue(args: argparse.Namespace, app_config) -> int:
    store = JobStore(app_config.QUEUE_DB, max_waiting=app_config.QUEUE_MAX_WAITING)
    if args.queue_action == "list":
        for job in store.list_jobs():
            place = f" #{job.position}" if job.state == "queued" else ""
            outcome = job.result or job.error or ""
            print(f"{job.id:>5}  {job.kind:<14} {job.project:<24} {job.state}{place}  {job.progress:.0%}  {outcome}")
        return 0
    if args.queue_action == "add":
        job = store.add(args.kind, project_of(args.project), _payload(args, app_config))
    elif args.queue_action == "cancel":
        job = store.cancel(job_id_of(args.job_id))
    elif args.queue_action == "retry":
        job = store.retry(job_id_of(args.job_id))
    else:
        job = store.move(job_id_of(args.job_id), args.to)
    print(json.dumps({k: v for k, v in job.as_dict().items() if k != "payload"}))
    return 0


def _payload(args: argparse.Namespace, app_config) -> dict:
    """The job's payload, checked as the app checks one from its API (a batch as the Generate tab does)."""
    from core.errors import UserError
    from core.model_manager import ModelManager
    from modules.lora_training.jobs import TrainingJobs
    from modules.lora_training.queue_kinds import TrainingKinds
    from modules.lora_training.ui import LoraTrainingTab

    manager = ModelManager(models_dir=app_config.MODELS_DIR, loras_dir=app_config.LORAS_DIR, device="cpu")
    if args.kind == "batch":
        kinds = _batch_kinds(manager, app_config)
    else:
        jobs = TrainingJobs(model_manager=manager, app_config=app_config)
        kinds = TrainingKinds(LoraTrainingTab(jobs=jobs, model_manager=manager, gestionnaire=None, config=app_config))
    if args.kind not in kinds.kinds:
        raise UserError(f"Unknown job kind {args.kind!r}; the kinds are: {', '.join(kinds.kinds)}."[:300])
    project = project_of(args.project)
    payload = kinds.payload(args.kind, project, settings_of(args.settings))
    kinds.check(args.kind, project, payload)
    return payload


def _batch_kinds(manager, app_config):
    from modules.generate.batch_kinds import BatchKinds
    from modules.generate.tab import GenerateTab

    tab = GenerateTab(model_manager=manager, config=app_config, translations={})
    return BatchKinds(tab.batch_runner())
