"""Hyper-parameter sweeps: an Optuna study whose trials train short runs of a prepared project.

Each trial trains ``trial_steps`` steps with its parameters and measures the held-out validation loss
``reports`` times on the way (:mod:`.validation`); each figure is reported to Optuna, whose pruner may end
the trial there, through training's own Stop (a checkpoint, then ``Stopped``). A trial that fails is recorded
with its error and the sweep goes on. Trials train in ``<project>/sweeps/<study>/workspace/``, whose
``<project>/`` links to the project's prepared images, manifest and caches, so their runs never mix with the
project's own; their checkpoints and LoRA files are deleted when they end (Optuna keeps the figures).
See :mod:`.sweep_study` for the storage and the budget.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError
from modules.lora_training.config import TrainConfig, config_from_dict
from modules.lora_training.events import EventSink, Failed, Log, StepDone, Validated, ignore_events
from modules.lora_training.project import ProjectPaths
from modules.lora_training.sweep_space import check_trials, parse_space
from modules.lora_training.sweep_study import (
    GRACE_SECONDS,
    HEARTBEAT_SECONDS,
    Heartbeat,
    Study,
    check_study_name,
    claim_trial,
    close_storage,
    create_study,
    default_storage,
    fail_dead_local_trials,
    fail_stale_trials,
    join_study,
    new_study_name,
    open_storage,
    shown_url,
    sweeps_dir,
    this_worker,
)

log = logging.getLogger(__name__)

_LINKED = ("images", "manifest.json", "cache")


@dataclass(frozen=True)
class Place:
    """Where a sweep's project and models are, and the folders its trials may read class images from (the
    app's IMAGE_ROOTS; None: any folder, as for the CLI)."""

    projects_dir: Path
    models_dir: Path
    project: str
    image_roots: tuple[Path, ...] | None = None

    @property
    def paths(self) -> ProjectPaths:
        return ProjectPaths.for_project(self.projects_dir, self.project)


@dataclass
class WorkerSummary:
    study: str
    ran: list[int] = field(default_factory=list)
    outcomes: dict[int, str] = field(default_factory=dict)  # trial number -> complete | pruned | failed | stopped

    def describe(self) -> str:
        counts = {
            kind: list(self.outcomes.values()).count(kind) for kind in ("complete", "pruned", "failed", "stopped")
        }
        return (
            f"Sweep {self.study}: this worker ran {len(self.ran)} trial(s): {counts['complete']} complete, "
            f"{counts['pruned']} pruned, {counts['failed']} failed, {counts['stopped']} stopped (to run again)."
        )


def check_project(place: Place, settings: dict) -> None:
    """A project that can be swept: prepared, with held-out images for the validation loss."""
    from modules.lora_training.data import load_items
    from modules.lora_training.validation import MIN_IMAGES_FOR_A_SPLIT, split_validation

    share = settings.get("validation_share", TrainConfig.__dataclass_fields__["validation_share"].default)
    _, held_out = split_validation(load_items(place.paths), share)
    if not held_out:
        raise UserError(
            f"Project {place.project!r} holds no images out for validation (it needs {MIN_IMAGES_FOR_A_SPLIT} "
            "prepared images or more and a held-out share above 0): a sweep ranks trials by their validation loss."
        )


def open_sweep(
    place: Place,
    *,
    space_text: str = "",
    trials: int | None = None,
    base_model: str = "",
    study: str = "",
    storage_url: str = "",
    join: bool = False,
    heartbeat: int = HEARTBEAT_SECONDS,
    grace: int = GRACE_SECONDS,
) -> Study:
    """Create a study (or join the one named ``study`` with ``join``) on ``place``'s project; bad input is
    refused here, before any trial. The caller closes the study (:meth:`Study.close`)."""
    storage = open_storage(storage_url or default_storage(place.paths), heartbeat=heartbeat, grace=grace)
    try:
        return _create_or_join(
            place, storage, space_text=space_text, trials=trials, base_model=base_model, study=study, join=join
        )
    except BaseException:
        close_storage(storage)
        raise


