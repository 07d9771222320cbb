"""The LoRA Training jobs the queue runs (:class:`core.job_runner.JobKinds`): prepare, train,
prepare+train, evaluate, grid and sweep, each done by :class:`~modules.lora_training.jobs.TrainingJobs`.
Every action of the tab that takes the device is one of these kinds, so it waits its turn.

A job's payload is the JSON of its typed configs: ``{"prepare": {...}, "train": {...}, "new_run": false,
"resume": false, "records_run": true}`` (PrepareConfig / TrainConfig fields) or, for evaluate, ``{"run_id", "best_rule",
"margin"}``, for a grid, ``{"run_id", "rows"}``, or, for a sweep, ``{"study", "trials", "base_model",
"space"}`` (checked when the job is queued, a new study's name drawn then; the study is created, or its budget
raised, only when the job starts, so a sweep cancelled while it waits leaves no study). A train job records the run it writes to when that run starts
(``QueuedJob.run_id``); run again (Retry, or an interrupted job queued at start) it continues that run from its
checkpoint, or fails saying the run is gone. To add a kind: a name in ``KINDS``, its settings → payload in
``payload``, its start in ``start``.
"""

from __future__ import annotations

from core.errors import UserError
from core.job_queue import QueuedJob
from core.job_runner import JobStatus
from modules.lora_training.config import PrepareConfig, TrainConfig, config_from_dict, config_to_dict
from modules.lora_training.validation import DEFAULT_MARGIN, DEFAULT_RULE

KINDS = ("prepare", "train", "prepare+train", "evaluate", "grid", "sweep")
_PREPARE_WIDGETS = ("images_dir", "trigger", "captioner", "caption_task", "resolution", "include_subfolders")
_RUNNING = ("starting", "preparing", "training", "evaluating", "stopping")
# In every payload queued since jobs record their run: a job of such a payload that has no run_id never
# started its run (it ended while preparing), so it starts again as first asked.
RUN_RECORDED = "records_run"


def job_payload(prepare: PrepareConfig | None, train: TrainConfig | None, *, new_run=False, resume=False) -> dict:
    return {
        "prepare": config_to_dict(prepare) if prepare is not None else None,
        "train": config_to_dict(train) if train is not None else None,
        "new_run": bool(new_run),
        "resume": bool(resume),
        RUN_RECORDED: True,
    }


def kind_of(payload: dict) -> str:
    return "+".join(k for k in ("prepare", "train") if payload.get(k))


def _flag(settings: dict, name: str) -> bool:
    value = settings.pop(name, False)
    if not isinstance(value, bool):
        raise UserError(f"{name} must be true or false; got {value!r}"[:300])
    return value


def _part(settings: dict, name: str) -> dict:
    value = settings.get(name)
    if not isinstance(value, dict):
        raise UserError(
            f'settings of a prepare+train job hold "prepare" and "train" objects of settings; {name} is {value!r}'[:300]
        )
    return dict(value)


