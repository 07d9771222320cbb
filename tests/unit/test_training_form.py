"""The LoRA Training form's declaration: one entry per option, ranges from the config, lossless round trips."""

import collections
import dataclasses
import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

from core.errors import UserError
from modules.lora_training.api import TrainingApi
from modules.lora_training.config import PrepareConfig, TrainConfig, config_from_dict, config_to_dict
from modules.lora_training.form import (
    AUTO,
    BY_NAME,
    OPTIONS,
    SECTIONS,
    config_values,
    default_widget_values,
    preset_settings,
    split_preset,
    widget_values,
)
from modules.lora_training.form_widgets import FormWidgets
from modules.lora_training.preset_files import preset_names
from modules.lora_training.status_view import render_progress, render_status
from modules.lora_training.ui import LoraTrainingTab

MODULE_JSON = Path(__file__).resolve().parents[2] / "modules" / "lora_training" / "module.json"
MODELS = {"an-sdxl": "sdxl", "a-flux": "flux"}


def _tab(tmp_path) -> LoraTrainingTab:
    entries = [SimpleNamespace(name=name, family=family) for name, family in MODELS.items()]
    manager = SimpleNamespace(list_models=lambda: entries)
    config = SimpleNamespace(LORA_PROJECTS_DIR=tmp_path, MODELS_DIR=tmp_path / "models")
    return LoraTrainingTab(jobs=None, model_manager=manager, gestionnaire=None, config=config)


def _page_values(**changes) -> dict:
    return {**default_widget_values(), "project": "p", "base_model": "an-sdxl", **changes}


def _build_form() -> tuple[gr.Blocks, FormWidgets]:
    with gr.Blocks() as demo:
        form = FormWidgets(
            lambda key, **values: (
                f"{key} {values['minimum']}-{values['maximum']}"
                if values
                else {"thousands_separator": ","}.get(key, key)
            ),
            initial={"base_model": "an-sdxl"},
            choices={"base_model": lambda: list(MODELS)},
            family_of=MODELS.get,
            info={},
        )
        for section in SECTIONS:
            form.build(section)
        form.wire_visibility()
    return demo, form


def test_each_option_is_declared_once_for_a_field_of_its_configs():
    counts = collections.Counter(option.name for option in OPTIONS)
    assert [name for name, count in counts.items() if count > 1] == []
    for option in OPTIONS:
        for cls in option.configs:
            assert option.name in {f.name for f in dataclasses.fields(cls)}, (option.name, cls.__name__)
    assert {o.name for o in OPTIONS if not o.configs} == {"class_word"}  # the only form-only input
    _, form = _build_form()
    assert list(form.widgets) == [option.name for option in OPTIONS], "every widget comes from the declaration"
    exposed = {name for name in form.widgets if TrainConfig in BY_NAME[name].configs}
    assert {"steps", "rank", "optimizer", "min_snr_gamma", "lr_power", "sample_prompts"} <= exposed


def test_every_label_exists_in_english_and_french():
    languages = json.loads(MODULE_JSON.read_text(encoding="utf-8"))["language"]
    accordions = {name for name, section in SECTIONS.items() if section.accordion}
    keys = {o.name for o in OPTIONS} | accordions | {o.placeholder for o in OPTIONS if o.placeholder}
    keys |= {"range", "refresh", "generate_unavailable"}
    for language in ("en", "fr"):
        assert sorted(keys - set(languages[language])) == [], language


def test_ranges_and_choices_are_the_configs_own():
    _, form = _build_form()
    for option in OPTIONS:
        metadata = option.field.metadata if option.field else {}
        if option.kind == "dropdown":
            assert option.choices == metadata["choices"]
            assert [value for _, value in form[option.name].choices] == list(metadata["choices"])
        if "minimum" not in metadata:
            assert option.bounds is None, option.name
            continue
        low, high = option.bounds
        assert high == metadata["maximum"], option.name
        widened = [v for v in (option.unset, AUTO if option.auto else None) if v is not None]
        assert low == min([metadata["minimum"], *widened]), option.name
        widget = form[option.name]
        if option.kind == "slider":
            assert (widget.minimum, widget.maximum) == (low, high), option.name
        else:  # numbers show their range; config_from_dict names the field of a value out of it
            shown = f"{low:,}-{high:,}" if isinstance(low, int) else f"{low:g}-{high:g}"
            assert widget.info == f"range {shown}", option.name
    assert (form["caption_dropout"].minimum, form["caption_dropout"].maximum) == (0.0, 1.0)
    assert form["rank"].info == "range 1-1,024"
    assert BY_NAME["steps"].bounds == (0, TrainConfig.__dataclass_fields__["steps"].metadata["maximum"])


