"""The LoRA Training tab: widgets and polling over TrainingJobs. All work happens in the core."""

from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr
import pandas as pd

from core.errors import UserError
from core.i18n import translate
from core.model_files import native_image_size
from modules.lora_training.config import (
    LORA_TARGETS,
    LR_SCHEDULERS,
    OPTIMIZERS,
    PRECISIONS,
    QUANTIZATIONS,
    PrepareConfig,
    TrainConfig,
    config_from_dict,
    default_learning_rate,
    default_text_encoder_lr,
)
from modules.lora_training.dataset.captioners import CAPTIONERS, FLORENCE_TASKS, resolve_florence_model
from modules.lora_training.jobs import interrupted_projects, resumable_config
from modules.lora_training.preset_files import preset_names, read_preset
from modules.lora_training.project import ProjectPaths, read_json

log = logging.getLogger(__name__)

# Training options shown as widgets, in the order the handlers receive them.
OPTION_FIELDS = (
    "epochs",
    "steps",
    "learning_rate",
    "batch_size",
    "rank",
    "alpha",
    "train_text_encoder",
    "text_encoder_lr",
    "optimizer",
    "lr_scheduler",
    "lr_warmup_steps",
    "mixed_precision",
    "gradient_checkpointing",
    "save_every_steps",
    "sample_every_steps",
    "seed",
    "caption_dropout",
    "flip",
    "min_snr_gamma",
    "noise_offset",
    "lora_targets",
    "base_quantization",
    "zero_terminal_snr",
)


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def options_from_widgets(values: dict) -> dict:
    """Widget values → TrainConfig options (0 steps means "use epochs")."""
    options = {}
    for key, value in values.items():
        if value is None or value == "":
            continue
        if key == "steps" and not value:
            continue
        options[key] = value
    return options


def flag(name: str, value) -> bool:
    """A true/false API parameter; a string such as "no" is refused rather than read as true."""
    if not isinstance(value, bool):
        raise UserError(f"{name} must be true or false; got {value!r}")
    return value


