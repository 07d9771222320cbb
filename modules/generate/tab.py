"""The Generate tab: thin widgets over ModelManager.generate."""

from __future__ import annotations

import html
import logging
import math
import time
from types import SimpleNamespace

from core.client_presence import always_present, presence_check
from core.errors import UserError, shown_to_user
from core.i18n import text_of, translate
from core.lora_info import LoraInfo
from core.model_files import native_image_size
from core.model_manager import MAX_LORAS, GenerateLimits, GenerationRequest, LoraChoice
from core.page_texts import page_texts_of
from modules.generate.outputs import save_generation

log = logging.getLogger(__name__)


def lora_choices_from_args(args: tuple) -> tuple[LoraChoice, ...]:
    """``(name1, weight1, name2, weight2, ...)`` → the chosen LoRAs with their slot numbers, empty slots left out."""
    choices = []
    for slot, (name, weight) in enumerate(zip(args[0::2], args[1::2], strict=True), start=1):
        if not name:
            continue
        try:
            value = float(weight if weight is not None else 1.0)
        except (TypeError, ValueError, OverflowError) as exc:
            raise UserError(f"LoRA {slot} ({name}) weight must be a number (got {weight!r}).") from exc
        choices.append(LoraChoice(name=str(name), weight=value, slot=slot))
    return tuple(choices)


def whole_number(label: str, value, *, default: int | None = None) -> int:
    """``value`` from the page or the API as an int; NaN, infinities, fractions and text are refused."""
    if value is None and default is not None:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # exact, however large: the range is validate_request's to check
    try:
        number = float(value)
    except OverflowError as exc:
        raise UserError(f"{label} is far too large (got {str(value)[:20]}..., {len(str(value))} characters).") from exc
    except (TypeError, ValueError) as exc:
        raise UserError(f"{label} must be a whole number (got {value!r}).") from exc
    if not math.isfinite(number) or number != int(number):
        raise UserError(f"{label} must be a whole number (got {value!r}).")
    return int(number)


def real_number(label: str, value) -> float:
    """``value`` as a float; whether it is finite and in range is :func:`validate_request`'s to say."""
    try:
        return float(value)
    except OverflowError as exc:
        raise UserError(f"{label} is far too large (got {str(value)[:20]}..., {len(str(value))} characters).") from exc
    except (TypeError, ValueError) as exc:
        raise UserError(f"{label} must be a number (got {value!r}).") from exc


def _family_label(name: str | None) -> str:
    from families import display_name

    return display_name(name) if name else ""


def lora_label(info: LoraInfo, model_family: str | None, strings: dict) -> str:
    """The LoRA list's entry: name, family (marked when it is not the selected model's) and trigger word."""
    if info.family is None:
        return translate("lora_unreadable", strings, name=info.stem)
    key = "lora_entry" if model_family in (None, info.family) else "lora_entry_other_family"
    label = translate(
        key, strings, name=info.stem, family=_family_label(info.family), model_family=_family_label(model_family)
    )
    return translate("lora_trigger", strings, label=label, trigger=info.trigger_word) if info.trigger_word else label


