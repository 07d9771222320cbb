"""The LoRA Training form, declared once.

Each :class:`Option` is one input of the tab: the config field it sets (its label is the locale
key of the same name), the kind of widget and when it is shown; its place in ``FORM`` (a row of a
:class:`Section`) is where it sits on the page. Ranges and
choices come from the field's own metadata in ``config.py``, so the form and the validation cannot
drift apart. Values travel as dicts keyed by field name, in two forms:

- *widget values*: what the page holds (``steps`` 0 for "use epochs", prompts as lines of text);
- *config values*: what ``config_from_dict`` takes (the API's ``options``, a preset's ``options``).

This module does not import Gradio; ``form_widgets.py`` builds the widgets from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from modules.lora_training.config import PrepareConfig, TrainConfig
from modules.lora_training.dataset.captioners import CAPTIONERS, captioner_members

TEXT_KINDS = ("text", "prompts")
KINDS = ("text", "prompts", "integer", "number", "slider", "checkbox", "dropdown", "model")
BOTH = (PrepareConfig, TrainConfig)
NETWORK_LABELS = (
    ("lora", "network_lora"),
    ("dora", "network_dora"),
    ("lokr", "network_lokr"),
    ("loha", "network_loha"),
)
_UNSET = object()  # a widget value that leaves the config's default in place
AUTO = -1  # a number field's "automatic" (Gradio's number fields cannot stay empty)


@dataclass(frozen=True)
class Option:
    name: str  # the config field, and the locale key of its label
    kind: str
    configs: tuple[type, ...] = (TrainConfig,)  # empty: a form-only input (the class word)
    default: object = _UNSET  # the widget's first value when it differs from the config's default
    unset: object = None  # a widget value meaning "the config's default" (0 steps: use epochs)
    auto: bool = False  # the widget's AUTO (or empty) sends None: the config's "automatic" (every 10% of the run)
    choice_labels: tuple[tuple[object, str], ...] = ()  # (value, locale key) for choices shown as words
    shown_when: tuple[str, object] | None = None  # (field or "family", the values that show it: a container)
    in_preset: bool = True  # saved into presets (per-project inputs are not)
    step: float | None = None
    elem_id: str | None = None
    placeholder: str | None = None  # locale key
    scale: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: unknown widget kind {self.kind!r}; valid: {', '.join(KINDS)}")

    @property
    def field(self) -> dataclasses.Field | None:
        for cls in self.configs:
            for candidate in dataclasses.fields(cls):
                if candidate.name == self.name:
                    return candidate
        return None

    @property
    def choices(self) -> tuple:
        return self.field.metadata.get("choices", ()) if self.field else ()

    @property
    def bounds(self) -> tuple[float, float] | None:
        """The widget's range: the field's bounds, widened to admit the ``unset`` value."""
        metadata = self.field.metadata if self.field else {}
        if metadata.get("minimum") is None:
            return None
        low = metadata["minimum"] if self.unset is None else min(metadata["minimum"], self.unset)
        return (min(low, AUTO) if self.auto else low), metadata["maximum"]

    @property
    def initial(self):
        if self.default is not _UNSET:
            return self.default
        field = self.field
        if field is None or field.default is dataclasses.MISSING:
            return "" if self.kind in TEXT_KINDS else None
        return self.to_widget(field.default)

    def shown(self, context: dict) -> bool:
        if self.shown_when is None:
            return True
        key, values = self.shown_when
        return context.get(key) is None or context[key] in values

    def to_config(self, value, values: dict):
        """This option's widget value → its config value (``_UNSET``: leave the config default)."""
        if self.kind == "prompts":
            return sample_prompt_list(value, values.get("class_word") or "")
        if self.kind == "text":
            return value or ""
        if self.auto and (value is None or value == "" or value == AUTO):
            return None
        if value is None or value == "" or (self.unset is not None and value == self.unset):
            return _UNSET
        return value

    def to_widget(self, value):
        if value is None:
            return AUTO if self.auto else self.unset
        if self.kind == "prompts":
            return "\n".join(value)
        return value