class TrainingKinds:
    """Queue jobs of the LoRA Training tab (``tab`` builds configs from settings as its API does)."""

    kinds = KINDS

    def __init__(self, tab) -> None:
        self.tab = tab
        self.jobs = tab.jobs
        self._job_ids: dict[int, int] = {}  # queue job id → TrainingJobs job id

    # ----- settings → payload ------------------------------------------------------------
    def payload(self, kind: str, project: str, settings: dict) -> dict:
        settings = dict(settings)
        if kind == "evaluate":
            return self._evaluate_payload(settings)
        if kind == "grid":
            return _grid_payload(settings)
        if kind == "sweep":
            return self._sweep_payload(project, settings)
        if kind == "prepare":
            return job_payload(self._prepare_config(project, settings), None)
        if kind == "train":
            new_run = _flag(settings, "new_run")
            return job_payload(None, self._train_config(project, settings), new_run=new_run)
        new_run = _flag(settings, "new_run")
        unknown = sorted(set(settings) - {"prepare", "train"})
        if unknown:
            raise UserError(
                f"settings of a prepare+train job hold prepare, train and new_run; not {', '.join(unknown)}"
            )
        prepare = self._prepare_config(project, _part(settings, "prepare"))
        return job_payload(prepare, self._train_config(project, _part(settings, "train")), new_run=new_run)

    def _prepare_config(self, project: str, settings: dict) -> PrepareConfig:
        base_model = settings.pop("base_model", "") or self.tab.default_model()
        shown = {name: settings.pop(name) for name in _PREPARE_WIDGETS if name in settings}
        settings.pop("project", None)
        config = self.tab.prepare_config({**shown, "project": project, "base_model": base_model})
        if settings:  # the fields without a widget, checked like every field
            config = config_from_dict(PrepareConfig, {**config_to_dict(config), **settings})
        return config

    def _train_config(self, project: str, settings: dict) -> TrainConfig:
        return self.tab.train_config({**settings, "project": project})

    def _evaluate_payload(self, settings: dict) -> dict:
        from modules.lora_training.validation import Evaluation

        unknown = sorted(set(settings) - {"run_id", "best_rule", "margin"})
        if unknown:
            raise UserError(f"settings of an evaluate job hold run_id, best_rule and margin; not {', '.join(unknown)}")
        run_id, rule = settings.get("run_id") or None, settings.get("best_rule", DEFAULT_RULE)
        margin = settings.get("margin", DEFAULT_MARGIN)
        if (run_id is not None and not isinstance(run_id, str)) or not isinstance(rule, str):
            raise UserError("run_id and best_rule must be text")
        Evaluation().choose(rule, margin)  # refused now, not by a failed job
        return {"run_id": run_id, "best_rule": rule, "margin": margin}

    def _sweep_payload(self, project: str, settings: dict) -> dict:
        from modules.lora_training.sweep import Place, check_sweep

        unknown = sorted(set(settings) - {"space", "trials", "base_model", "study"})
        if unknown:
            raise UserError(
                f"settings of a sweep job hold space, trials, base_model and study; not {', '.join(unknown)}"
            )
        texts = {name: settings.get(name, "") for name in ("space", "base_model", "study")}
        if not all(isinstance(value, str) for value in texts.values()):
            raise UserError("space, base_model and study must be text")
        return check_sweep(  # checked now, stored when the job starts
            Place(
                self.tab.config.LORA_PROJECTS_DIR,
                self.tab.config.MODELS_DIR,
                project,
                image_roots=self.tab.config.IMAGE_ROOTS,
            ),
            space_text=texts["space"],
            trials=settings.get("trials", 8),
            base_model=texts["base_model"] or self.tab.default_model(),
            study=texts["study"],
        )

    # ----- the queue's side --------------------------------------------------------------
    def check(self, kind: str, project: str, payload: dict) -> None:
        """What TrainingJobs would refuse at start, refused before the job is queued."""
        if kind == "sweep":
            return  # checked when its payload was made (the study exists)
        if kind in ("evaluate", "grid"):
            from modules.lora_training.evaluate import find_run

            find_run(self.jobs.project_paths(project), payload.get("run_id"))
            return
        if not kind_of(payload):
            raise UserError("Nothing to do: give preparation settings, training settings or both.")
        if kind != kind_of(payload):
            raise UserError(f"These are the settings of a {kind_of(payload)} job, not of a {kind} job.")
        prepare, train = self._configs(payload)
        self.jobs.check(prepare, train, resume=payload.get("resume", False), new_run=payload.get("new_run", False))

    def start(self, job: QueuedJob) -> dict:
        payload = job.payload
        if job.kind == "evaluate":
            shown = self.jobs.evaluate(job.project, **payload)
        elif job.kind == "grid":
            shown = self.jobs.comparison_grid(job.project, run_id=payload["run_id"], rows=payload["rows"])
        elif job.kind == "sweep":
            shown = self.jobs.sweep(
                job.project,
                space_text=payload.get("space", ""),
                trials=payload["trials"],
                base_model=payload["base_model"],
                study=payload["study"],
            )
        else:
            shown = self._start_training(job)
        self._job_ids[job.id] = shown["job_id"]
        return shown

    def _start_training(self, job: QueuedJob) -> dict:
        payload = job.payload
        prepare, train = self._configs(payload)
        resume, new_run = bool(payload.get("resume")), bool(payload.get("new_run"))
        # Run again (Retry, or interrupted by a restart): continue the run this job started, and no other; a
        # run stopped before its first checkpoint starts again as a new run.
        again = job.resume and job.attempts > 1 and train is not None
        if again and job.run_id is not None:
            resume = self._own_run_resumable(job)
            new_run = not resume
        elif again and not new_run and not payload.get(RUN_RECORDED) and self.jobs.can_resume(job.project):
            resume = True  # a queue file from before run ids: the project's newest run is the best guess
        store = self.tab.queue.store if getattr(self.tab, "queue", None) is not None else None
        return self.jobs.start(
            prepare_config=prepare,
            train_config=train,
            resume=resume,
            new_run=new_run and not resume,
            run_id=job.run_id if again and resume else None,  # None with resume: the project's newest run
            on_run=(lambda run_id: store.set_run(job.id, run_id)) if store is not None else None,
        )

    def _own_run_resumable(self, job: QueuedJob) -> bool:
        """Whether the run ``job`` started has a checkpoint to continue; refused when it is gone or finished."""
        from modules.lora_training.runs import list_runs

        run = {run.run_id: run for run in list_runs(self.jobs.project_paths(job.project))}.get(job.run_id)
        if run is None or run.finished:
            raise UserError(
                f"Job {job.id} trained run {job.run_id} of project {job.project!r}, which is gone or finished: "
                "queue a new training instead (Retry cannot resume it)."
            )
        return run.resumable

    def poll(self, job: QueuedJob) -> JobStatus:
        snapshot = self.jobs.snapshot()
        if snapshot.get("job_id") != self._job_ids.get(job.id):
            return JobStatus("failed", error="The job was lost: another job took its place.")
        state, message = snapshot["state"], snapshot.get("message") or ""
        if state in _RUNNING:
            return JobStatus("running", progress=_progress(snapshot), eta_seconds=snapshot.get("eta_seconds"))
        # The id stays mapped: if recording the end fails (a locked database), the next poll answers the same.
        if state == "failed":
            return JobStatus("failed", progress=_progress(snapshot), error=message, message=message)
        if state == "stopped":
            return JobStatus(
                "cancelled", progress=_progress(snapshot), message=message, result=snapshot.get("checkpoint")
            )
        result = snapshot.get("lora_path") or snapshot.get("grid")
        if state == "prepared":
            result = str(self.jobs.project_paths(job.project).images)
        return JobStatus("finished", progress=1.0, message=message, result=result)

    def stop(self, job: QueuedJob) -> None:
        self.jobs.stop()

    def busy(self) -> bool:
        return self.jobs.is_running()

    def _configs(self, payload: dict) -> tuple[PrepareConfig | None, TrainConfig | None]:
        prepare = config_from_dict(PrepareConfig, payload["prepare"]) if payload.get("prepare") else None
        train = config_from_dict(TrainConfig, payload["train"]) if payload.get("train") else None
        return prepare, train


def _grid_payload(settings: dict) -> dict:
    from modules.lora_training.comparison_grid import check_rows

    unknown = sorted(set(settings) - {"run_id", "rows"})
    if unknown:
        raise UserError(f"settings of a grid job hold run_id and rows; not {', '.join(unknown)}"[:300])
    run_id, rows = settings.get("run_id") or None, settings.get("rows", "checkpoints")
    if (run_id is not None and not isinstance(run_id, str)) or not isinstance(rows, str):
        raise UserError("run_id and rows must be text")
    check_rows(rows)  # refused now, not by a failed job
    return {"run_id": run_id, "rows": rows}


def _progress(snapshot: dict) -> float:
    if snapshot.get("total_steps"):
        return min(1.0, snapshot.get("step", 0) / snapshot["total_steps"])
    if snapshot.get("prep_total"):
        return min(1.0, snapshot.get("prep_done", 0) / snapshot["prep_total"])
    return 0.0
