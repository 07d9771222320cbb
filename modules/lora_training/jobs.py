"""Background jobs: prepare and/or train in a server thread, one at a time, observable by polling.

A job belongs to the server, not to a browser tab: any page (or API client) reads its
state with ``snapshot()``, and ``stop()`` ends it within one step. The inference model
is released before training and restored after, whatever happens.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import GpuBusyError, UserError
from modules.lora_training.config import PrepareConfig, TrainConfig
from modules.lora_training.estimate import CountedSteps
from modules.lora_training.events import (
    CheckpointSaved,
    Failed,
    Finished,
    Log,
    PrepFinished,
    PrepProgress,
    RunChosen,
    SampleSaved,
    StepDone,
    Stopped,
    Validated,
)
from modules.lora_training.validation import DEFAULT_MARGIN, DEFAULT_RULE

log = logging.getLogger(__name__)

LOG_LINES = 500
LOSS_POINTS = 1000  # the most loss points a status carries: a long run's curve, evenly thinned


@dataclass
class JobState:
    job_id: int
    project: str
    kind: str  # prepare | train | prepare+train | evaluate | grid | sweep
    state: str = "starting"  # preparing | training | stopping | prepared | finished | stopped | failed
    started: float = field(default_factory=time.time)
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    s_per_step: float | None = None
    prep_done: int = 0
    prep_total: int = 0
    prep_stage: str = ""
    message: str = ""
    lora_path: str | None = None
    checkpoint: str | None = None
    trigger: str = ""
    base_model: str = ""
    settings: dict = field(default_factory=dict)  # the job's prepare and train values, for the page to show
    log: deque = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    losses: list = field(default_factory=list)
    validation: list = field(default_factory=list)  # (step, held-out loss, training-images loss)
    samples: list = field(default_factory=list)
    grid: str | None = None  # the comparison grid an evaluation or grid job wrote
    run_id: str | None = None  # the run a training writes to, once chosen
    study: str | None = None  # a sweep's study
    revision: int = 0  # a sweep's trial events so far: its trials table changed when this did
    on_run: object = None  # called with the run id once chosen (the queue records it)

    @property
    def running(self) -> bool:
        return self.state in ("starting", "preparing", "training", "evaluating", "stopping")

    def eta_seconds(self) -> float | None:
        if not self.s_per_step or not self.total_steps:
            return None
        return max(0.0, (self.total_steps - self.step) * self.s_per_step)

    def as_dict(self) -> dict:
        return {
            "job_id": self.job_id,
            "project": self.project,
            "kind": self.kind,
            "state": self.state,
            "running": self.running,
            "step": self.step,
            "total_steps": self.total_steps,
            "loss": self.loss,
            "s_per_step": self.s_per_step,
            "eta_seconds": self.eta_seconds(),
            "prep_stage": self.prep_stage,
            "prep_done": self.prep_done,
            "prep_total": self.prep_total,
            "message": self.message,
            "lora_path": self.lora_path,
            "checkpoint": self.checkpoint,
            "trigger": self.trigger,
            "base_model": self.base_model,
            "settings": dict(self.settings),
            "log": list(self.log),
            "losses": thinned(self.losses, limit=LOSS_POINTS),
            "validation": thinned(self.validation, limit=LOSS_POINTS),
            "samples": list(self.samples),
            "grid": self.grid,
            "run_id": self.run_id,
            "study": self.study,
            "revision": self.revision,
        }


def _settings(prepare_config: PrepareConfig | None, train_config: TrainConfig | None) -> dict:
    from modules.lora_training.config import config_to_dict

    settings = config_to_dict(prepare_config) if prepare_config is not None else {}
    return {**settings, **(config_to_dict(train_config) if train_config is not None else {})}


def disk_failure_message(exc: OSError) -> str:
    """What failed on disk, and what to do: free space or fix permissions, then try again or Resume."""
    import errno

    where = exc.filename or "a project file"
    if exc.errno == errno.ENOSPC:
        fix = "Free some disk space"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "Fix the folder's permissions (or choose a writable folder in config.json)"
    else:
        fix = "Check the disk and the folder"
    return (
        f"Could not read or write {where}: {exc.strerror or exc}. {fix}, then try again: Resume continues a "
        "stopped run from its last checkpoint, and a second Prepare reuses what was already prepared."
    )


def thinned(points: list, *, limit: int) -> list:
    """At most ``limit`` points, evenly spaced, always with the newest."""
    if len(points) <= limit:
        return list(points)
    stride = -(-len(points) // (limit - 1))
    return points[::stride] + points[-1:]


def _line(text: str) -> str:
    return f"{time.strftime('%H:%M:%S')}  {text}"


class TrainingJobs:
    """Runs one preparation/training job at a time for the whole server."""

    def __init__(self, *, model_manager, app_config) -> None:
        self.model_manager = model_manager
        self.app_config = app_config
        self._lock = threading.Lock()
        self._job: JobState | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._next_id = 1
        self.lora_version = 0  # bumps each time a LoRA is saved, so lists can refresh
        self.counted_steps = CountedSteps()  # the estimate's step counts, shared with the tab's Estimate

    # ----- queries -----------------------------------------------------------------
    def snapshot(self) -> dict:
        with self._lock:
            if self._job is None:
                return {"state": "idle", "running": False, "log": [], "losses": [], "samples": [], "job_id": 0}
            return self._job.as_dict()

    def is_running(self) -> bool:
        with self._lock:
            return self._job is not None and self._job.running

    def wait(self, timeout: float | None = None) -> dict:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.snapshot()

    # ----- commands ----------------------------------------------------------------
    def start(
        self,
        *,
        prepare_config: PrepareConfig | None = None,
        train_config: TrainConfig | None = None,
        resume: bool = False,
        new_run: bool = False,
        run_id: str | None = None,
        on_run=None,
    ) -> dict:
        """Prepare and/or train in the background; ``run_id`` names the run a resume continues, and
        ``on_run(run_id)`` hears which run the training writes to as soon as it is chosen."""
        if prepare_config is None and train_config is None:
            raise UserError("Nothing to do: give preparation settings, training settings or both.")
        project = (train_config or prepare_config).project
        self._check_before_starting(prepare_config, train_config)
        kind = "+".join(k for k, c in (("prepare", prepare_config), ("train", train_config)) if c is not None)
        # Project files are read before taking the lock: /training_status waits on it.
        trigger = prepare_config.trigger if prepare_config else self._prepared_trigger(project)
        history = self._run_history(project, run_id) if resume else ([], [], [])
        note = self._stopped_run_note(project) if train_config is None else None
        with self._lock:
            self._refuse_while_running()
            if train_config is not None and not resume and not new_run:
                self._check_can_start(project)
            job = JobState(job_id=self._next_id, project=project, kind=kind)
            if train_config is not None:
                job.base_model = train_config.base_model
            job.trigger = trigger
            job.settings, job.on_run = _settings(prepare_config, train_config), on_run
            job.losses, job.validation, job.samples = history
            if note:
                job.log.append(_line(note))
            run_options = {"resume": resume, "new_run": new_run, "run_id": run_id}
            return self._launch(job, self._run, job, prepare_config, train_config, run_options)

    def evaluate(
        self, project: str, *, run_id: str | None = None, best_rule: str = DEFAULT_RULE, margin: float = DEFAULT_MARGIN
    ) -> dict:
        """Measure a run's base model and kept checkpoints again (:mod:`.evaluate`), in the background."""
        from modules.lora_training.checkpoints import list_checkpoints
        from modules.lora_training.evaluate import find_run
        from modules.lora_training.validation import Evaluation

        Evaluation().choose(best_rule, margin)  # refused now, not by a failed job
        run = find_run(self._paths(project), run_id or None)
        with self._lock:
            self._refuse_while_running()
            job = JobState(job_id=self._next_id, project=project, kind="evaluate")
            job.total_steps = 1 + len(list_checkpoints(run.checkpoints))  # the base model and each checkpoint
            return self._launch(
                job, self._evaluate, job, {"run_id": run.run_id, "best_rule": best_rule, "margin": margin}
            )

    def comparison_grid(self, project: str, *, run_id: str | None = None, rows: str = "checkpoints") -> dict:
        """Render a run's comparison grid (:mod:`.comparison_grid`) in the background; ``grid`` names the PNG."""
        from modules.lora_training.comparison_grid import check_rows
        from modules.lora_training.evaluate import find_run

        check_rows(rows)  # refused now, not by a failed job
        run = find_run(self._paths(project), run_id or None)
        with self._lock:
            self._refuse_while_running()
            job = JobState(job_id=self._next_id, project=project, kind="grid")
            return self._launch(job, self._grid, job, run.run_id, rows)

    def sweep(self, project: str, *, space_text: str, trials, base_model: str, study: str = "") -> dict:
        """Run a hyper-parameter sweep (:mod:`.sweep`) in the background: a new study, or the named one
        continued; the search space and the project are checked now."""
        from modules.lora_training.sweep import Place, start_or_continue

        config = self.app_config
        place = Place(config.LORA_PROJECTS_DIR, config.MODELS_DIR, project, image_roots=config.IMAGE_ROOTS)
        with self._lock:
            self._refuse_while_running()
        opened = start_or_continue(place, space_text=space_text, trials=trials, base_model=base_model, study=study)
        try:
            with self._lock:
                self._refuse_while_running()
                job = JobState(job_id=self._next_id, project=project, kind="sweep", base_model=base_model)
                job.message, job.study = f"Sweep {opened.name}", opened.name
                return self._launch(job, self._sweep, job, opened, place)
        except BaseException:
            opened.close()
            raise

    def _refuse_while_running(self) -> None:
        if self._job is not None and self._job.running:
            raise UserError(
                f"A job is already running ({self._job.kind} of {self._job.project!r}); "
                "stop it or wait for it to finish."
            )

    def _launch(self, job: JobState, target, *args) -> dict:
        """Make ``job`` the current one and run ``target(*args)`` in its thread (the lock is held)."""
        self._next_id += 1
        self._job = job
        self._stop.clear()
        self._thread = threading.Thread(target=target, args=args, name=f"lora-job-{job.job_id}", daemon=True)
        self._thread.start()
        return job.as_dict()

    def check(
        self,
        prepare_config: PrepareConfig | None,
        train_config: TrainConfig | None,
        *,
        resume: bool = False,
        new_run: bool = False,
    ) -> None:
        """What :meth:`start` would refuse (but for a running job), refused now: the queue checks a job before
        it joins the line."""
        if prepare_config is None and train_config is None:
            raise UserError("Nothing to do: give preparation settings, training settings or both.")
        self._check_before_starting(prepare_config, train_config)
        if train_config is not None and resume:
            from modules.lora_training.runs import run_to_resume

            run_to_resume(self._paths(train_config.project))
        elif train_config is not None and not new_run:
            self._check_can_start(train_config.project)

    def can_resume(self, project: str) -> bool:
        """Whether ``project`` has a stopped (or interrupted) run to continue."""
        from modules.lora_training.runs import resumable_runs

        return bool(resumable_runs(self._paths(project)))

    def project_paths(self, project: str):
        return self._paths(project)

    def _check_before_starting(self, prepare_config: PrepareConfig | None, train_config: TrainConfig | None) -> None:
        """The checks that need no model and no image, so a bad request is refused at once, not by a failed job."""
        from core.model_files import model_entry
        from modules.lora_training.dataset.scan import image_folder
        from modules.lora_training.names import validate_name, validate_trigger

        validate_name((train_config or prepare_config).project)
        if prepare_config is not None:
            validate_trigger(prepare_config.trigger)
            image_folder(prepare_config.images_dir, roots=self.image_roots(prepare_config.project))
        if train_config is not None:
            train_config.output_name  # noqa: B018 - validates the LoRA's file name
            model_entry(self.app_config.MODELS_DIR, train_config.base_model)
            if train_config.reg_ratio and train_config.reg_images_dir:  # class images: the same roots as photos
                image_folder(train_config.reg_images_dir, roots=self.app_config.IMAGE_ROOTS)
            if prepare_config is None and not self._paths(train_config.project).manifest.is_file():
                raise UserError(f"Project {train_config.project!r} has no prepared images: run Prepare first.")

    def _run_history(self, project: str, run_id: str | None) -> tuple[list, list, list]:
        """The loss points, validation figures and newest samples of the run a Resume continues, so the page
        shows its whole history."""
        from modules.lora_training.metrics import read_metrics, read_validation
        from modules.lora_training.runs import run_to_resume

        try:
            run = run_to_resume(self._paths(project), run_id)
        except UserError:
            return [], [], []
        resumed_at = run.last_step()  # steps after the checkpoint (a killed run) are trained again
        losses = [(r["step"], r["loss"]) for r in read_metrics(run.logs) if r["step"] <= resumed_at]
        validation = [
            (r["step"], r["validation_loss"], r["training_images_loss"])
            for r in read_validation(run.logs)
            if r["step"] <= resumed_at
        ]
        pictures = sorted(run.samples.glob("step-*.png"), reverse=True)[:8] if run.samples.is_dir() else []
        return losses, validation, [(str(p), f"step {int(p.name.split('-')[1])}") for p in pictures]

    def image_roots(self, project: str) -> tuple[Path, ...]:
        """Where a project's photos may come from: IMAGE_ROOTS, and the photos uploaded into it."""
        return (*self.app_config.IMAGE_ROOTS, self._paths(project).source)

    def _paths(self, project: str):
        from modules.lora_training.project import ProjectPaths

        return ProjectPaths.for_project(self.app_config.LORA_PROJECTS_DIR, project)

    def _stopped_run_note(self, project: str) -> str | None:
        """For a Prepare on a project with a stopped run: what the new images mean for its Resume."""
        from modules.lora_training.runs import resumable_runs

        runs = resumable_runs(self._paths(project))
        if not runs:
            return None
        return (
            f"Project {project} has a stopped run {runs[-1].run_id} at step {runs[-1].last_step()}: "
            "Resume will continue it on the images prepared now."
        )

    def _check_can_start(self, project: str) -> None:
        from modules.lora_training.runs import check_can_start

        check_can_start(self._paths(project))

    def _prepared_trigger(self, project: str) -> str:
        from modules.lora_training.manifest import ProjectManifest

        manifest = ProjectManifest.read_or_none(self._paths(project))
        return manifest.trigger if manifest else ""

    def stop(self) -> str:
        with self._lock:
            job = self._job
            if job is None or not job.running:
                return "No job is running."
            if job.state == "stopping":
                return "Already stopping: the run ends after the current step."
            self._stop.set()
            preparing, job.state = job.state in ("starting", "preparing"), "stopping"
            if job.kind == "sweep":
                job.log.append(_line("Stop requested: the sweep stops after the current step."))
                return "Stopping the sweep after the current step; the trial runs again when the sweep continues."
            if job.kind in ("evaluate", "grid"):
                job.log.append(_line("Stop requested: the evaluation ends after the current image."))
                return "Stopping the evaluation after the current image; its files stay as they were."
            if preparing:
                job.log.append(_line("Stop requested: preparation ends after the current image."))
                return "Stopping the preparation after the current image."
            job.log.append(_line("Stop requested: finishing the current step and saving a checkpoint..."))
            return "Stopping after the current step; a resumable checkpoint will be saved."

    # ----- the worker --------------------------------------------------------------
    def _record(self, job: JobState, event) -> None:
        with self._lock:
            if isinstance(event, PrepProgress):
                job.prep_stage, job.prep_done, job.prep_total = event.stage, event.done, event.total
            elif isinstance(event, PrepFinished):
                job.log.append(_line(f"Prepared {event.used} image(s), skipped {event.skipped}."))
            elif isinstance(event, StepDone):
                job.step, job.total_steps, job.loss, job.s_per_step = (
                    event.step,
                    event.total_steps,
                    event.loss,
                    event.s_per_step,
                )
                job.losses.append((event.step, event.loss))
                if event.step == 1 or event.step % 10 == 0 or event.step == event.total_steps:
                    job.log.append(
                        _line(
                            f"step {event.step}/{event.total_steps}  loss {event.loss:.4f}  "
                            f"lr {event.lr:.2e}  {event.s_per_step:.2f} s/step"
                        )
                    )
            elif isinstance(event, Validated):
                job.validation.append((event.step, event.validation_loss, event.training_images_loss))
                job.log.append(_line(event.describe()))
            elif isinstance(event, RunChosen):
                job.run_id = event.run_id
            elif isinstance(event, CheckpointSaved):
                job.checkpoint = event.path
                job.log.append(_line(f"Checkpoint saved: {event.path}"))
            elif isinstance(event, SampleSaved):
                job.samples = ([(event.path, f"step {event.step}: {event.prompt}")] + job.samples)[:8]
                job.log.append(_line(f"Sample saved: {Path(event.path).name}"))
            elif isinstance(event, Stopped):
                job.checkpoint = event.checkpoint_path
                job.log.append(_line(f"Stopped at step {event.step}. Checkpoint: {event.checkpoint_path}"))
            elif isinstance(event, Finished):
                job.lora_path = event.lora_path
                job.log.append(_line(f"LoRA saved: {event.lora_path}"))
            elif isinstance(event, Failed):
                job.message = event.message
                job.log.append(_line(f"Failed: {event.message}"))
            elif isinstance(event, Log):
                for text in event.message.splitlines():
                    job.log.append(_line(text))

    def _set(self, job: JobState, **changes) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(job, key, value)

    def _run(self, job, prepare_config, train_config, run_options: dict) -> None:
        from modules.lora_training.dataset.prepare import prepare
        from modules.lora_training.dataset.scan import ScanLimits
        from modules.lora_training.train import train

        config = self.app_config
        try:
            if prepare_config is not None:
                if not self._stop.is_set():
                    self._set(job, state="preparing")
                prepared = prepare(
                    prepare_config,
                    projects_dir=config.LORA_PROJECTS_DIR,
                    models_dir=config.MODELS_DIR,
                    on_event=lambda e: self._record(job, e),
                    should_stop=self._stop.is_set,
                    image_roots=self.image_roots(prepare_config.project),
                    limits=ScanLimits(max_image_bytes=config.MAX_IMAGE_FILE_MB * 2**20),
                )
                if prepared.status == "stopped":
                    message = "Preparation stopped; the prepared set is unchanged. Prepare again to finish."
                    self._set(job, state="stopped", message=message)
                    return
                if train_config is None:
                    self._set(job, state="prepared", message="Preparation finished.")
                    return
            if self._stop.is_set():
                self._set(job, state="stopped", message="Stopped before training started.")
                return
            self._train(job, train_config, run_options, train)
        except Exception as exc:  # noqa: BLE001 - every failure ends the job with a message
            self._fail(job, exc)

    def _fail(self, job: JobState, exc: Exception) -> None:
        """End ``job`` as failed, with a message the user can act on (a traceback in the log for bugs)."""
        if isinstance(exc, UserError):
            message = str(exc)
        elif isinstance(exc, OSError):  # a full disk, a read-only or vanished folder: the user can fix it
            log.error("job %s stopped by a failed read or write: %s", job.job_id, exc)
            message = disk_failure_message(exc)
        else:  # a bug or an environment problem: keep the server alive, say what happened
            log.error("job %s crashed:\n%s", job.job_id, traceback.format_exc())
            message = f"Unexpected error: {type(exc).__name__}: {exc}. See the server log for details."
        self._record(job, Failed(message))
        self._set(job, state="failed", message=message)

    def _sweep_event(self, job: JobState, event) -> None:
        """A trial's events: its steps drive the progress bar (the loss plot is one run's); the rest are logged
        and count as a change of the trials table (a trial began, reported or ended)."""
        if isinstance(event, StepDone):
            self._set(job, step=event.step, total_steps=event.total_steps, loss=event.loss, s_per_step=event.s_per_step)
            return
        self._record(job, Log(event.describe()) if isinstance(event, Validated) else event)
        self._set(job, revision=job.revision + 1)

    def _sweep(self, job, study, place) -> None:
        from modules.lora_training.sweep import run_worker

        try:
            with study, self._model_released(job, f"sweeping LoRA project {job.project!r}"):
                self._set(job, state="stopping" if self._stop.is_set() else "training")
                done = run_worker(
                    study, place=place, should_stop=self._stop.is_set, on_event=lambda e: self._sweep_event(job, e)
                )
        except Exception as exc:  # noqa: BLE001 - every failure ends the job with a message
            self._fail(job, exc)
            return
        self._record(job, Log(done.describe()))
        self._set(job, state="stopped" if self._stop.is_set() else "finished", message=done.describe())

    def _evaluate(self, job, options: dict) -> None:
        from modules.lora_training.evaluate import evaluate_run, format_table
        from modules.lora_training.panel_judge import describe_clip_figures
        from modules.lora_training.runs import RunPaths, runs_dir

        started = time.monotonic()

        def measured(record: dict) -> None:
            done = job.step + 1
            self._set(job, step=done, s_per_step=(time.monotonic() - started) / done)
            if record["validation_loss"] is not None:
                self._record(job, Validated(record["step"], record["validation_loss"], record["training_images_loss"]))
            if record.get("subject_similarity") is not None:
                self._record(job, Log(describe_clip_figures(record)))

        def evaluate():
            return evaluate_run(
                job.project,
                projects_dir=self.app_config.LORA_PROJECTS_DIR,
                models_dir=self.app_config.MODELS_DIR,
                device=self.app_config.DEVICE,
                on_record=measured,
                should_stop=self._stop.is_set,
                **options,
            )

        evaluation = self._evaluation_work(job, evaluate)
        if evaluation is None:
            return
        best = evaluation.best()
        self._record(job, Log(format_table(evaluation)))
        run = RunPaths(runs_dir(self._paths(job.project)) / options["run_id"])
        job.grid = str(run.grid("checkpoints")) if evaluation.grid else None
        message = f"Best checkpoint: {best['checkpoint']} (step {best['step']})." if best else "No checkpoint yet."
        self._set(job, state="evaluated", message=message)

    def _grid(self, job, run_id: str, rows: str) -> None:
        from modules.lora_training.comparison_grid import comparison_grid

        def render():
            return comparison_grid(
                job.project,
                projects_dir=self.app_config.LORA_PROJECTS_DIR,
                models_dir=self.app_config.MODELS_DIR,
                run_id=run_id,
                rows=rows,
                device=self.app_config.DEVICE,
                should_stop=self._stop.is_set,
            )

        path = self._evaluation_work(job, render)
        if path is not None:
            job.grid = str(path)
            self._record(job, Log(f"Comparison grid saved: {path}"))
            self._set(job, state="evaluated", message=f"Comparison grid saved: {path.name}.")

    def _evaluation_work(self, job, work):
        """Run ``work()`` with the inference model released; its result, or None once the job has ended
        as stopped (``work`` returned None) or failed."""
        try:
            with self._model_released(job, f"evaluating LoRA project {job.project!r}"):
                self._set(job, state="stopping" if self._stop.is_set() else "evaluating")
                result = work()
        except Exception as exc:  # noqa: BLE001 - every failure ends the job with a message
            self._fail(job, exc)
            return None
        if result is None:
            self._set(job, state="stopped", message="Evaluation stopped; its files are unchanged.")
        return result

    @contextlib.contextmanager
    def _model_released(self, job, reason: str):
        """The Generate tab's model off the GPU while the job runs, restored after."""
        try:
            info = self.model_manager.release(reason)
        except GpuBusyError as exc:
            raise UserError(str(exc)) from exc
        freed = f", {info.freed_bytes / 2**20:.0f} MiB of GPU memory freed" if info.freed_bytes else ""
        model = info.model or "(none)"
        if job.kind in ("evaluate", "grid"):
            self._record(job, Log(f"Inference model {model} released for evaluation{freed}."))
        else:
            self._record(job, Log(f"Inference model {model} released for training{freed}."))
        try:
            yield
        finally:
            restored = self.model_manager.restore()
            if restored:
                self._record(job, Log(f"Inference model {restored} restored."))

    def _log_estimate(self, job, train_config) -> None:
        """Log the run's memory estimate. Counting a full-size step takes seconds (or waits on a page's
        Estimate of the same model), so it runs aside and is abandoned on Stop; it never fails the run."""
        from modules.lora_training.estimate import estimate_run
        from modules.lora_training.manifest import resolution_of

        outcome: dict = {}

        def estimate() -> None:
            try:
                outcome["memory"] = estimate_run(
                    train_config,
                    models_dir=self.app_config.MODELS_DIR,
                    resolution=resolution_of(self._paths(job.project)),
                    timing=False,
                    counted=self.counted_steps,
                ).memory
            except Exception as exc:  # an estimate is advice: any failure of it leaves the run alone
                outcome["error"] = exc

        if self._stop.is_set():
            return
        worker = threading.Thread(target=estimate, name="run-estimate", daemon=True)
        worker.start()
        while worker.is_alive() and not self._stop.is_set():
            worker.join(0.1)
        if worker.is_alive():
            self._record(job, Log("No memory estimate: Stop was asked while it was being counted."))
        elif "error" in outcome:
            self._record(job, Log(f"No memory estimate: {outcome['error']}"))
        else:
            memory = outcome["memory"]
            self._record(job, Log(memory.describe(), level="warning" if memory.fits is False else "info"))

    def _training_event(self, job: JobState, event) -> None:
        self._record(job, event)
        if isinstance(event, RunChosen) and job.on_run is not None:  # outside the lock: it writes the queue file
            job.on_run(event.run_id)

    def _train(self, job, train_config, run_options: dict, train) -> None:
        config = self.app_config
        with self._model_released(job, f"training LoRA {train_config.output_name!r}"):
            self._set(job, state="stopping" if self._stop.is_set() else "training")
            self._log_estimate(job, train_config)
            result = train(
                train_config,
                projects_dir=config.LORA_PROJECTS_DIR,
                models_dir=config.MODELS_DIR,
                loras_dir=config.LORAS_DIR,
                on_event=lambda e: self._training_event(job, e),
                should_stop=self._stop.is_set,
                image_roots=config.IMAGE_ROOTS,
                **run_options,
            )
        if result.status == "finished":
            self.lora_version += 1
            self._set(job, state="finished", message=f"{Path(result.lora_path).name} is ready in the Generate tab.")
        elif result.status == "stopped":
            self._set(
                job,
                state="stopped",
                message=(
                    f"Stopped at step {result.step}. Resume continues run {Path(result.checkpoint).parent.parent.name} "
                    f"from {result.checkpoint}."
                ),
            )
        else:
            self._set(job, state="failed", message=result.message)