def sample_prompt_list(text: str, class_word: str) -> tuple[str, ...]:
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        prompts = ["photo of {trigger} " + class_word if class_word else "{trigger}"]
    return tuple(p.replace("{class}", class_word or "") for p in prompts)


@dataclass(frozen=True)
class FamiliesUsing:
    """The model families whose training reads ``option``: the ``shown_when`` values of a family-specific option."""

    option: str

    def __contains__(self, name) -> bool:
        from families import family

        return name is not None and self.option not in family(name).unused_options


@dataclass(frozen=True)
class Above:
    """Numbers above ``bound``: the ``shown_when`` values of options that matter once another is set."""

    bound: float

    def __contains__(self, value) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and value > self.bound


_WITH_CLASS_IMAGES = ("reg_ratio", Above(0.0))


def _for_families_using(option: str) -> tuple[str, FamiliesUsing]:
    return ("family", FamiliesUsing(option))


_PREPARE = (PrepareConfig,)
_WITH_TAGS = ("captioner", tuple(name for name in CAPTIONERS if "tags" in captioner_members(name)))


def _tag_option(name: str, kind: str, *, step: float | None = None) -> Option:
    """A WD14 tagger setting: shown when the captioner writes tags."""
    return Option(name, kind, configs=_PREPARE, in_preset=False, shown_when=_WITH_TAGS, step=step)


_SCHEDULES = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial")
_SCHEDULE_LABELS = tuple((name, f"schedule_{name}") for name in _SCHEDULES)


@dataclass(frozen=True)
class Section:
    """A part of the form, in page order: its label key, whether it is a (closed) accordion, its rows."""

    name: str
    accordion: bool
    rows: tuple[tuple[Option, ...], ...]


