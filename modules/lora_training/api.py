"""The LoRA Training tab's API endpoints (``/prepare_dataset``, ``/train_lora``, ...).

Their parameters are field names of the form (``form.py``), so a call takes the same path to a
config as the page: ``LoraTrainingTab.prepare_config`` / ``train_config`` on a dict keyed by field.
"""

from __future__ import annotations

import gradio as gr

from core.errors import UserError, shown_to_user
from modules.lora_training.config import PrepareConfig, config_from_dict, config_to_dict


def flag(name: str, value) -> bool:
    """A true/false API parameter; a string such as "no" is refused rather than read as true."""
    if not isinstance(value, bool):
        raise UserError(f"{name} must be true or false; got {value!r}")
    return value


def options_dict(options) -> dict:
    """The API's ``options``: an object of config fields (null means none)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise UserError(
            f'options must be an object of training options such as {{"steps": 500}}; got {options!r}'[:300]
        )
    return dict(options)


_PREPARE_INPUTS = ("images_dir", "project", "trigger", "base_model", "captioner", "caption_task", "resolution")


def _prepare_options(options) -> dict:
    """``/prepare_dataset``'s ``options``: preparation settings that have no input of their own."""
    import dataclasses

    chosen = options_dict(options)
    names = {f.name for f in dataclasses.fields(PrepareConfig)} - {*_PREPARE_INPUTS, "include_subfolders"}
    unknown = sorted(set(chosen) - names)
    if unknown:
        raise UserError(
            f"options holds names that are not preparation settings without an input of their own: "
            f"{', '.join(unknown)}"[:300]
        )
    return chosen


def _text(name: str, value) -> str:
    if not isinstance(value, str):
        raise UserError(f"{name} must be text; got {value!r}"[:300])
    return value.strip()