def _create_or_join(place: Place, storage, *, space_text: str, trials, base_model: str, study: str, join: bool):
    if join:
        opened = join_study(storage, name=study, project=place.project, trials=trials, space_text=space_text)
        check_settings(place, opened.settings, objective=opened.space.objective)
        return opened
    if trials is None:
        raise UserError("Give the number of trials of the new sweep (--trials N).")
    space = parse_space(space_text, trials=trials)
    settings = {**space.fixed, **({"base_model": base_model} if base_model else {})}
    check_settings(
        place, settings, objective=space.objective
    )  # before the study exists: a refused request leaves nothing behind
    return create_study(
        storage,
        name=study or new_study_name(),
        project=place.project,
        space_text=space_text,
        trials=trials,
        settings=settings,
    )


def check_settings(place: Place, settings: dict, *, objective: str) -> None:
    """A base model that exists, a project with held-out images, a class-image folder the app may read."""
    from core.model_files import model_entry

    if not settings.get("base_model"):
        raise UserError('Give the base model the sweep trains on (--base-model, or "base_model" in "fixed").')
    model_entry(place.models_dir, settings["base_model"])
    check_project(place, settings)
    if settings.get("reg_images_dir") and place.image_roots is not None:
        from modules.lora_training.regularization import class_image_folder

        class_image_folder(settings["reg_images_dir"], roots=place.image_roots)
    if objective == "subject_similarity":
        from modules.lora_training.clip_scores import find_clip_folder

        if find_clip_folder(place.models_dir) is None:
            raise UserError(
                "The subject-similarity objective needs a CLIP model in models/clip/ (run ./run.sh once to build the "
                "demo one, or place a CLIP folder there); use the validation-loss objective otherwise."
            )


def trial_config(study: Study, params: dict, *, number: int) -> TrainConfig:
    """The short run of trial ``number``: the study's settings with the trial's parameters."""
    steps = params.get("steps", study.space.trial_steps)
    values = {
        **study.settings,
        **params,
        "project": study.project,
        "name": f"trial-{number:04d}",
        "steps": steps,
        "save_every_steps": max(1, math.ceil(steps / study.space.reports)),
        "keep_checkpoints": 1,
        "sample_every_steps": 0,
        "overwrite": True,
        "also_save_webui": False,
    }
    return config_from_dict(TrainConfig, values)


def best_train_config(study: Study) -> TrainConfig:
    """The full run with the best trial's parameters (its length: ``steps`` when swept, else the study's
    settings, else the usual epochs)."""
    from optuna.trial import TrialState

    complete = study.optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise UserError(f"Study {study.name!r} has no complete trial yet: run the sweep first.")
    best = min(complete, key=lambda trial: (study.rank_key(trial.value), trial.number))
    return config_from_dict(TrainConfig, {**study.settings, **best.params, "project": study.project})


def workspace(place: Place, study: str) -> Path:
    """The projects folder trials train in: ``<project>/`` there links to the project's prepared set."""
    root = sweeps_dir(place.paths) / study / "workspace"
    linked = root / place.project
    linked.mkdir(parents=True, exist_ok=True)
    place.paths.cache.mkdir(parents=True, exist_ok=True)
    for name in _LINKED:
        with contextlib.suppress(FileExistsError):  # made by an earlier trial or another worker
            (linked / name).symlink_to(place.paths.root / name)
    return root


class TrialWatcher:
    """Turns a trial's training events into Optuna reports, and asks training to stop when pruned."""

    def __init__(self, trial, *, on_event: EventSink, reports: int = 1, report_validation: bool = True) -> None:
        self.trial, self.on_event = trial, on_event
        self.reports, self.report_validation = reports, report_validation
        self.step = 0
        self.pruned_at: int | None = None
        self.value: float | None = None
        self.run_root: Path | None = None
        self.failure = ""

    def __call__(self, event) -> None:
        from modules.lora_training.events import CheckpointSaved

        if isinstance(event, CheckpointSaved):
            self.run_root = Path(event.path).parent.parent
        elif isinstance(event, StepDone):
            self.step = event.step
        elif isinstance(event, Validated) and event.step > 0 and self.report_validation:
            # step 0 is the base model: the same for every trial
            self.value = event.validation_loss
            self.trial.report(event.validation_loss, event.step)
            if self.pruned_at is None and self.trial.should_prune():
                self.pruned_at = event.step
        elif isinstance(event, Failed):
            self.failure = event.message  # the worker logs it with the trial's end
            return
        if isinstance(event, StepDone | Validated) or (isinstance(event, Log) and event.level == "warning"):
            self.on_event(event)