FORM: tuple[Section, ...] = (
    Section(
        "dataset",
        accordion=False,
        rows=(
            (
                Option(
                    "images_dir",
                    "text",
                    configs=_PREPARE,
                    in_preset=False,
                    elem_id="lt-images",
                    scale=3,
                    placeholder="images_placeholder",
                ),
                Option(
                    "include_subfolders",
                    "checkbox",
                    configs=_PREPARE,
                    in_preset=False,
                    elem_id="lt-subfolders",
                    scale=2,
                ),
            ),
            (
                Option("project", "text", configs=BOTH, in_preset=False),
                Option("trigger", "text", configs=_PREPARE, in_preset=False, placeholder="trigger_placeholder"),
            ),
            (Option("base_model", "model", in_preset=False, scale=4),),
            (
                Option(
                    "captioner",
                    "dropdown",
                    configs=_PREPARE,
                    in_preset=False,
                    choice_labels=tuple((name, f"captioner_{name}") for name in CAPTIONERS),
                ),
                Option(
                    "caption_task",
                    "dropdown",
                    configs=_PREPARE,
                    in_preset=False,
                    shown_when=("captioner", ("florence2", "florence2+tags")),
                    choice_labels=(
                        ("<CAPTION>", "caption_short"),
                        ("<DETAILED_CAPTION>", "caption_detailed"),
                        ("<MORE_DETAILED_CAPTION>", "caption_very_detailed"),
                    ),
                ),
                Option("resolution", "integer", configs=_PREPARE, step=64),
            ),
            (
                _tag_option("tag_threshold", "number", step=0.05),
                _tag_option("character_threshold", "number", step=0.05),
                _tag_option("max_tags", "integer"),
                _tag_option("rating_tag", "checkbox"),
            ),
            (
                _tag_option("exclude_tags", "text"),
                _tag_option("include_tags", "text"),
                _tag_option("tag_spaces", "checkbox"),
                _tag_option("escape_brackets", "checkbox"),
            ),
            (
                Option("epochs", "integer"),
                Option("repeats", "integer"),
                Option("batch_size", "integer"),
                Option("steps", "integer", unset=0, elem_id="lt-steps"),
            ),
        ),
    ),
    Section(
        "schedule",
        accordion=True,
        rows=(
            (
                Option("learning_rate", "number", default=1e-4),
                Option("rank", "integer"),
                Option("alpha", "number"),
                Option("optimizer", "dropdown", default="adamw8bit"),
                Option("mixed_precision", "dropdown"),
            ),
            (
                Option("lr_scheduler", "dropdown", choice_labels=_SCHEDULE_LABELS),
                Option("lr_warmup_steps", "integer"),
                Option("lr_num_cycles", "integer", shown_when=("lr_scheduler", ("cosine_with_restarts",))),
                Option("lr_power", "number", shown_when=("lr_scheduler", ("polynomial",))),
            ),
            (
                Option("save_every_steps", "integer", default=AUTO, auto=True, elem_id="lt-save-every"),
                Option("seed", "integer"),
            ),
            (
                Option("class_word", "text", configs=(), in_preset=False, elem_id="lt-class"),
                Option("sample_prompts", "prompts", in_preset=False),
                Option("sample_every_steps", "integer", default=AUTO, auto=True, elem_id="lt-sample-every"),
            ),
        ),
    ),
    Section(
        "advanced",
        accordion=True,
        rows=(
            (
                Option("gradient_checkpointing", "checkbox", default=True),
                Option("gradient_accumulation", "integer"),
            ),
            (
                Option("train_text_encoder", "checkbox"),
                Option("text_encoder_lr", "number", default=5e-5, shown_when=("train_text_encoder", (True,))),
            ),
            (
                Option("caption_dropout", "slider", step=0.05),
                Option("flip", "checkbox"),
                Option("noise_offset", "number"),
            ),
            (
                Option("shuffle_caption", "checkbox"),
                Option("keep_tokens", "integer"),
                Option("tag_dropout", "slider", step=0.05),
            ),
            (
                Option("min_snr_gamma", "number", default=5.0, shown_when=_for_families_using("min_snr_gamma")),
                Option("prediction_type", "dropdown", shown_when=_for_families_using("prediction_type")),
                Option("zero_terminal_snr", "checkbox", shown_when=_for_families_using("zero_terminal_snr")),
                Option("timestep_sampling", "dropdown", shown_when=_for_families_using("timestep_sampling")),
                Option("guidance_scale", "number", shown_when=_for_families_using("guidance_scale")),
            ),
            (
                Option("reg_ratio", "slider", step=0.05),
                Option(
                    "class_prompt",
                    "text",
                    in_preset=False,
                    shown_when=_WITH_CLASS_IMAGES,
                    placeholder="class_prompt_placeholder",
                ),
                Option("prior_loss_weight", "number", shown_when=_WITH_CLASS_IMAGES),
            ),
            (
                Option("reg_images_dir", "text", in_preset=False, shown_when=_WITH_CLASS_IMAGES, scale=2),
                Option("reg_count", "integer", shown_when=_WITH_CLASS_IMAGES),
            ),
            (
                Option("masked_loss", "checkbox"),
                Option("mask_floor", "slider", step=0.05, shown_when=("masked_loss", (True,))),
            ),
            (Option("validation_share", "slider", step=0.05),),
            (
                Option("ema", "checkbox"),
                Option("ema_decay", "number", step=0.001, shown_when=("ema", (True,))),
                Option("ema_start_step", "integer", shown_when=("ema", (True,))),
                Option(
                    "ema_weights",
                    "dropdown",
                    shown_when=("ema", (True,)),
                    choice_labels=(("raw", "ema_weights_raw"), ("ema", "ema_weights_ema")),
                ),
            ),
            (
                Option("lora_targets", "dropdown", choice_labels=(("attention+feedforward", "targets_feedforward"),)),
                Option("network", "dropdown", choice_labels=NETWORK_LABELS),
                Option("factor", "integer", shown_when=("network", ("lokr",))),
                Option("base_quantization", "dropdown", choice_labels=(("none", "quantization_none"),)),
            ),
        ),
    ),
)
SECTIONS = {section.name: section for section in FORM}
OPTIONS: tuple[Option, ...] = tuple(option for section in FORM for row in section.rows for option in row)
BY_NAME = {option.name: option for option in OPTIONS}


