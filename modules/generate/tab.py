"""The Generate tab: thin widgets over ModelManager.generate."""

from __future__ import annotations

import logging
import math
import time

from core.client_presence import always_present, presence_check
from core.errors import UserError
from core.i18n import translate
from core.lora_info import LoraInfo
from core.model_files import native_image_size
from core.model_manager import MAX_LORAS, GenerateLimits, GenerationRequest, LoraChoice
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
        except (TypeError, ValueError) as exc:
            raise UserError(f"LoRA {slot} ({name}) weight must be a number (got {weight!r}).") from exc
        choices.append(LoraChoice(name=str(name), weight=value, slot=slot))
    return tuple(choices)


def whole_number(label: str, value, *, default: int | None = None) -> int:
    """``value`` from the page or the API as an int; NaN, infinities, fractions and text are refused."""
    if value is None and default is not None:
        return default
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{label} must be a whole number (got {value!r}).") from exc
    if not math.isfinite(number) or number != int(number):
        raise UserError(f"{label} must be a whole number (got {value!r}).")
    return int(number)


def real_number(label: str, value) -> float:
    """``value`` as a float; whether it is finite and in range is :func:`validate_request`'s to say."""
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{label} must be a number (got {value!r}).") from exc


def lora_label(info: LoraInfo, model_family: str | None, strings: dict) -> str:
    """The LoRA list's entry: name, family (marked when it is not the selected model's) and trigger word."""
    if info.family is None:
        return translate("lora_unreadable", strings, name=info.stem)
    key = "lora_entry" if model_family in (None, info.family) else "lora_entry_other_family"
    label = translate(key, strings, name=info.stem, family=info.family.upper(), model_family=str(model_family).upper())
    return translate("lora_trigger", strings, label=label, trigger=info.trigger_word) if info.trigger_word else label