def worker_name() -> str:
    """This worker, as the trials table names it: host and process id."""
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def _describe_params(params: dict) -> str:
    return ", ".join(
        f"{name} {value:.3g}" if isinstance(value, float) else f"{name} {value}" for name, value in params.items()
    )


def _fail(trial, message: str) -> str:
    from optuna.trial import TrialState

    trial.set_user_attr("error", message[:2000])
    trial.study.tell(trial, state=TrialState.FAIL)
    return "failed"


def _requeue(trial, params: dict) -> str:
    """A trial the user stopped: failed, and a waiting copy with its parameters keeps its slot."""
    from optuna.trial import TrialState

    trial.set_user_attr("interrupted", True)
    trial.study.tell(trial, state=TrialState.FAIL)
    trial.study.enqueue_trial(params, user_attrs={"retry_of": trial.number})
    return "stopped"


def _train_trial(trial, config: TrainConfig, *, study: Study, place: Place, watcher: TrialWatcher, should_stop):
    from modules.lora_training.train import train

    root = workspace(place, study.name)
    try:
        if study.space.objective == "subject_similarity":
            from modules.lora_training.sweep_clip import train_with_clip_reports

            return train_with_clip_reports(
                trial, config, root=root, place=place, watcher=watcher, should_stop=should_stop
            )
        return train(
            config,
            projects_dir=root,
            models_dir=place.models_dir,
            loras_dir=root.parent / "loras",
            on_event=watcher,
            should_stop=lambda: watcher.pruned_at is not None or should_stop(),
            new_run=True,
            image_roots=place.image_roots,
        )
    finally:  # Optuna keeps the figures: the trial's checkpoints and LoRA would only fill the disk
        if watcher.run_root is not None:
            shutil.rmtree(watcher.run_root / "checkpoints", ignore_errors=True)
        (root.parent / "loras" / f"{config.output_name}.safetensors").unlink(missing_ok=True)


def run_trial(trial, *, study: Study, place: Place, should_stop: Callable[[], bool], on_event: EventSink) -> str:
    """Train one trial and tell Optuna how it ended: complete | pruned | failed | stopped."""
    from optuna.trial import TrialState

    by_loss = study.space.objective == "validation_loss"
    watcher = TrialWatcher(trial, on_event=on_event, reports=study.space.reports, report_validation=by_loss)
    params: dict = {}
    trial.set_user_attr("worker", worker_name())
    trial.set_user_attr("worker_process", this_worker(trial.number))
    try:
        params = study.space.suggest(trial)
        on_event(Log(f"Trial {trial.number}: {_describe_params(params)}"))
        result = _train_trial(
            trial,
            trial_config(study, params, number=trial.number),
            study=study,
            place=place,
            watcher=watcher,
            should_stop=should_stop,
        )
    except UserError as exc:
        return _fail(trial, str(exc))
    except Exception as exc:  # noqa: BLE001 - a trial that crashes is recorded and the sweep goes on
        log.exception("sweep trial %s crashed", trial.number)
        return _fail(trial, f"{type(exc).__name__}: {exc}")
    if result.status == "finished" and watcher.value is not None:
        trial.study.tell(trial, watcher.value)
        on_event(Log(f"Trial {trial.number} complete: {study.space.objective} {watcher.value:.4f}"))
        return "complete"
    if result.status == "stopped" and watcher.pruned_at is not None:
        trial.set_user_attr("pruned_at_step", watcher.pruned_at)
        trial.study.tell(trial, state=TrialState.PRUNED)
        on_event(
            Log(f"Trial {trial.number} pruned at step {watcher.pruned_at}: {study.space.objective} {watcher.value:.4f}")
        )
        return "pruned"
    if result.status == "stopped":
        return _requeue(trial, params)
    return _fail(trial, result.message or watcher.failure or "the trial measured no validation loss")