def resumable_config(projects_dir: Path, project: str, run_id: str | None = None) -> TrainConfig:
    """The training config a stopped or interrupted run of ``project`` was started with: the named run,
    or the newest one that can be resumed."""
    from modules.lora_training.config import config_from_dict
    from modules.lora_training.project import ProjectPaths, read_json
    from modules.lora_training.runs import run_to_resume

    run = run_to_resume(ProjectPaths.for_project(projects_dir, project), run_id)
    raw = read_json(run.training_config)
    if not raw:
        raise UserError(
            f"Run {run.run_id} of project {project!r} has no training_config.json; "
            "start a new run with --new-run (tab: tick 'Start a new run')."
        )
    # Runs from before validation trained on every image: they resume on the same ones.
    return config_from_dict(TrainConfig, {"validation_share": 0.0, **raw})


def interrupted_projects(projects_dir: Path, loras_dir: Path) -> list[str]:
    """Projects with a run a crash or a Stop left to resume."""
    from modules.lora_training.project import ProjectPaths
    from modules.lora_training.runs import LEGACY_RUN_ID, resumable_runs

    found = []
    for folder in sorted(Path(projects_dir).iterdir()) if Path(projects_dir).is_dir() else []:
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        try:
            runs = resumable_runs(ProjectPaths.for_project(projects_dir, folder.name))
            config = resumable_config(projects_dir, folder.name)
        except (UserError, ValueError, OSError):
            continue
        # A run from before runs had identities left no finished marker: its LoRA says it finished.
        legacy_done = (
            runs[-1].run_id == LEGACY_RUN_ID and (Path(loras_dir) / f"{config.output_name}.safetensors").exists()
        )
        if not legacy_done:
            found.append(folder.name)
    return found
