"""The LoRA Training tab: layout and small handlers over TrainingJobs. All work happens in the core.

The inputs are declared once in ``form.py``; ``form_widgets.py`` builds them and maps them to field
names, ``status_view.py`` shows the running job, and "Use in Generate" asks the host's action
registry (``gestionnaire.actions``) for the Generate tab's "generate.use_lora".
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from core.errors import UserError, shown_to_user
from core.i18n import Text, shown_message, text_of, translate
from core.model_files import native_image_size
from core.page_texts import page_texts_of
from families import display_name
from model_formats.demo_models import DEMO_FLORENCE_NAME, DEMO_TAGGER_NAME
from modules.lora_training.api import TrainingApi
from modules.lora_training.caption_tools_section import CaptionToolsSection
from modules.lora_training.config import (
    PrepareConfig,
    TrainConfig,
    config_from_dict,
    default_learning_rate,
    default_text_encoder_lr,
)
from modules.lora_training.dataset.captioners import CAPTIONERS, captioner_members, resolve_florence_model
from modules.lora_training.evaluate_section import EvaluateSection
from modules.lora_training.form import config_values, preset_settings, run_plan, split_preset, widget_values
from modules.lora_training.form_widgets import FormWidgets
from modules.lora_training.jobs import interrupted_projects, resumable_config
from modules.lora_training.manifest import ProjectManifest
from modules.lora_training.preset_files import preset_names, read_preset
from modules.lora_training.project import ProjectPaths
from modules.lora_training.queue_section import QueueSection
from modules.lora_training.status_view import PageHooks, StatusView, start_job
from modules.lora_training.sweep_section import SweepSection


class LoraTrainingTab:
    def __init__(self, *, jobs, model_manager, gestionnaire, config) -> None:
        self.jobs = jobs
        self.model_manager = model_manager
        self.gestionnaire = gestionnaire
        self.actions = getattr(gestionnaire, "actions", None)  # the host's TabActions
        self.queue = getattr(gestionnaire, "queue", None)  # the server's JobRunner: jobs wait their turn there
        self.config = config

    # ----- plain functions (UI and API) ----------------------------------------------
    def model_choices(self) -> list[tuple[str, str]]:
        return [(f"{e.name} ({display_name(e.family)})", e.name) for e in self.model_manager.list_models()]

    def default_model(self) -> str | None:
        names = [value for _, value in self.model_choices()]
        for preferred in self.config.DEFAULT_MODELS_FOR_LORA.values():
            if preferred in names:
                return preferred
        return names[0] if names else None

    def family_of(self, model: str | None) -> str | None:
        return next((e.family for e in self.model_manager.list_models() if e.name == model), None)

    def default_captioner(self) -> str:
        """Florence-2 when real weights are there, else a real WD14 tagger; the demo ones write gibberish
        or colour words, so with only those the captions are the trigger word (and the .txt beside each
        photo) until the user picks a captioner."""
        model = self.caption_model()
        if model and Path(model).name != DEMO_FLORENCE_NAME:
            return "florence2"
        tagger = self.tagger_model()
        return "tags" if tagger and Path(tagger).name != DEMO_TAGGER_NAME else "none"

    def tagger_model(self) -> str | None:
        """The WD14 tagger folder to use: a real one in models/captioners/ if present, else the demo one."""
        from modules.lora_training.dataset.wd14_tagger import resolve_tagger_folder

        try:
            return str(resolve_tagger_folder(None, self.config.MODELS_DIR, demo_name=DEMO_TAGGER_NAME))
        except UserError:
            return None

    def caption_model(self) -> str | None:
        """The local Florence-2 folder to use: a real one if present, else the demo one."""
        real = Path(resolve_florence_model(None, self.config.MODELS_DIR))
        if real.is_dir():
            return str(real)
        demo = sorted((self.config.MODELS_DIR / "captioners").glob("*/config.json"))
        return str(demo[0].parent) if demo else None

    def resolution_for(self, model: str | None) -> int:
        for entry in self.model_manager.list_models():
            if entry.name == model:
                return native_image_size(entry)
        return 1024

    def prepare_config(self, values: dict) -> PrepareConfig:
        """Form values by field name (``images_dir``, ``project``, ``base_model``, ...) → a PrepareConfig."""
        raw = config_values(PrepareConfig, values)
        family = self.family_of(values.get("base_model"))
        if family:
            raw["family"] = family
        members = captioner_members(raw["captioner"]) if raw.get("captioner") in CAPTIONERS else ()
        if "florence2" in members:
            raw["caption_model"] = self.caption_model()
        if "tags" in members:
            raw["tagger_model"] = self.tagger_model()
        return config_from_dict(PrepareConfig, raw)

    def train_config(self, values: dict) -> TrainConfig:
        """Config values by field name (``project``, ``base_model`` and any options) → a TrainConfig."""
        if not values.get("base_model"):
            raise UserError(f"Choose a base model (put one into {self.config.MODELS_DIR} and click Refresh).")
        return config_from_dict(TrainConfig, values)

    def train_values(self, values: dict, extras: dict | None = None) -> dict:
        """Form values (+ a loaded preset's options the form does not show) → TrainConfig values."""
        shown = config_values(TrainConfig, values, family=self.family_of(values.get("base_model")))
        return {**(extras or {}), **shown}

    def start(
        self, *, prepare: PrepareConfig | None, train: TrainConfig | None, new_run: bool = False, resume: bool = False
    ) -> dict:
        """Start a job now when nothing runs, else queue it (without a host queue: start or refuse). Returns
        the started job's status (``queue_id`` added), or ``{"state": "queued", "queue_id", "position", ...}``."""
        if self.queue is None:
            return self.jobs.start(prepare_config=prepare, train_config=train, new_run=new_run, resume=resume)
        from modules.lora_training.queue_kinds import job_payload, kind_of

        payload = job_payload(prepare, train, new_run=new_run, resume=resume)
        project = (train or prepare).project if (train or prepare) else ""
        row = self.queue.enqueue(kind_of(payload) or "train", project, payload, one_per_project=True)
        return self._shown_job(row["id"], started=row["started"])

    def evaluate(self, project: str, *, run_id: str | None, best_rule: str, margin) -> dict:
        """Evaluate a run (:meth:`TrainingJobs.evaluate`): now when nothing runs, else in its turn."""
        from modules.lora_training.validation import Evaluation

        Evaluation().choose(best_rule, margin)  # refused with its own message, not as a queue setting
        if self.queue is None:
            return self.jobs.evaluate(project, run_id=run_id, best_rule=best_rule, margin=margin)
        return self.submit("evaluate", project, {"run_id": run_id, "best_rule": best_rule, "margin": margin})

    def comparison_grid(self, project: str, *, run_id: str | None, rows: str) -> dict:
        """Draw a run's comparison grid (:meth:`TrainingJobs.comparison_grid`): now when nothing runs, else
        in its turn (it renders on the device)."""
        from modules.lora_training.comparison_grid import check_rows

        check_rows(rows)  # refused with its own message, not as a queue setting
        if self.queue is None:
            return self.jobs.comparison_grid(project, run_id=run_id, rows=rows)
        return self.submit("grid", project, {"run_id": run_id, "rows": rows})

    def submit(self, kind: str, project: str, settings: dict) -> dict:
        """A queued job of ``kind`` from its settings (as ``/queue_add`` takes them), shown as :meth:`start`."""
        row = self.queue.submit(kind, project, settings, one_per_project=True)
        return self._shown_job(row["id"], started=row["started"])

    def _shown_job(self, queue_id: int, *, started: dict | None) -> dict:
        """What a click shows of a queued job: the training job's status once it runs, else its place."""
        row = self.queue.store.get(queue_id)
        if started is None and row.state == "running":
            started = self.jobs.snapshot()
        if started is not None:
            return {**started, "queue_id": row.id}
        shown = {"job_id": 0, "queue_id": row.id, "state": row.state, "running": False}
        return {**shown, "position": row.position, "kind": row.kind, "project": row.project}

    def save_checkpoint_lora(self, project: str, *, name: str, step: int | None, run_id: str | None, overwrite: bool):
        """A run's checkpoint written as a LoRA (refused while a job holds the device and the files)."""
        from modules.lora_training.checkpoint_lora import save_checkpoint_as_lora

        if self.jobs.is_running():
            raise UserError("A job is running; save the checkpoint once it has finished or stopped.")
        path = save_checkpoint_as_lora(
            project,
            projects_dir=self.config.LORA_PROJECTS_DIR,
            models_dir=self.config.MODELS_DIR,
            loras_dir=self.config.LORAS_DIR,
            name=name,
            run_id=run_id,
            step=step,
            overwrite=overwrite,
        )
        self.jobs.lora_version += 1  # the Generate tab lists it
        return path

    def resume(self, project: str) -> dict:
        """Continue the project's stopped or interrupted run: its queued job again (Retry) when the queue
        holds the one that stopped, else a new job that resumes."""
        from modules.lora_training.runs import run_to_resume

        config = resumable_config(self.config.LORA_PROJECTS_DIR, project)
        earlier = self._stopped_job(
            project, run_id=run_to_resume(ProjectPaths.for_project(self.config.LORA_PROJECTS_DIR, project)).run_id
        )
        if earlier is None:
            return self.start(prepare=None, train=config, resume=True)
        return self._shown_job(self.queue.retry(earlier.id, one_per_project=True).id, started=None)

    def _stopped_job(self, project: str, *, run_id: str):
        """The project's newest queued training that ran run ``run_id`` and stopped (cancelled or
        interrupted), if any: retried, it continues that run."""
        if self.queue is None:
            return None
        ended = [j for j in self.queue.list_jobs() if j.project == project and j.kind in ("train", "prepare+train")]
        ended = [j for j in ended if j.state not in ("queued", "running") and j.run_id == run_id]
        newest = ended[0] if ended else None  # the others come newest first
        return (
            newest if newest is not None and newest.state in ("cancelled", "interrupted") and newest.attempts else None
        )

    def estimate(self, values: dict, extras: dict, *, strings: dict) -> str:
        from modules.lora_training.estimate import estimate_run

        config = self.train_config({**self.train_values(values, extras), "project": "estimate"})
        common = {"models_dir": self.config.MODELS_DIR, "resolution": int(values.get("resolution") or 1024)}
        # Counting the step on the meta device takes no device: done first, kept for the timed call.
        estimate = estimate_run(config, **common, timing=False, counted=self.jobs.counted_steps)
        # The timing runs on the device: only while no job holds it, and no queued job starts meanwhile.
        lent = self.queue.device_lent("estimate") if self.queue is not None else contextlib.nullcontext(True)
        with lent as free:
            busy = not free or self.jobs.is_running()
            if not busy:
                estimate = estimate_run(config, **common, timing=True, counted=self.jobs.counted_steps)
        return estimate.describe() + ("\n\n" + translate("estimate_time_busy", strings) if busy else "")

    def prepared_gallery(self, project: str) -> list[tuple[str, str]]:
        try:
            paths = ProjectPaths.for_project(self.config.LORA_PROJECTS_DIR, project)
            manifest = ProjectManifest.read(paths)
            images = manifest.prepared_images(paths) if manifest else []
        except UserError:
            return []
        from modules.lora_training.dataset.masks import gallery_image

        items = []
        for image in images:
            caption_file = paths.images / image.caption_file
            caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
            mask = paths.images / image.mask if image.mask else None
            shown = gallery_image(paths.images / image.image, mask, previews=paths.cache / "mask_previews")
            items.append((str(shown), caption))
        return items

    def caption_tool(self, project: str, *, action: str, tag: str = "", replacement: str = "") -> dict:
        """A caption tool on the project's prepared captions (refused while a job may be reading them)."""
        from modules.lora_training.caption_tools import run_caption_tool

        paths = ProjectPaths.for_project(self.config.LORA_PROJECTS_DIR, project)
        if action not in ("frequencies", "search") and self.jobs.is_running():
            raise UserError("A job is running; change the captions once it has finished or stopped.")
        return run_caption_tool(paths, action=action, tag=tag, replacement=replacement).as_dict()

    def save_caption(self, project: str, image_path: str, caption: str) -> str:
        from core.atomic import write_text_atomic

        paths = ProjectPaths.for_project(self.config.LORA_PROJECTS_DIR, project)
        image = Path(image_path).resolve()
        if image.parent != paths.images.resolve() or not image.is_file():
            raise UserError("That image is not part of this project.")
        write_text_atomic(image.with_suffix(".txt"), caption.strip() + "\n")
        return image.name

    def presets(self) -> list[str]:
        return preset_names(self.config.LORA_PROJECTS_DIR / ".presets")

    def read_preset(self, name: str) -> dict:
        return read_preset(name, user_dir=self.config.LORA_PROJECTS_DIR / ".presets")

    def write_preset(self, name: str, *, resolution: int | None, options: dict) -> str:
        from modules.lora_training.names import validate_name
        from modules.lora_training.project import write_json

        name = validate_name(name, what="Preset name")
        config_from_dict(TrainConfig, {"project": "x", "base_model": "x", **options})  # validates the values
        preset = {"options": options, "note": "Saved from the LoRA Training tab."}
        if resolution is not None:
            preset = {"resolution": int(resolution), **preset}
        write_json(self.config.LORA_PROJECTS_DIR / ".presets" / f"{name}.json", preset)
        return name

    def upload_images(self, project: str, files: list[tuple[str, str]]) -> tuple[str, str]:
        """Copy photos (or .zip archives of photos) sent from the browser into the project's source/ folder;
        returns that folder (to prepare from) and a summary."""
        from modules.lora_training.dataset.uploads import copy_uploads

        paths = ProjectPaths.for_project(self.config.LORA_PROJECTS_DIR, project)
        snapshot = self.jobs.snapshot()
        if snapshot.get("running") and snapshot.get("project") == paths.name:
            raise UserError(f"A job is running on project {paths.name}; add photos when it has ended.")
        limit = self.config.MAX_IMAGE_FILE_MB * 2**20
        result = copy_uploads([(Path(p), name) for p, name in files], folder=paths.source, max_file_bytes=limit)
        return str(result.folder), result.summary()

    def bucket_sizes_for(self, values: dict) -> tuple[list[int] | None, bool]:
        """Images per bucket of the prepared project (exact), else about how many photos the chosen folder
        holds (one bucket); ``(None, False)`` when neither is known."""
        from modules.lora_training.dataset.scan import count_image_files, image_folder

        try:
            manifest = ProjectManifest.read(
                ProjectPaths.for_project(self.config.LORA_PROJECTS_DIR, values.get("project"))
            )
        except UserError:
            manifest = None
        if manifest:
            return manifest.bucket_sizes(), True
        try:
            folder = image_folder(values.get("images_dir"), roots=self.config.IMAGE_ROOTS)
            count = count_image_files(folder, subfolders=values.get("include_subfolders") is True)
        except (UserError, OSError):
            return None, False
        return ([count] if count else None), False

    def plan_text(self, values: dict, *, t) -> str:
        sizes, exact = self.bucket_sizes_for(values)
        return run_plan(sizes, values, t=t, exact=exact)

    def use_lora_payload(self, strings: dict) -> dict:
        """What "Use in Generate" hands the Generate tab: the last run's model, LoRA and trigger word."""
        snapshot = self.jobs.snapshot()
        lora = snapshot.get("lora_path")
        if not lora:
            raise shown_to_user(translate("no_lora_yet", strings))
        trigger = snapshot.get("trigger")
        return {
            "model": snapshot.get("base_model"),
            "lora": str(Path(lora).relative_to(self.config.LORAS_DIR)),
            "prompt": f"{trigger}, " if trigger else None,
        }

    # ----- UI ------------------------------------------------------------------------
    def create_tab(self, strings: dict) -> None:
        def t(key, **values):
            return text_of(strings, key, **values)

        texts = page_texts_of(strings)

        default_model = self.default_model()
        initial = {"base_model": default_model, "captioner": self.default_captioner()}
        initial["resolution"] = self.resolution_for(default_model)
        roots = ", ".join(map(str, self.config.IMAGE_ROOTS))
        form = FormWidgets(
            t,
            initial=initial,
            choices={"base_model": self.model_choices},
            family_of=self.family_of,
            button=texts.button,
            # Each label stays one short line; its explanation ("<field>_info" in the locale) goes beneath it.
            info={
                **{key.removesuffix("_info"): t(key) for key in strings if key.endswith("_info")},
                "images_dir": t("images_roots", roots=roots),
            },
        )
        status = StatusView(jobs=self.jobs, strings=strings)
        with gr.Tab(t("tab_title"), id="lora_training"):
            texts.markdown(t("intro"))
            interrupted = self.interrupted()
            banner = texts.markdown(
                t("interrupted", projects=", ".join(interrupted)), visible=bool(interrupted), elem_id="lt-interrupted"
            )
            with gr.Row():
                with gr.Column(scale=3):
                    page = self._build_controls(form, t, texts=texts)
                    page.banner = banner
                with gr.Column(scale=2):
                    status.build()
            queue = self._build_queue(t, texts=texts, strings=strings)
            self._build_caption_editor(page, t, button=texts.button)
            caption_tools = CaptionToolsSection(self, strings=strings)
            caption_tools.build(t, texts=texts)
            evaluation = EvaluateSection(self, strings=strings)
            evaluation.build(t, texts=texts)
            self.sweeps = SweepSection(self, strings=strings)
            self.sweeps.build(t, texts=texts)
            TrainingApi(self).register()
        form.wire_visibility()
        self._wire_runs(page, form, strings=strings)
        evaluation.wire(form["project"])
        self.sweeps.wire(form["project"], base_model=form["base_model"], new_run=page.new_run)
        caption_tools.wire(form["project"], gallery=page.prepared)
        self._wire_presets(page, form, strings=strings)
        self._wire_captions(page, form, strings=strings)
        if queue is not None:
            queue.wire()
        status.wire(page=self._page_hooks(page, form, t=t, evaluation=evaluation, queue=queue))
        self._wire_plan(page, form, strings=strings)
        self._wire_upload(page, form, strings=strings)
        self._request_generate(page, status=status, strings=strings)

    def _build_queue(self, t, *, texts, strings) -> QueueSection | None:
        if self.queue is None:
            return None
        config = self.config
        queue = QueueSection(self.queue, strings=strings, served=config.served_folders(), loras=config.LORAS_DIR)
        queue.build(t, button=texts.button)
        return queue

    def _build_controls(self, form: FormWidgets, t, *, texts) -> SimpleNamespace:
        button = texts.button
        page = SimpleNamespace(extras=gr.State({}))  # a loaded preset's options that have no widget
        page.upload = gr.File(
            file_count="multiple",
            file_types=["image", ".zip"],
            label=t("upload"),
            elem_id="lt-upload",
            height=110,
        )
        form.build("dataset")
        page.plan = texts.markdown(Text(lambda: self.plan_text(form.initial, t=t)), elem_id="lt-plan")
        with gr.Row():
            page.preset = gr.Dropdown(self.presets(), value=None, label=t("preset"), elem_id="lt-preset", scale=3)
            page.load_preset = button(t("load_preset"), scale=1)
        form.build("schedule")
        with form.section("advanced"), gr.Row():
            page.preset_name = gr.Textbox(label=t("preset_name"), elem_id="lt-preset-name", scale=3)
            page.save_preset = button(t("save_preset"), scale=1)
        page.estimate_button = button(t("estimate"))
        page.estimate = gr.Markdown(elem_id="lt-estimate")
        with gr.Row():
            page.prepare = button(t("prepare"), elem_id="lt-prepare")
            page.train = button(t("prepare_and_train"), variant="primary", elem_id="lt-train")
            page.stop = button(t("stop"), variant="stop", elem_id="lt-stop")
            page.resume = button(t("resume"), elem_id="lt-resume")
            page.new_run = gr.Checkbox(
                value=False, label=t("new_run"), info=t("new_run_info"), elem_id="lt-new-run", min_width=190
            )
            page.use = button(t("use_in_generate"), elem_id="lt-use")
        return page

    def _build_caption_editor(self, page: SimpleNamespace, t, *, button) -> None:
        page.prepared = gr.Gallery(label=t("prepared"), columns=6, height=260, elem_id="lt-prepared", interactive=False)
        with gr.Row():
            page.selected_image = gr.State(None)
            page.caption = gr.Textbox(label=t("caption"), lines=2, scale=4, elem_id="lt-caption")
            page.save_caption = button(t("save_caption"), scale=1)

    def _wire_runs(self, page: SimpleNamespace, form: FormWidgets, *, strings: dict) -> None:
        def started(start) -> None:
            start_job(start, strings)

        def on_prepare(data: dict) -> None:
            return started(lambda: self.start(prepare=self.prepare_config(form.values(data)), train=None))

        def on_train(data: dict) -> None:
            values = form.values(data)

            def start():
                prepare = self.prepare_config(values)
                train = self.train_config(self.train_values(values, data[page.extras]))
                return self.start(prepare=prepare, train=train, new_run=bool(data[page.new_run]))

            return started(start)

        def on_estimate(data: dict) -> str:
            try:
                text = self.estimate(form.values(data), data[page.extras], strings=strings)
            except UserError as exc:
                return shown_message(exc, strings)
            return "\n\n".join(shown_message(part, strings) for part in text.split("\n\n"))

        private = {"api_visibility": "private"}
        page.prepare.click(on_prepare, inputs=form.inputs, **private)
        page.train.click(on_train, inputs={*form.inputs, page.new_run, page.extras}, **private)
        page.stop.click(lambda: gr.Info(shown_message(self.jobs.stop(), strings)), **private)
        page.resume.click(lambda name: started(lambda: self.resume(name)), inputs=[form["project"]], **private)
        page.estimate_button.click(on_estimate, inputs={*form.inputs, page.extras}, outputs=[page.estimate], **private)
        form["base_model"].change(
            self.resolution_for, inputs=[form["base_model"]], outputs=[form["resolution"]], **private
        )
        # Each optimizer has its usual learning rate (Prodigy ~1.0, Lion a third of AdamW's).
        form["optimizer"].input(
            lambda name: (default_learning_rate(name), default_text_encoder_lr(name, default_learning_rate(name))),
            inputs=[form["optimizer"]],
            outputs=[form["learning_rate"], form["text_encoder_lr"]],
            **private,
        )

    def _wire_upload(self, page: SimpleNamespace, form: FormWidgets, *, strings) -> None:
        def on_upload(project, files):
            if not files:
                return gr.skip(), gr.skip()
            pairs = [
                (getattr(f, "path", f), getattr(f, "orig_name", None) or Path(getattr(f, "path", f)).name)
                for f in files
            ]
            try:
                folder, summary = self.upload_images(project, pairs)
            except UserError as exc:
                raise shown_to_user(exc, strings) from exc
            gr.Info(shown_message(summary, strings))
            return folder, None

        page.upload.upload(
            on_upload,
            inputs=[form["project"], page.upload],
            outputs=[form["images_dir"], page.upload],
            api_name="upload_images",
        )

    def interrupted(self) -> list[str]:
        return interrupted_projects(self.config.LORA_PROJECTS_DIR, self.config.LORAS_DIR)

    def _page_hooks(self, page: SimpleNamespace, form: FormWidgets, *, t, evaluation, queue) -> PageHooks:
        """The page follows the server: the job's project and settings when a page is opened or reloaded,
        the prepared gallery, buttons enabled only when they can act, the interrupted-runs banner."""

        def on_change(snapshot: dict, *, opened: bool) -> dict:
            state, running = snapshot["state"], snapshot.get("running", False)
            resumable = state == "stopped" and snapshot.get("kind") not in (
                "evaluate",
                "grid",
                "sweep",
            )  # nothing to resume
            interrupted = self.interrupted()
            updates = {
                page.stop: gr.update(interactive=running),
                page.resume: gr.update(interactive=not running and (resumable or bool(interrupted))),
                page.use: gr.update(interactive=state == "finished" and bool(snapshot.get("lora_path"))),
                page.banner: gr.update(
                    value=t("interrupted", projects=", ".join(interrupted)), visible=bool(interrupted)
                ),
            }
            if state in ("prepared", "training", "finished"):
                updates[page.prepared] = self.prepared_gallery(snapshot["project"])
            if opened and state != "idle":
                updates |= form.updates(widget_values({"project": snapshot["project"], **snapshot.get("settings", {})}))
            if state in ("evaluated", "finished", "stopped") or (opened and state != "idle"):
                updates |= evaluation.view(snapshot["project"], grid=snapshot.get("grid"))
            return updates

        outputs = [page.stop, page.resume, page.use, page.banner, page.prepared, *form.widgets.values()]
        outputs += evaluation.outputs + ([queue.table] if queue is not None else [])
        outputs += [self.sweeps.page.summary, self.sweeps.page.table]
        tick = queue.tick if queue is not None else None
        return PageHooks(
            outputs=outputs, on_change=on_change, plots=evaluation.plots, tick=tick, follow=self.sweeps.follow
        )

    def _wire_plan(self, page: SimpleNamespace, form: FormWidgets, *, strings: dict) -> None:
        """Keep the images x repeats x epochs arithmetic (and the checkpoint/sample cadence) current."""
        names = ("images_dir", "include_subfolders", "project", "epochs", "repeats", "batch_size", "steps")
        names += ("gradient_accumulation", "save_every_steps", "sample_every_steps", "reg_ratio")

        def plan(data: dict) -> str:
            return self.plan_text(form.values(data), t=lambda key, **kw: translate(key, strings, **kw))

        gr.on(
            triggers=[form[name].change for name in names],
            fn=plan,
            inputs=form.inputs,
            outputs=[page.plan],
            api_visibility="private",
            show_progress="hidden",
        )
        page_texts_of(strings).refresh(plan, inputs=form.inputs, outputs=[page.plan])

    def _wire_presets(self, page: SimpleNamespace, form: FormWidgets, *, strings) -> None:
        def t(key, **values):
            return translate(key, strings, **values)

        def on_load(name: str) -> dict:
            if not name:
                return {}
            preset = self.read_preset(name)
            values, extras = split_preset(preset)
            message = t("preset_loaded", name=name, note=shown_message(preset.get("note", ""), strings))
            return {**form.updates(values), page.extras: extras, page.estimate: message}

        def on_save(data: dict) -> tuple:
            values = form.values(data)
            family = self.family_of(values.get("base_model"))
            resolution, options = preset_settings(values, data[page.extras], family=family)
            try:
                saved = self.write_preset(data[page.preset_name], resolution=resolution, options=options)
            except UserError as exc:
                raise shown_to_user(exc, strings) from exc
            return gr.Dropdown(choices=self.presets(), value=saved), t("preset_saved", name=saved)

        page.load_preset.click(
            on_load,
            inputs=[page.preset],
            outputs=[*form.widgets.values(), page.extras, page.estimate],
            api_visibility="private",
        )
        page.save_preset.click(
            on_save,
            inputs={*form.inputs, page.extras, page.preset_name},
            outputs=[page.preset, page.estimate],
            api_visibility="private",
        )

    def _wire_captions(self, page: SimpleNamespace, form: FormWidgets, *, strings) -> None:
        def t(key, **values):
            return translate(key, strings, **values)

        def on_select(evt: gr.SelectData, gallery):
            item = gallery[evt.index]
            image = item[0] if isinstance(item, list | tuple) else item.get("image", {}).get("path")
            path = image if isinstance(image, str) else getattr(image, "path", None) or image.get("path")
            caption = item[1] if isinstance(item, list | tuple) else item.get("caption", "")
            return path, caption

        def on_save(name, image, caption):
            if not image:
                raise shown_to_user(t("no_image_selected"))
            # The gallery shows a cached copy (of the crop, or of its mask overlay): the crop has the same name.
            try:
                paths = ProjectPaths.for_project(self.config.LORA_PROJECTS_DIR, name)
                saved = self.save_caption(name, str(paths.images / Path(image).name), caption)
            except UserError as exc:
                raise shown_to_user(exc, strings) from exc
            gr.Info(t("caption_saved", image=saved))
            return self.prepared_gallery(name)

        page.prepared.select(
            on_select, inputs=[page.prepared], outputs=[page.selected_image, page.caption], api_visibility="private"
        )
        page.save_caption.click(
            on_save,
            inputs=[form["project"], page.selected_image, page.caption],
            outputs=[page.prepared],
            api_visibility="private",
        )

    def _request_generate(self, page: SimpleNamespace, *, status: StatusView, strings: dict) -> None:
        """ "Use in Generate" and the LoRA lists' refresh go through the host's action registry."""
        if self.actions is None:
            return
        self.actions.request(
            "generate.use_lora",
            event=page.use.click,
            payload=lambda: self.use_lora_payload(strings),
            unavailable=text_of(strings, "generate_unavailable"),
        )
        self.actions.request(
            "generate.refresh_loras",
            event=status.lora_version.change,
            payload=lambda: {"model": self.model_manager.loaded_model},
        )