def default_widget_values() -> dict:
    """Every option's first widget value (the base model's is the tab's to choose)."""
    return {option.name: option.initial for option in OPTIONS}


def config_values(cls: type, values: dict, *, family: str | None = None) -> dict:
    """Widget values → the ``cls`` fields they set. Options hidden for these values (an option the
    selected model's family does not use), empty numbers and ``unset`` values are left to the config's defaults."""
    context = {**values, "family": family}
    out = {}
    for name, value in values.items():
        option = BY_NAME.get(name)
        if option is None or cls not in option.configs or not option.shown(context):
            continue
        converted = option.to_config(value, values)
        if converted is not _UNSET:
            out[name] = converted
    return out


def widget_values(config: dict) -> dict:
    """Config values (a preset's, a run's) → widget values of the declared options among them."""
    return {name: BY_NAME[name].to_widget(value) for name, value in config.items() if name in BY_NAME}


def split_preset(preset: dict) -> tuple[dict, dict]:
    """A preset → (widget values for the declared options, the other options it sets, kept as they are)."""
    settings = dict(preset.get("options", {}))
    if "resolution" in preset:
        settings["resolution"] = preset["resolution"]
    declared = {name: value for name, value in settings.items() if name in BY_NAME and BY_NAME[name].in_preset}
    extras = {name: value for name, value in settings.items() if name not in BY_NAME}
    return widget_values(declared), extras


def preset_settings(values: dict, extras: dict, *, family: str | None) -> tuple[int | None, dict]:
    """Widget values (+ a loaded preset's other options) → a preset's ``resolution`` and ``options``."""
    kept = {name: value for name, value in values.items() if name in BY_NAME and BY_NAME[name].in_preset}
    options = {**extras, **config_values(TrainConfig, kept, family=family)}
    return config_values(PrepareConfig, kept).get("resolution"), options


def whole(value, default: int) -> int:
    """A widget's whole number, or ``default`` when it is empty or not a positive whole number."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        return default
    return number if number >= 1 and number == value else default


def run_plan(bucket_sizes: list[int] | None, values: dict, *, t, exact: bool) -> str:
    """The live arithmetic under the form: "12 images x 1 repeat x 10 epochs / batch 1 = 120 steps", and how
    often a checkpoint and a sample come. ``bucket_sizes`` None: the image count is not known yet."""
    from modules.lora_training.data import every_tenth, planned_steps

    repeats, epochs = whole(values.get("repeats"), 1), whole(values.get("epochs"), 10)
    batch, accumulation = whole(values.get("batch_size"), 1), whole(values.get("gradient_accumulation"), 1)
    steps = whole(values.get("steps"), 0) or None
    if bucket_sizes is None and steps is None:
        return t("plan_unknown")
    ratio = values.get("reg_ratio")
    ratio = ratio if isinstance(ratio, int | float) and 0 <= ratio < 1 else 0.0  # class images add steps
    total = planned_steps(
        bucket_sizes or [],
        batch_size=batch,
        repeats=repeats,
        accumulation=accumulation,
        epochs=epochs,
        steps=steps,
        reg_ratio=ratio,
    )
    if steps is not None:
        line = t("plan_steps_set", steps=total)
    else:
        images = sum(bucket_sizes)
        line = t("plan_sum" if exact else "plan_sum_about", images=images, repeats=repeats, epochs=epochs)
        line += t("plan_batch", batch=batch * accumulation, steps=total)
        if ratio:
            line += t("plan_class_images", percent=round(ratio * 100))
    cadence = []
    for name in ("save_every_steps", "sample_every_steps"):
        raw = values.get(name)
        every = every_tenth(None if raw in (None, "", AUTO) else whole(raw, 0), total)
        cadence.append(t(f"plan_{name}", every=every) if every else t(f"plan_no_{name}"))
    return f"{line}; {', '.join(cadence)}."