def run_worker(
    study: Study,
    *,
    place: Place,
    should_stop: Callable[[], bool] = lambda: False,
    on_event: EventSink = ignore_events,
) -> WorkerSummary:
    """Run waiting trials of ``study`` until none is left (other workers may run some) or a stop."""
    summary = WorkerSummary(study.name)
    heartbeat = study.storage.get_heartbeat_interval() or HEARTBEAT_SECONDS
    on_event(Log(f"Sweep {study.name} ({shown_url(study.storage.url)}): {study.budget} trial(s) in all"))
    while not should_stop():
        fail_stale_trials(study)
        fail_dead_local_trials(study)
        trial = claim_trial(study)
        if trial is None:
            break
        with Heartbeat(study.storage, trial._trial_id, every=heartbeat):
            outcome = run_trial(trial, study=study, place=place, should_stop=should_stop, on_event=on_event)
        summary.ran.append(trial.number)
        summary.outcomes[trial.number] = outcome
        if outcome == "failed":
            error = study.storage.get_trial(trial._trial_id).user_attrs.get("error", "")
            on_event(Log(f"Trial {trial.number} failed: {error}", level="warning"))
    return summary


def study_names(place: Place, *, storage_url: str = "") -> list[str]:
    """The studies of the project's storage, oldest first."""
    storage, names = _study_names(place, storage_url=storage_url)
    close_storage(storage)
    return names


def _study_names(place: Place, *, storage_url: str = "") -> tuple[object | None, list[str]]:
    """The opened storage and its studies; (None, []) when the project has no sweep database yet (a status
    asked for any name must not create folders or a database for it)."""
    import optuna

    if not storage_url and not (sweeps_dir(place.paths) / "sweeps.db").is_file():
        return None, []
    storage = open_storage(storage_url or default_storage(place.paths))
    return storage, optuna.get_all_study_names(storage)


def find_study(place: Place, name: str = "", *, storage_url: str = "") -> Study:
    """The study named ``name`` of the project's storage, or its newest one."""
    storage, names = _study_names(place, storage_url=storage_url)
    try:
        if not names:
            raise UserError(f"Project {place.project!r} has no sweep yet: start one first.")
        return join_study(storage, name=name or names[-1], project=place.project)
    except BaseException:
        close_storage(storage)
        raise


def start_or_continue(place: Place, *, space_text: str, trials, base_model: str, study: str = "") -> Study:
    """The tab's Start: a new study, or the named one continued (its budget raised to ``trials``) when it
    exists; a sweep that was stopped or killed goes on to its budget."""
    join = bool(study.strip()) and study.strip() in study_names(place)
    return open_sweep(
        place,
        space_text=space_text if not join else "",
        trials=trials,
        base_model=base_model,
        study=study.strip(),
        join=join,
    )


def check_sweep(place: Place, *, space_text: str, trials, base_model: str, study: str = "") -> dict:
    """What :func:`start_or_continue` would refuse, refused now, storing nothing: a queued sweep creates its
    study (or raises its budget) only when it starts, so a sweep cancelled while it waits leaves nothing behind.
    Returns the queued job's settings, the new study's name drawn now."""
    name, trials = study.strip(), check_trials(trials)
    if name and name in study_names(place):
        with find_study(place, name) as found:
            check_settings(place, found.settings, objective=found.space.objective)
        return {"study": name, "trials": trials, "base_model": base_model, "space": ""}
    space = parse_space(space_text, trials=trials)
    check_settings(
        place, {**space.fixed, **({"base_model": base_model} if base_model else {})}, objective=space.objective
    )
    name = check_study_name(name) if name else new_study_name()
    return {"study": name, "trials": trials, "base_model": base_model, "space": space_text}