def options_dict(options) -> dict:
    """The API's ``options``: an object of TrainConfig fields (null means none)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise UserError(
            f'options must be an object of training options such as {{"steps": 500}}; got {options!r}'[:300]
        )
    return dict(options)


def sample_prompt_list(text: str, class_word: str) -> tuple[str, ...]:
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        prompts = ["photo of {trigger} " + class_word if class_word else "{trigger}"]
    return tuple(p.replace("{class}", class_word or "") for p in prompts)


class LoraTrainingTab:
    def __init__(self, *, jobs, model_manager, gestionnaire, config) -> None:
        self.jobs = jobs
        self.model_manager = model_manager
        self.gestionnaire = gestionnaire
        self.config = config

    # ----- plain functions (UI and API) ----------------------------------------------
    def model_choices(self) -> list[tuple[str, str]]:
        return [(f"{e.name} ({e.family.upper()})", e.name) for e in self.model_manager.list_models()]

    def default_model(self) -> str | None:
        names = [value for _, value in self.model_choices()]
        for preferred in (self.config.DEFAULT_SDXL_MODEL_FOR_LORA, self.config.DEFAULT_FLUX_MODEL_FOR_LORA):
            if preferred in names:
                return preferred
        return names[0] if names else None

    def default_captioner(self) -> str:
        return "florence2" if self.caption_model() else "none"

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

    def prepare_config(
        self, *, images_dir, project, trigger, base_model, captioner, caption_task, resolution, include_subfolders=False
    ):
        family = next((e.family for e in self.model_manager.list_models() if e.name == base_model), "sdxl")
        return config_from_dict(
            PrepareConfig,
            {
                "project": project or "",
                "images_dir": images_dir or "",
                "trigger": trigger or "",
                "family": family,
                "resolution": resolution,
                "captioner": captioner,
                "caption_task": caption_task,
                "caption_model": self.caption_model() if captioner == "florence2" else None,
                "include_subfolders": include_subfolders,
            },
        )

    def train_config(self, *, project, base_model, options: dict) -> TrainConfig:
        if not base_model:
            raise UserError(f"Choose a base model (put one into {self.config.MODELS_DIR} and click Refresh).")
        values = {"project": project or "", "base_model": base_model, **options}
        return config_from_dict(TrainConfig, values)

    def start(self, *, prepare: PrepareConfig | None, train: TrainConfig | None, new_run: bool = False) -> dict:
        return self.jobs.start(prepare_config=prepare, train_config=train, new_run=new_run)

    def resume(self, project: str) -> dict:
        config = resumable_config(self.config.LORA_PROJECTS_DIR, project)
        return self.jobs.start(train_config=config, resume=True)

    def prepared_gallery(self, project: str) -> list[tuple[str, str]]:
        try:
            paths = ProjectPaths.for_project(self.config.LORA_PROJECTS_DIR, project)
        except UserError:
            return []
        manifest = read_json(paths.manifest) or {}
        items = []
        for entry in manifest.get("images", []):
            if entry.get("status") != "used":
                continue
            caption_file = paths.images / entry["caption_file"]
            caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
            items.append((str(paths.images / entry["image"]), caption))
        return items

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

    def write_preset(self, name: str, *, resolution: int, options: dict) -> str:
        from modules.lora_training.names import validate_name
        from modules.lora_training.project import write_json

        name = validate_name(name, what="Preset name")
        config_from_dict(TrainConfig, {"project": "x", "base_model": "x", **options})  # validates the values
        write_json(
            self.config.LORA_PROJECTS_DIR / ".presets" / f"{name}.json",
            {"resolution": int(resolution), "options": options, "note": "Saved from the LoRA Training tab."},
        )
        return name

    # ----- UI ------------------------------------------------------------------------
    def create_tab(self, strings: dict) -> None:
        def t(key, **values):
            return translate(key, strings, **values)

        generate_tab = self.gestionnaire.get("generate") if self.gestionnaire else None
        host_tabs = getattr(self.gestionnaire, "tabs", None)
        default_model = self.default_model()
        with gr.Tab(t("tab_title"), id="lora_training"):
            gr.Markdown(t("intro"))
            interrupted = interrupted_projects(self.config.LORA_PROJECTS_DIR, self.config.LORAS_DIR)
            if interrupted:
                gr.Markdown(t("interrupted", projects=", ".join(interrupted)), elem_id="lt-interrupted")
            with gr.Row():
                with gr.Column(scale=3):
                    with gr.Row():
                        images_dir = gr.Textbox(
                            label=t("images_dir"),
                            placeholder=t("images_placeholder"),
                            info=t("images_roots", roots=", ".join(map(str, self.config.IMAGE_ROOTS))),
                            elem_id="lt-images",
                            scale=4,
                        )
                        subfolders = gr.Checkbox(
                            value=False, label=t("include_subfolders"), elem_id="lt-subfolders", scale=1
                        )
                    with gr.Row():
                        project = gr.Textbox(label=t("project"), elem_id="lt-project")
                        trigger = gr.Textbox(
                            label=t("trigger"), placeholder=t("trigger_placeholder"), elem_id="lt-trigger"
                        )
                        class_word = gr.Textbox(label=t("class_word"), elem_id="lt-class")
                    with gr.Row():
                        base_model = gr.Dropdown(
                            choices=self.model_choices(),
                            value=default_model,
                            label=t("base_model"),
                            elem_id="lt-base-model",
                            scale=4,
                        )
                        refresh = gr.Button(t("refresh"), scale=1)
                    with gr.Row():
                        captioner = gr.Dropdown(list(CAPTIONERS), value=self.default_captioner(), label=t("captioner"))
                        caption_task = gr.Dropdown(
                            list(FLORENCE_TASKS), value="<DETAILED_CAPTION>", label=t("caption_task")
                        )
                        resolution = gr.Number(
                            value=self.resolution_for(default_model), precision=0, step=64, label=t("resolution")
                        )
                    with gr.Row():
                        preset = gr.Dropdown(self.presets(), value=None, label=t("preset"), scale=3)
                        load_preset = gr.Button(t("load_preset"), scale=1)
                    with gr.Accordion(t("schedule"), open=False):
                        with gr.Row():
                            epochs = gr.Number(value=10, precision=0, label=t("epochs"))
                            steps = gr.Number(value=0, precision=0, label=t("steps"), elem_id="lt-steps")
                            learning_rate = gr.Number(value=1e-4, label=t("learning_rate"))
                            batch_size = gr.Number(value=1, precision=0, label=t("batch_size"))
                        with gr.Row():
                            rank = gr.Number(value=16, precision=0, label=t("rank"))
                            alpha = gr.Number(value=16, label=t("alpha"))
                            optimizer = gr.Dropdown(list(OPTIMIZERS), value="adamw8bit", label=t("optimizer"))
                            mixed_precision = gr.Dropdown(list(PRECISIONS), value="auto", label=t("mixed_precision"))
                        with gr.Row():
                            lr_scheduler = gr.Dropdown(list(LR_SCHEDULERS), value="constant", label=t("lr_scheduler"))
                            lr_warmup_steps = gr.Number(value=0, precision=0, label=t("lr_warmup_steps"))
                            save_every_steps = gr.Number(
                                value=250, precision=0, label=t("save_every_steps"), elem_id="lt-save-every"
                            )
                            seed = gr.Number(value=42, precision=0, label=t("seed"))
                        sample_prompts = gr.Textbox(value="{trigger}", lines=2, label=t("sample_prompts"))
                        sample_every_steps = gr.Number(
                            value=250, precision=0, label=t("sample_every_steps"), elem_id="lt-sample-every"
                        )
                    with gr.Accordion(t("advanced"), open=False):
                        with gr.Row():
                            train_text_encoder = gr.Checkbox(value=False, label=t("train_text_encoder"))
                            text_encoder_lr = gr.Number(value=5e-5, label=t("text_encoder_lr"))
                            gradient_checkpointing = gr.Checkbox(value=True, label=t("gradient_checkpointing"))
                        with gr.Row():
                            caption_dropout = gr.Slider(0, 0.5, value=0.0, step=0.05, label=t("caption_dropout"))
                            flip = gr.Checkbox(value=False, label=t("flip"))
                            min_snr_gamma = gr.Number(value=5.0, label=t("min_snr_gamma"))
                            noise_offset = gr.Number(value=0.0, label=t("noise_offset"))
                            lora_targets = gr.Dropdown(list(LORA_TARGETS), value="auto", label=t("lora_targets"))
                            base_quantization = gr.Dropdown(
                                list(QUANTIZATIONS), value="none", label=t("base_quantization")
                            )
                            zero_terminal_snr = gr.Checkbox(value=False, label=t("zero_terminal_snr"))
                        with gr.Row():
                            preset_name = gr.Textbox(label=t("preset_name"), scale=3)
                            save_preset = gr.Button(t("save_preset"), scale=1)
                    estimate_button = gr.Button(t("estimate"))
                    estimate = gr.Markdown(elem_id="lt-estimate")
                    with gr.Row():
                        prepare_button = gr.Button(t("prepare"), elem_id="lt-prepare")
                        train_button = gr.Button(t("prepare_and_train"), variant="primary", elem_id="lt-train")
                        stop_button = gr.Button(t("stop"), variant="stop", elem_id="lt-stop")
                        resume_button = gr.Button(t("resume"), elem_id="lt-resume")
                        new_run = gr.Checkbox(value=False, label=t("new_run"), elem_id="lt-new-run")
                        use_button = gr.Button(t("use_in_generate"), elem_id="lt-use")
                with gr.Column(scale=2):
                    status = gr.Markdown(t("status_idle"), elem_id="lt-status")
                    progress = gr.HTML(elem_id="lt-progress")
                    loss_plot = gr.LinePlot(
                        pd.DataFrame({"step": [], "loss": []}), x="step", y="loss", label=t("loss"), elem_id="lt-loss"
                    )
                    samples = gr.Gallery(label=t("samples"), columns=4, height=200, elem_id="lt-samples")
                    log_box = gr.Textbox(label=t("log"), lines=14, max_lines=14, elem_id="lt-log")
            prepared = gr.Gallery(label=t("prepared"), columns=6, height=260, elem_id="lt-prepared")
            with gr.Row():
                selected_image = gr.State(None)
                caption_box = gr.Textbox(label=t("caption"), lines=2, scale=4, elem_id="lt-caption")
                save_caption = gr.Button(t("save_caption"), scale=1)
            last_seen = gr.State({"job_id": None, "state": None, "lora_version": 0})
            self._register_api()

        option_widgets = [
            epochs,
            steps,
            learning_rate,
            batch_size,
            rank,
            alpha,
            train_text_encoder,
            text_encoder_lr,
            optimizer,
            lr_scheduler,
            lr_warmup_steps,
            mixed_precision,
            gradient_checkpointing,
            save_every_steps,
            sample_every_steps,
            seed,
            caption_dropout,
            flip,
            min_snr_gamma,
            noise_offset,
            lora_targets,
            base_quantization,
            zero_terminal_snr,
        ]
        # Each optimizer has its usual learning rate (Prodigy ~1.0, Lion a third of AdamW's).
        optimizer.input(
            lambda name: (default_learning_rate(name), default_text_encoder_lr(name, default_learning_rate(name))),
            inputs=[optimizer],
            outputs=[learning_rate, text_encoder_lr],
            api_visibility="private",
        )
        integer_fields = {"epochs", "steps", "batch_size", "rank", "lr_warmup_steps", "save_every_steps"}
        integer_fields |= {"sample_every_steps", "seed"}

        def collect_options(values, prompts_text, class_text) -> dict:
            raw = dict(zip(OPTION_FIELDS, values, strict=True))
            for key in integer_fields:
                if raw.get(key) is not None:
                    raw[key] = int(raw[key])
            options = options_from_widgets(raw)
            options["sample_prompts"] = sample_prompt_list(prompts_text, class_text)
            return options

        prep_inputs = [images_dir, project, trigger, base_model, captioner, caption_task, resolution, subfolders]

        def as_prepare(images, name, word, model, capt, task, res, sub):
            return self.prepare_config(
                images_dir=images,
                project=name,
                trigger=word,
                base_model=model,
                captioner=capt,
                caption_task=task,
                resolution=res or 1024,
                include_subfolders=sub,
            )

        def on_prepare(*values):
            try:
                job = self.start(prepare=as_prepare(*values), train=None)
            except UserError as exc:
                raise gr.Error(str(exc)) from exc
            return t("started", job_id=job["job_id"])

        def on_train(*values):
            prep_values, rest = values[: len(prep_inputs)], values[len(prep_inputs) :]
            start_new_run, prompts_text, class_text, *option_values = rest
            try:
                prepare_config = as_prepare(*prep_values)
                options = collect_options(option_values, prompts_text, class_text)
                train_config = self.train_config(project=prep_values[1], base_model=prep_values[3], options=options)
                job = self.start(prepare=prepare_config, train=train_config, new_run=bool(start_new_run))
            except UserError as exc:
                raise gr.Error(str(exc)) from exc
            return t("started", job_id=job["job_id"])

        def on_stop():
            return self.jobs.stop()

        def on_resume(name):
            try:
                job = self.resume(name)
            except UserError as exc:
                raise gr.Error(str(exc)) from exc
            return t("started", job_id=job["job_id"])

        def on_estimate(model, res, prompts_text, class_text, *option_values):
            try:
                options = collect_options(option_values, prompts_text, class_text)
                config = self.train_config(project="estimate", base_model=model, options=options)
                from modules.lora_training.estimate import (
                    count_work_for_config,
                    estimate_for_config,
                    estimate_step_time_for_config,
                )

                where = {"models_dir": self.config.MODELS_DIR, "resolution": int(res)}
                work = count_work_for_config(config, **where)
                lines = [estimate_for_config(config, work=work, **where).describe()]
                if self.jobs.is_running():
                    lines.append(t("estimate_time_busy"))
                else:
                    lines.append(estimate_step_time_for_config(config, work=work, **where).describe())
                return "\n\n".join(lines)
            except UserError as exc:
                return str(exc)

        train_inputs = [*prep_inputs, new_run, sample_prompts, class_word, *option_widgets]
        prepare_button.click(on_prepare, inputs=prep_inputs, outputs=[status], api_visibility="private")
        train_button.click(on_train, inputs=train_inputs, outputs=[status], api_visibility="private")
        stop_button.click(on_stop, outputs=[status], api_visibility="private")
        resume_button.click(on_resume, inputs=[project], outputs=[status], api_visibility="private")
        estimate_button.click(
            on_estimate,
            inputs=[base_model, resolution, sample_prompts, class_word, *option_widgets],
            outputs=[estimate],
            api_visibility="private",
        )

        def on_model_change(model):
            return self.resolution_for(model)

        base_model.change(on_model_change, inputs=[base_model], outputs=[resolution], api_visibility="private")
        refresh.click(
            lambda current: gr.Dropdown(choices=self.model_choices(), value=current),
            inputs=[base_model],
            outputs=[base_model],
            api_visibility="private",
        )

        def on_load_preset(name):
            if not name:
                return [gr.skip()] * (len(option_widgets) + 2)
            data = self.read_preset(name)
            options = data.get("options", {})
            updates = [options.get(key, gr.skip()) for key in OPTION_FIELDS]
            return [
                *updates,
                data.get("resolution", gr.skip()),
                t("preset_loaded", name=name, note=data.get("note", "")),
            ]

        load_preset.click(
            on_load_preset,
            inputs=[preset],
            outputs=[*option_widgets, resolution, estimate],
            api_visibility="private",
        )

        def on_save_preset(name, res, prompts_text, class_text, *option_values):
            try:
                options = collect_options(option_values, prompts_text, class_text)
                options.pop("sample_prompts", None)
                saved = self.write_preset(name, resolution=int(res), options=options)
            except UserError as exc:
                raise gr.Error(str(exc)) from exc
            return gr.Dropdown(choices=self.presets(), value=saved), t("preset_saved", name=saved)

        save_preset.click(
            on_save_preset,
            inputs=[preset_name, resolution, sample_prompts, class_word, *option_widgets],
            outputs=[preset, estimate],
            api_visibility="private",
        )

        def on_select(evt: gr.SelectData, gallery):
            item = gallery[evt.index]
            image = item[0] if isinstance(item, list | tuple) else item.get("image", {}).get("path")
            path = image if isinstance(image, str) else getattr(image, "path", None) or image.get("path")
            caption = item[1] if isinstance(item, list | tuple) else item.get("caption", "")
            return path, caption

        prepared.select(on_select, inputs=[prepared], outputs=[selected_image, caption_box], api_visibility="private")

        def on_save_caption(name, image, caption):
            if not image:
                raise gr.Error(t("no_image_selected"))
            # The gallery shows a cached copy; find the project file with the same name.
            matches = [p for p, _ in self.prepared_gallery(name) if Path(p).name == Path(image).name]
            try:
                saved = self.save_caption(name, matches[0] if matches else image, caption)
            except UserError as exc:
                raise gr.Error(str(exc)) from exc
            return t("caption_saved", image=saved), self.prepared_gallery(name)

        save_caption.click(
            on_save_caption,
            inputs=[project, selected_image, caption_box],
            outputs=[status, prepared],
            api_visibility="private",
        )

        lora_dropdowns = list(generate_tab.lora_dropdowns) if generate_tab else []

        def render_status(snapshot: dict) -> str:
            state = snapshot["state"]
            if state == "idle":
                return t("status_idle")
            values = {
                "project": snapshot["project"],
                "stage": snapshot.get("prep_stage", ""),
                "done": snapshot.get("prep_done", 0),
                "total": snapshot.get("prep_total", 0) if state == "preparing" else snapshot.get("total_steps", 0),
                "step": snapshot.get("step", 0),
                "message": snapshot.get("message", ""),
            }
            key = {"starting": "status_preparing"}.get(state, f"status_{state}")
            return translate(key, strings, **values)

        def render_progress(snapshot: dict) -> str:
            total = snapshot.get("total_steps") or 0
            if not total:
                return ""
            step = snapshot.get("step", 0)
            text = t(
                "progress",
                step=step,
                total=total,
                s_per_step=snapshot.get("s_per_step") or 0.0,
                eta=format_eta(snapshot.get("eta_seconds")),
            )
            return f'<progress value="{step}" max="{total}" style="width:100%"></progress><div>{text}</div>'

        def poll(seen: dict):
            snapshot = self.jobs.snapshot()
            losses = snapshot.get("losses", [])
            frame = pd.DataFrame(losses, columns=["step", "loss"]) if losses else pd.DataFrame({"step": [], "loss": []})
            gallery_update = gr.skip()
            changed = (snapshot.get("job_id"), snapshot["state"]) != (seen.get("job_id"), seen.get("state"))
            if changed and snapshot["state"] in ("prepared", "training", "finished"):
                gallery_update = self.prepared_gallery(snapshot["project"])
            lora_updates = [gr.skip()] * len(lora_dropdowns)
            if self.jobs.lora_version != seen.get("lora_version", 0) and generate_tab is not None:
                lora_updates = generate_tab.refresh_lora_updates(self.model_manager.loaded_model)
            new_seen = {
                "job_id": snapshot.get("job_id"),
                "state": snapshot["state"],
                "lora_version": self.jobs.lora_version,
            }
            return [
                render_status(snapshot),
                render_progress(snapshot),
                "\n".join(reversed(snapshot.get("log", []))),
                frame,
                [tuple(s) for s in snapshot.get("samples", [])] or gr.skip(),
                gallery_update,
                new_seen,
                *lora_updates,
            ]

        timer = gr.Timer(1.0)
        poll_outputs = [status, progress, log_box, loss_plot, samples, prepared, last_seen, *lora_dropdowns]
        timer.tick(poll, inputs=[last_seen], outputs=poll_outputs, api_visibility="private", show_progress="hidden")

        if generate_tab is not None:

            def use_in_generate():
                snapshot = self.jobs.snapshot()
                lora = snapshot.get("lora_path")
                if not lora:
                    raise gr.Error(t("no_lora_yet"))
                name = str(Path(lora).relative_to(self.config.LORAS_DIR))
                updates = generate_tab.refresh_lora_updates(snapshot.get("base_model"))
                updates[0] = gr.Dropdown(choices=updates[0].choices, value=name)
                prompt = f"{snapshot.get('trigger') or ''}, " if snapshot.get("trigger") else gr.skip()
                tab_update = gr.Tabs(selected="generate") if host_tabs is not None else gr.skip()
                return [snapshot.get("base_model") or gr.skip(), prompt, *updates, tab_update]

            use_outputs = [generate_tab.model_dropdown, generate_tab.prompt_box, *generate_tab.lora_dropdowns]
            use_outputs.append(host_tabs if host_tabs is not None else gr.State())
            use_button.click(use_in_generate, outputs=use_outputs, api_visibility="private")

    def _register_api(self) -> None:
        tab = self

        def prepare_dataset(
            images_dir: str,
            project: str,
            trigger: str,
            base_model: str = "",
            captioner: str = "none",
            caption_task: str = "<DETAILED_CAPTION>",
            resolution: int = 1024,
            include_subfolders: bool = False,
        ) -> dict:
            """Start preparing a folder of images (crop to buckets, caption, add the trigger word)."""
            try:
                config = tab.prepare_config(
                    images_dir=images_dir,
                    project=project,
                    trigger=trigger,
                    base_model=base_model or tab.default_model(),
                    captioner=captioner,
                    caption_task=caption_task,
                    resolution=resolution,
                    include_subfolders=include_subfolders,
                )
                return tab.start(prepare=config, train=None)
            except UserError as exc:
                raise gr.Error(str(exc)) from exc

        def train_lora(
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
            try:
                prepare_config = None
                if flag("prepare", prepare):
                    prepare_config = tab.prepare_config(
                        images_dir=images_dir,
                        project=project,
                        trigger=trigger,
                        base_model=base_model,
                        captioner=captioner,
                        caption_task="<DETAILED_CAPTION>",
                        resolution=resolution,
                        include_subfolders=include_subfolders,
                    )
                train_config = tab.train_config(project=project, base_model=base_model, options=options_dict(options))
                return tab.start(prepare=prepare_config, train=train_config, new_run=flag("new_run", new_run))
            except UserError as exc:
                raise gr.Error(str(exc)) from exc

        def stop_training() -> str:
            """Stop the running job after its current step, keeping a resumable checkpoint."""
            return tab.jobs.stop()

        def training_status() -> dict:
            """The current (or last) job: state, step, loss, ETA, log, samples, LoRA path."""
            return tab.jobs.snapshot()

        def resume_training(project: str) -> dict:
            """Continue a stopped or interrupted run from its newest checkpoint."""
            try:
                return tab.resume(project)
            except UserError as exc:
                raise gr.Error(str(exc)) from exc

        gr.api(prepare_dataset, api_name="prepare_dataset")
        gr.api(train_lora, api_name="train_lora")
        gr.api(stop_training, api_name="stop_training", queue=False)
        gr.api(training_status, api_name="training_status", queue=False)
        gr.api(resume_training, api_name="resume_training")