class GenerateTab:
    def __init__(self, *, model_manager, config, translations: dict, actions=None, queue=None) -> None:
        self.model_manager = model_manager
        model_manager.limits = GenerateLimits(
            max_steps=getattr(config, "MAX_GENERATE_STEPS", GenerateLimits.max_steps),
            max_side=getattr(config, "MAX_IMAGE_SIDE", GenerateLimits.max_side),
        )
        self.config = config
        self.translations = translations
        self.actions = actions  # the host's TabActions: what this tab offers other tabs
        self.queue = queue  # the server's JobRunner (batches are queued jobs of kind "batch")
        self.model_dropdown = None
        self.prompt_box = None
        self.lora_dropdowns: list = []
        self.strings: dict = {}
        self.batch = None  # the batch section, made in create_tab

    def batch_defaults(self):
        """What an empty cell of a batch file means: this tab's defaults."""
        from modules.generate.batch import BatchDefaults

        return BatchDefaults(model=self.default_model(), size_for=self.image_size_for, limits=self.model_manager.limits)

    def batch_runner(self):
        from modules.generate.batch_job import BatchRunner

        return BatchRunner(
            manager=self.model_manager, outputs_dir=self.config.OUTPUTS_DIR, defaults=self.batch_defaults
        )

    # ----- plain functions behind the widgets (also the API) --------------------
    def model_names(self) -> list[str]:
        return [entry.name for entry in self.model_manager.list_models()]

    def lora_names(self) -> list[str]:
        return self.model_manager.list_loras()

    def model_family(self, model: str | None) -> str | None:
        return next((entry.family for entry in self.model_manager.list_models() if entry.name == model), None)

    def lora_choices(self, model: str | None, strings: dict) -> list[tuple[str, str]]:
        """(label, file name) per LoRA, for the dropdowns; labels depend on the selected model's family."""
        family = self.model_family(model)
        return [(lora_label(info, family, strings), info.name) for info in self.model_manager.lora_details()]

    def default_model(self) -> str | None:
        names = self.model_names()
        # The first family's default, as the tab has always preselected.
        preferred = next(iter(self.config.DEFAULT_MODELS_FOR_LORA.values()), None)
        if preferred in names:
            return preferred
        return names[0] if names else None

    def image_size_for(self, model: str | None) -> int:
        for entry in self.model_manager.list_models():
            if entry.name == model:
                return native_image_size(entry)
        return 1024

    def run_generation(
        self, request: GenerationRequest, strings: dict, *, client_present=always_present
    ) -> tuple[str, str]:
        started = time.perf_counter()
        result = self.model_manager.generate(request, client_present=client_present)
        path = save_generation(result.image, result.parameters, self.config.OUTPUTS_DIR)
        seconds = time.perf_counter() - started - result.load_seconds
        loading = translate("loading_time", strings, seconds=result.load_seconds) if result.load_seconds >= 0.5 else ""
        message = translate("done", strings, seed=result.seed, seconds=seconds, loading=loading, path=path.name)
        return str(path), message

    # ----- UI ------------------------------------------------------------------
    def refresh_lora_updates(self, model: str | None = None, strings: dict | None = None) -> list:
        """Updates for every LoRA dropdown (other tabs call this after saving a LoRA)."""
        import gradio as gr

        choices = self.lora_choices(model, strings if strings is not None else self.strings)
        return [gr.Dropdown(choices=choices) for _ in self.lora_dropdowns]

    def use_lora_updates(self, payload: dict) -> list:
        """The "generate.use_lora" action: select ``payload["model"]``, put ``payload["prompt"]`` in the
        prompt box and ``payload["lora"]`` in the first LoRA slot (None leaves a widget as it is)."""
        import gradio as gr

        model = payload.get("model")
        updates = self.refresh_lora_updates(model)
        updates[0] = gr.Dropdown(choices=updates[0].choices, value=payload.get("lora"))
        prompt = payload.get("prompt")
        return [model or gr.skip(), prompt if prompt is not None else gr.skip(), *updates]

    def lora_link_payload(self, name: str) -> dict:
        """What a link to the app ``/?lora=NAME`` (a queue result) hands "generate.use_lora": the LoRA, a model of
        its family when the preselected one is of another, and its trigger word."""
        info = next((info for info in self.model_manager.lora_details() if info.name == name), None)
        if info is None or info.problem or info.family is None:
            shown = html.escape(name[:120] + ("…" if len(name) > 120 else ""))  # a notice renders HTML
            raise UserError(f"The link names LoRA {shown!r}, which is not a usable LoRA of the LoRA folder.")
        model = None  # the preselected model, when it is of the LoRA's family
        if self.model_family(self.default_model()) != info.family:
            of_family = [entry.name for entry in self.model_manager.list_models() if entry.family == info.family]
            preferred = self.config.DEFAULT_MODELS_FOR_LORA.get(info.family)
            model = preferred if preferred in of_family else next(iter(of_family), None)
        return {"model": model, "lora": info.name, "prompt": f"{info.trigger_word}, " if info.trigger_word else None}

    def offer_actions(self) -> None:
        from core.plugins import TabAction

        if self.actions is None:
            return
        outputs = [self.model_dropdown, self.prompt_box, *self.lora_dropdowns]
        self.actions.offer("generate.use_lora", TabAction(outputs, self.use_lora_updates, tab_id="generate"))
        self.actions.link("lora", "generate.use_lora", payload=self.lora_link_payload, strings=self.strings)
        refresh = TabAction(self.lora_dropdowns, lambda payload: self.refresh_lora_updates(payload.get("model")))
        self.actions.offer("generate.refresh_loras", refresh)

    def create_tab(self, strings: dict) -> None:
        import gradio as gr

        from modules.generate.batch_section import BatchSection

        def t(key, **values):
            return text_of(strings, key, **values)

        self.strings = strings
        texts = page_texts_of(strings)
        with gr.Tab(t("tab_title"), id="generate"):
            if not self.model_names():
                texts.markdown(t("no_models", folder=self.config.MODELS_DIR))
            with gr.Row():
                with gr.Column(scale=3):
                    page = self._build_inputs(t, button=texts.button)
                with gr.Column(scale=2):
                    # At the top of the right column: visible without scrolling, above the image it makes.
                    page.generate = texts.button(t("generate"), variant="primary", size="lg", elem_id="generate-button")
                    page.output = gr.Image(
                        label=t("output"), type="filepath", height=512, elem_id="generate-output", interactive=False
                    )
                    page.status = gr.Markdown(elem_id="generate-status")
            self.batch = BatchSection(self.batch_runner(), queue=self.queue)
            self.batch.build(t, button=texts.button)
            # API-only endpoints live inside the tab: gr.Tabs may hold only gr.Tab children.
            self._register_list_api()
            self.batch.register_api()
        self._wire(page, t)
        self.batch.wire(strings)
        self.offer_actions()

    def _build_inputs(self, t, *, button):
        import gradio as gr

        default = self.default_model()
        size = self.image_size_for(default)
        page = SimpleNamespace()
        with gr.Row():
            self.model_dropdown = gr.Dropdown(
                choices=self.model_names(),
                value=default,
                label=t("model"),
                elem_id="generate-model",
                scale=4,
                # Files added after the page loaded are valid too; ModelManager checks them.
                allow_custom_value=True,
            )
            page.refresh_models = button(t("refresh"), scale=1)
        self.prompt_box = gr.Textbox(
            label=t("prompt"), placeholder=t("prompt_placeholder"), lines=3, elem_id="generate-prompt"
        )
        page.negative = gr.Textbox(label=t("negative_prompt"), lines=2)
        with gr.Row():
            page.steps = gr.Slider(1, self.model_manager.limits.max_steps, value=20, step=1, label=t("steps"))
            page.guidance = gr.Slider(0.0, 20.0, value=5.0, step=0.5, label=t("guidance"))
        with gr.Row():
            page.width = gr.Number(value=size, precision=0, step=8, label=t("width"))
            page.height = gr.Number(value=size, precision=0, step=8, label=t("height"))
            page.seed = gr.Number(value=-1, precision=0, label=t("seed"))
        with gr.Accordion(t("loras"), open=True):
            page.lora_inputs = self._build_lora_slots(t, self.lora_choices(default, self.strings))
            page.refresh_loras = button(t("refresh"))
        return page

    def _build_lora_slots(self, t, choices: list) -> list:
        """One dropdown and one weight per LoRA slot; returns them as (name, weight, name, weight, ...)."""
        import gradio as gr

        inputs = []
        self.lora_dropdowns = []
        for n in range(1, MAX_LORAS + 1):
            with gr.Row():
                dropdown = gr.Dropdown(
                    choices=choices,
                    value=None,
                    label=t("lora_slot", n=n),
                    elem_id=f"generate-lora-{n}",
                    scale=3,
                    allow_custom_value=True,
                )
                weight = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label=t("lora_weight", n=n), min_width=230)
            self.lora_dropdowns.append(dropdown)
            inputs += [dropdown, weight]
        return inputs

    def _register_list_api(self) -> None:
        import gradio as gr

        def list_models() -> list[dict]:
            """Base models in the models folder, with their family."""
            return [
                {"name": e.name, "family": e.family, "single_file": e.single_file}
                for e in self.model_manager.list_models()
            ]

        def list_loras() -> list[str]:
            """LoRA files in the shared loras folder."""
            return self.lora_names()

        def lora_details() -> list[dict]:
            """Each LoRA once: name, family (a registered family name, None when unreadable), trigger word, problem."""
            return [info.as_dict() for info in self.model_manager.lora_details()]

        gr.api(list_models, api_name="list_models")
        gr.api(list_loras, api_name="list_loras")
        gr.api(lora_details, api_name="lora_details")

    def generate(self, values: tuple, strings: dict, *, client_present=always_present) -> tuple[str, str]:
        """The Generate button: ``(model, prompt, negative, steps, guidance, width, height, seed, *loras)``,
        raw as the page or an API client sent them (checked here, with messages naming the field)."""
        import gradio as gr

        def t(key, **kwargs):
            return translate(key, strings, **kwargs)

        model, prompt, negative_prompt, steps, guidance, width, height, seed, *lora_args = values
        if not model:
            raise shown_to_user(t("no_models", folder=self.config.MODELS_DIR))
        if not isinstance(model, str):
            raise shown_to_user(f"model must be the name of a model in the list (got {model!r}).", strings)
        try:
            request = GenerationRequest(
                model=model,
                prompt=prompt or "",
                negative_prompt=negative_prompt or "",
                steps=whole_number(t("steps"), steps),
                guidance=real_number(t("guidance"), guidance),
                width=whole_number(t("width"), width),
                height=whole_number(t("height"), height),
                seed=whole_number(t("seed"), seed, default=-1),
                loras=lora_choices_from_args(tuple(lora_args)),
            )
            return self.run_generation(request, strings, client_present=client_present)
        except UserError as exc:
            raise shown_to_user(exc, strings) from exc
        except Exception as exc:
            log.exception("generation failed")
            raise gr.Error(t("failed", error=f"{type(exc).__name__}: {exc}")) from exc

    def _wire(self, page, t) -> None:
        import gradio as gr

        strings = self.strings

        def generate(request, *values):
            return self.generate(values, strings, client_present=presence_check(request))

        # Gradio fills a positional parameter annotated gr.Request with the caller's request.
        generate.__annotations__["request"] = gr.Request
        generate_inputs = [self.model_dropdown, self.prompt_box, page.negative, page.steps, page.guidance]
        generate_inputs += [page.width, page.height, page.seed, *page.lora_inputs]
        page.generate.click(
            generate,
            inputs=generate_inputs,
            outputs=[page.output, page.status],
            api_name="generate",
            # Raw values reach generate(), which checks them with messages naming the field; Gradio's own
            # checks would answer "Value 0 is less than minimum value 1." or "index 6 (a `number` component)".
            preprocess=False,
        )

        def refresh_model_list(current):
            names = self.model_names()
            value = current if current in names else self.default_model()
            return gr.Dropdown(choices=names, value=value)

        private = {"api_visibility": "private"}
        page.refresh_models.click(
            refresh_model_list, inputs=[self.model_dropdown], outputs=[self.model_dropdown], **private
        )
        page.refresh_loras.click(
            self.refresh_lora_updates, inputs=[self.model_dropdown], outputs=self.lora_dropdowns, **private
        )
        # The LoRA entries ("· trigger: ohwx") are written in the language of the moment.
        page_texts_of(strings).refresh(
            lambda model: self.refresh_lora_updates(model), inputs=[self.model_dropdown], outputs=self.lora_dropdowns
        )

        def on_model_change(model):
            side = self.image_size_for(model)
            return [side, side, *self.refresh_lora_updates(model)]

        self.model_dropdown.change(
            on_model_change,
            inputs=[self.model_dropdown],
            outputs=[page.width, page.height, *self.lora_dropdowns],
            **private,
        )