class GenerateTab:
    def __init__(self, *, model_manager, config, translations: dict) -> None:
        self.model_manager = model_manager
        model_manager.limits = GenerateLimits(
            max_steps=getattr(config, "MAX_GENERATE_STEPS", GenerateLimits.max_steps),
            max_side=getattr(config, "MAX_IMAGE_SIDE", GenerateLimits.max_side),
        )
        self.config = config
        self.translations = translations
        self.model_dropdown = None
        self.prompt_box = None
        self.lora_dropdowns: list = []
        self.strings: dict = {}

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
        preferred = self.config.DEFAULT_SDXL_MODEL_FOR_LORA
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
        message = translate("done", strings, seed=result.seed, seconds=time.perf_counter() - started, path=path.name)
        return str(path), message

    # ----- UI ------------------------------------------------------------------
    def refresh_lora_updates(self, model: str | None = None, strings: dict | None = None) -> list:
        """Updates for every LoRA dropdown (other tabs call this after saving a LoRA)."""
        import gradio as gr

        choices = self.lora_choices(model, strings if strings is not None else self.strings)
        return [gr.Dropdown(choices=choices) for _ in self.lora_dropdowns]

    def create_tab(self, strings: dict) -> None:
        import gradio as gr

        def t(key, **values):
            return translate(key, strings, **values)

        self.strings = strings
        models = self.model_names()
        default = self.default_model()
        size = self.image_size_for(default)
        limits = self.model_manager.limits
        lora_choices = self.lora_choices(default, strings)
        with gr.Tab(t("tab_title"), id="generate"):
            if not models:
                gr.Markdown(t("no_models", folder=self.config.MODELS_DIR))
            with gr.Row():
                with gr.Column(scale=3):
                    with gr.Row():
                        self.model_dropdown = gr.Dropdown(
                            choices=models,
                            value=default,
                            label=t("model"),
                            elem_id="generate-model",
                            scale=4,
                            # Files added after the page loaded are valid too; ModelManager checks them.
                            allow_custom_value=True,
                        )
                        refresh_models = gr.Button(t("refresh"), scale=1)
                    self.prompt_box = gr.Textbox(
                        label=t("prompt"), placeholder=t("prompt_placeholder"), lines=3, elem_id="generate-prompt"
                    )
                    negative = gr.Textbox(label=t("negative_prompt"), lines=2)
                    with gr.Row():
                        steps = gr.Slider(1, limits.max_steps, value=20, step=1, label=t("steps"))
                        guidance = gr.Slider(0.0, 20.0, value=5.0, step=0.5, label=t("guidance"))
                    with gr.Row():
                        width = gr.Number(value=size, precision=0, step=8, label=t("width"))
                        height = gr.Number(value=size, precision=0, step=8, label=t("height"))
                        seed = gr.Number(value=-1, precision=0, label=t("seed"))
                    with gr.Accordion(t("loras"), open=True):
                        lora_inputs = []
                        self.lora_dropdowns = []
                        for n in range(1, MAX_LORAS + 1):
                            with gr.Row():
                                dropdown = gr.Dropdown(
                                    choices=lora_choices,
                                    value=None,
                                    label=t("lora_slot", n=n),
                                    elem_id=f"generate-lora-{n}",
                                    scale=3,
                                    allow_custom_value=True,
                                )
                                weight = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label=t("lora_weight", n=n))
                            self.lora_dropdowns.append(dropdown)
                            lora_inputs += [dropdown, weight]
                        refresh_loras = gr.Button(t("refresh"))
                    generate_button = gr.Button(t("generate"), variant="primary", elem_id="generate-button")
                with gr.Column(scale=2):
                    output = gr.Image(label=t("output"), type="filepath", elem_id="generate-output")
                    status = gr.Markdown(elem_id="generate-status")

            # API-only endpoints live inside the tab: gr.Tabs may hold only gr.Tab children.
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
                """Each LoRA once: name, family (sdxl/flux, None when unreadable), trigger word, problem."""
                return [info.as_dict() for info in self.model_manager.lora_details()]

            gr.api(list_models, api_name="list_models")
            gr.api(list_loras, api_name="list_loras")
            gr.api(lora_details, api_name="lora_details")

        def generate(model, prompt, negative_prompt, steps, guidance, width, height, seed, request, *lora_args):
            if not model:
                raise gr.Error(t("no_models", folder=self.config.MODELS_DIR))
            if not isinstance(model, str):
                raise gr.Error(f"model must be the name of a model in the list (got {model!r}).")
            try:
                generation = GenerationRequest(
                    model=model,
                    prompt=prompt or "",
                    negative_prompt=negative_prompt or "",
                    steps=whole_number(t("steps"), steps),
                    guidance=real_number(t("guidance"), guidance),
                    width=whole_number(t("width"), width),
                    height=whole_number(t("height"), height),
                    seed=whole_number(t("seed"), seed, default=-1),
                    loras=lora_choices_from_args(lora_args),
                )
                return self.run_generation(generation, strings, client_present=presence_check(request))
            except UserError as exc:
                raise gr.Error(str(exc)) from exc
            except Exception as exc:
                log.exception("generation failed")
                raise gr.Error(t("failed", error=f"{type(exc).__name__}: {exc}")) from exc

        # Gradio fills a positional parameter annotated gr.Request with the caller's request.
        generate.__annotations__["request"] = gr.Request
        generate_button.click(
            generate,
            inputs=[self.model_dropdown, self.prompt_box, negative, steps, guidance, width, height, seed, *lora_inputs],
            outputs=[output, status],
            api_name="generate",
            # Raw values reach generate(), which checks them with messages naming the field; Gradio's own
            # checks would answer "Value 0 is less than minimum value 1." or "index 6 (a `number` component)".
            preprocess=False,
        )

        def refresh_model_list(current):
            names = self.model_names()
            value = current if current in names else self.default_model()
            return gr.Dropdown(choices=names, value=value)

        refresh_models.click(
            refresh_model_list, inputs=[self.model_dropdown], outputs=[self.model_dropdown], api_visibility="private"
        )
        refresh_loras.click(
            self.refresh_lora_updates,
            inputs=[self.model_dropdown],
            outputs=self.lora_dropdowns,
            api_visibility="private",
        )

        def on_model_change(model):
            side = self.image_size_for(model)
            return [side, side, *self.refresh_lora_updates(model)]

        self.model_dropdown.change(
            on_model_change,
            inputs=[self.model_dropdown],
            outputs=[width, height, *self.lora_dropdowns],
            api_visibility="private",
        )