def test_widget_values_become_a_train_config_and_back():
    values = _page_values(
        steps=0,
        rank=8,
        class_word="dog",
        sample_prompts="{trigger} as a {class}\n\n",
        lr_scheduler="polynomial",
        lr_power=2.0,
        lr_num_cycles=7,
        learning_rate=None,
        optimizer="prodigy",
    )
    config = config_from_dict(TrainConfig, config_values(TrainConfig, values, family="sdxl"))
    assert config.steps is None and config.epochs == 10 and config.rank == 8
    assert config.sample_prompts == ("{trigger} as a dog",)
    assert config.lr_power == 2.0 and config.lr_num_cycles == 1, "the cycles only count for cosine_with_restarts"
    assert config.learning_rate == 1.0, "no learning rate: the optimizer's usual one"
    assert config.min_snr_gamma == 5.0 and config.text_encoder_lr == 1.0, "text encoder off: its lr is derived"

    again = _page_values(**widget_values(config_to_dict(config)))
    assert config_from_dict(TrainConfig, config_values(TrainConfig, again, family="sdxl")) == config

    flux = config_from_dict(TrainConfig, config_values(TrainConfig, _page_values(guidance_scale=3.5), family="flux"))
    assert flux.min_snr_gamma == 0.0 and flux.guidance_scale == 3.5, "SDXL-only options are not read for Flux"


def test_an_out_of_range_value_is_refused_naming_the_field():
    with pytest.raises(UserError, match="rank must be between 1 and 1024; got 0"):
        config_from_dict(TrainConfig, config_values(TrainConfig, _page_values(rank=0)))
    with pytest.raises(UserError, match="resolution must be between 64 and 4096"):
        _tab(Path("/nonexistent")).prepare_config(_page_values(images_dir="/tmp", resolution=8192))


@pytest.mark.parametrize("name", [*preset_names(), "custom"])
def test_a_preset_loaded_and_saved_back_gives_the_same_config(tmp_path, name):
    tab = _tab(tmp_path)
    if name == "custom":
        options = {"lr_scheduler": "cosine_with_restarts", "lr_num_cycles": 3, "cache_latents": False, "rank": 4}
        (tmp_path / ".presets").mkdir()
        (tmp_path / ".presets" / "custom.json").write_text(json.dumps({"resolution": 768, "options": options}))
    preset = tab.read_preset(name)
    shown, extras = split_preset(preset)
    values = _page_values(**shown)
    loaded = tab.train_config(tab.train_values(values, extras))
    for key, value in preset["options"].items():
        assert getattr(loaded, key) == value, key
    assert values["resolution"] == preset["resolution"]

    resolution, options = preset_settings(values, extras, family="sdxl")
    tab.write_preset("copy", resolution=resolution, options=options)
    shown, extras = split_preset(tab.read_preset("copy"))
    reloaded = _page_values(**shown)
    assert tab.train_config(tab.train_values(reloaded, extras)) == loaded
    assert reloaded["resolution"] == preset["resolution"]


def test_visibility_follows_the_family_and_the_scheduler():
    demo, form = _build_form()
    assert form["min_snr_gamma"].visible and not form["guidance_scale"].visible  # an SDXL model is selected
    assert not form["lr_power"].visible and not form["text_encoder_lr"].visible
    handlers = {(target, event): fn.fn for fn in demo.fns.values() for target, event in fn.targets}
    by_scheduler = handlers[(form["lr_scheduler"]._id, "change")]("polynomial")
    assert [update["visible"] for update in by_scheduler] == [False, True]  # lr_num_cycles, lr_power
    by_model = handlers[(form["base_model"]._id, "change")]("a-flux")
    shown = [o.name for o, update in zip(_family_options(), by_model, strict=True) if update["visible"]]
    assert shown == ["timestep_sampling", "guidance_scale"]


def _family_options():
    return [option for option in OPTIONS if option.shown_when and option.shown_when[0] == "family"]


def test_the_api_takes_field_names():
    for method in (TrainingApi.prepare_dataset, TrainingApi.train_lora):
        names = [name for name in inspect.signature(method).parameters if name != "self"]
        unknown = [n for n in names if n not in BY_NAME and n not in ("options", "prepare", "new_run")]
        assert unknown == [], method.__name__
    assert {"images_dir", "trigger", "captioner"} <= {f.name for f in dataclasses.fields(PrepareConfig)}


def test_status_and_progress_text():
    strings = json.loads(MODULE_JSON.read_text(encoding="utf-8"))["language"]["en"]
    snapshot = {"state": "training", "running": True, "project": "cat", "step": 3, "total_steps": 10}
    snapshot |= {"eta_seconds": 65, "s_per_step": 9.3}
    assert render_status(snapshot, strings) == "Training cat: step 3/10"
    assert render_progress(snapshot, strings).endswith("<div>step 3/10 · 9.30 s/step · ETA 1m05s</div>")
    assert render_progress({**snapshot, "total_steps": 0}, strings) == ""
    stopped = {**snapshot, "state": "stopped", "running": False, "message": "at step 3"}
    assert render_progress(stopped, strings).endswith("<div>step 3/10</div>"), "no ETA once it has stopped"
    loading = {**snapshot, "step": 0, "total_steps": 0, "prep_stage": "loading_model", "prep_total": 0}
    assert render_status(loading, strings) == "Training cat: loading the model..."
    caching = {**loading, "prep_stage": "caching_latents", "prep_done": 3, "prep_total": 12}
    assert render_status(caching, strings) == "Training cat: caching latents 3/12"