class TrainingApi:
    def __init__(self, tab) -> None:
        self.tab = tab

    def register(self) -> None:
        gr.api(self.prepare_dataset, api_name="prepare_dataset")
        gr.api(self.train_lora, api_name="train_lora")
        gr.api(self.stop_training, api_name="stop_training", queue=False)
        gr.api(self.training_status, api_name="training_status", queue=False)
        gr.api(self.resume_training, api_name="resume_training")
        gr.api(self.evaluate_lora, api_name="evaluate_lora")
        gr.api(self.save_checkpoint_lora, api_name="save_checkpoint_lora")
        gr.api(self.comparison_grid, api_name="comparison_grid")
        gr.api(self.caption_tools, api_name="caption_tools")
        gr.api(self.sweep_start, api_name="sweep_start")
        gr.api(self.sweep_status, api_name="sweep_status", queue=False)
        gr.api(self.sweep_train_best, api_name="sweep_train_best")

    def prepare_dataset(
        self,
        images_dir: str,
        project: str,
        trigger: str,
        base_model: str = "",
        captioner: str = "none",
        caption_task: str = "<DETAILED_CAPTION>",
        resolution: int = 1024,
        include_subfolders: bool = False,
        options: dict | None = None,
    ) -> dict:
        """Start preparing a folder of images (crop to buckets, caption, add the trigger word). `captioner` is
        florence2, tags (a WD14 tagger), florence2+tags or none; `options` holds other preparation fields,
        e.g. the tagger's {"tag_threshold": 0.4, "max_tags": 20, "exclude_tags": "solo"}."""
        values = {"images_dir": images_dir, "project": project, "trigger": trigger, "captioner": captioner}
        values |= {"caption_task": caption_task, "resolution": resolution, "include_subfolders": include_subfolders}
        try:
            chosen = _prepare_options(options)
            config = self.tab.prepare_config({**values, "base_model": base_model or self.tab.default_model()})
            if chosen:  # checked like every field, whether or not the chosen captioner reads them
                config = config_from_dict(PrepareConfig, {**config_to_dict(config), **chosen})
            return self.tab.start(prepare=config, train=None)
        except UserError as exc:
            raise shown_to_user(exc) from exc

    def train_lora(
        self,
        images_dir: str,
        project: str,
        trigger: str,
        base_model: str,
        options: dict | None = None,
        prepare: bool = True,
        captioner: str = "none",
        resolution: int = 1024,
        include_subfolders: bool = False,
        new_run: bool = False,
    ) -> dict:
        """Prepare (optional) and train a LoRA in the background. `options` holds TrainConfig fields;
        `new_run` starts a new run even when a stopped one of the project could be resumed."""
        values = {"images_dir": images_dir, "project": project, "trigger": trigger, "base_model": base_model}
        values |= {"captioner": captioner, "resolution": resolution, "include_subfolders": include_subfolders}
        try:
            prepare_config = self.tab.prepare_config(values) if flag("prepare", prepare) else None
            train_values = {"project": project or "", "base_model": base_model, **options_dict(options)}
            train_config = self.tab.train_config(train_values)
            return self.tab.start(prepare=prepare_config, train=train_config, new_run=flag("new_run", new_run))
        except UserError as exc:
            raise shown_to_user(exc) from exc

    def stop_training(self) -> str:
        """Stop the running job after its current step, keeping a resumable checkpoint."""
        return self.tab.jobs.stop()

    def training_status(self) -> dict:
        """The current (or last) job: state, step, loss, ETA, log, samples, LoRA path."""
        return self.tab.jobs.snapshot()

    def evaluate_lora(
        self, project: str, run_id: str = "", best_rule: str = "validation_loss", margin: float = 0.02
    ) -> dict:
        """Measure a run's base model and kept checkpoints again (held-out loss; CLIP figures when a CLIP model
        is in models/clip/) and draw its comparison grid, in the background; `/training_status` follows it.
        `best_rule` is validation_loss or subject_similarity (prompt adherence within `margin` of the base)."""
        try:
            return self.tab.evaluate(
                _text("project", project),
                run_id=_text("run_id", run_id) or None,
                best_rule=_text("best_rule", best_rule),
                margin=margin,
            )
        except UserError as exc:
            raise shown_to_user(exc) from exc

    def comparison_grid(self, project: str, run_id: str = "", rows: str = "checkpoints") -> dict:
        """Render a run's comparison grid in the background (a queued job: at once when nothing runs, else in
        its turn): rows = checkpoints, or LoRA weights 0, 0.5, 0.75
        and 1 of the best checkpoint; columns = the prompt panel; one seed. `/training_status`'s `grid` names
        the PNG when it is done."""
        try:
            return self.tab.comparison_grid(
                _text("project", project), run_id=_text("run_id", run_id) or None, rows=_text("rows", rows)
            )
        except UserError as exc:
            raise shown_to_user(exc) from exc

    def save_checkpoint_lora(
        self, project: str, name: str, step: int = -1, run_id: str = "", overwrite: bool = False
    ) -> str:
        """Write a run's checkpoint as a LoRA in loras/ (both files): the best by validation (step -1) or `step`."""
        try:
            if not isinstance(step, int) or isinstance(step, bool) or not -1 <= step <= 10**6:
                raise UserError(f"step must be a whole number from 0 to 1000000, or -1 for the best; got {step!r}")
            path = self.tab.save_checkpoint_lora(
                _text("project", project),
                name=_text("name", name),
                step=None if step == -1 else step,
                run_id=_text("run_id", run_id) or None,
                overwrite=flag("overwrite", overwrite),
            )
            return path.name
        except UserError as exc:
            raise shown_to_user(exc) from exc

    def caption_tools(self, project: str, action: str = "frequencies", tag: str = "", replacement: str = "") -> dict:
        """The prepared captions' tag frequencies, or an action across all of them: add, remove or replace
        (`tag` -> `replacement`) a tag, prefix or suffix text (`replacement`), search (`tag`), undo. The
        answer holds the message, how many captions changed, the frequencies and the search matches."""
        try:
            return self.tab.caption_tool(
                _text("project", project),
                action=_text("action", action),
                tag=tag,  # text checks per action, in caption_tools
                replacement=replacement,
            )
        except UserError as exc:
            raise shown_to_user(exc) from exc

    def resume_training(self, project: str) -> dict:
        """Continue a stopped or interrupted run from its newest checkpoint."""
        try:
            return self.tab.resume(project)
        except UserError as exc:
            raise shown_to_user(exc) from exc

    def sweep_start(self, project: str, base_model: str, space: str, trials: int = 8, study: str = "") -> dict:
        """Start a hyper-parameter sweep in the background (`/training_status` follows it): `space` is the
        search space as JSON (README, "Sweeps"), `trials` the budget; `study` names the study (empty: a new
        one named by the time; an existing name continues it)."""
        try:
            return self.tab.sweeps.start(
                _text("project", project),
                base_model=_text("base_model", base_model),
                space_text=_text("space", space),
                trials=trials,
                study=_text("study", study),
            )
        except UserError as exc:
            raise shown_to_user(exc) from exc

    def sweep_status(self, project: str, study: str = "") -> dict:
        """A study's trials (number, state, params, value, pruned_at_step, worker, error), counts, parameter
        importance, best trial and parallel-coordinates PNG (`plot`); `study` empty: the project's newest."""
        try:
            return self.tab.sweeps.status(_text("project", project), _text("study", study))
        except UserError as exc:
            raise shown_to_user(exc) from exc

    def sweep_train_best(self, project: str, study: str = "", new_run: bool = False) -> dict:
        """Train the full LoRA with the best trial's parameters (a training job, as `/train_lora` starts)."""
        try:
            return self.tab.sweeps.train_best(
                _text("project", project), _text("study", study), new_run=flag("new_run", new_run)
            )
        except UserError as exc:
            raise shown_to_user(exc) from exc
