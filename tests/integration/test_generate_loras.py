"""The Generate tab's LoRA list (one entry each, family and trigger word from the header) and the checks
that refuse a request before any work: the other family's LoRA, unreadable files, numbers out of range."""

from __future__ import annotations

import math
import os
import pickle
import struct
import threading

import pytest
import torch

from core.errors import UserError
from core.model_manager import GenerateLimits, GenerationRequest, LoraChoice, ModelManager, validate_request
from families import family as model_family
from modules.generate.tab import GenerateTab, lora_choices_from_args, whole_number
from modules.lora_training.main_file import write_main_lora
from tests.lora_files import write_diffusers_lora


def _small_main_lora(path, *, family: str, trigger: str = "ohwx") -> None:
    component, module = ("unet", "mid_block.attentions.0.proj_in") if family == "sdxl" else ("transformer", "x")
    layers = {component: {f"{module}.lora_A.weight": torch.ones(1, 4), f"{module}.lora_B.weight": torch.ones(4, 1)}}
    metadata = {"lora_studio.family": family, "lora_studio.trigger_word": trigger}
    keys = model_family(family).main_file_keys
    write_main_lora(path, layers, {component: {"r": 1, "lora_alpha": 1}}, metadata=metadata, keys=keys)


def _unreadable_files(loras) -> dict[str, str]:
    """Files in loras/ that are not LoRAs: name → what is wrong with them."""
    (loras / "empty.safetensors").write_bytes(b"")
    (loras / "pickled.safetensors").write_bytes(pickle.dumps({"lora": [1.0, 2.0]}))
    (loras / "text.safetensors").write_text("not a tensor file at all")
    with open(loras / "hugeheader.safetensors", "wb") as handle:  # claims a 100 MB+ header, holds a few bytes
        handle.write(struct.pack("<Q", 100 * 2**20 + 1) + b"{}")
    _small_main_lora(loras / "truncated.safetensors", family="sdxl")
    data = (loras / "truncated.safetensors").read_bytes()
    (loras / "truncated.safetensors").write_bytes(data[:-8])
    return {name: "corrupt" for name in ("empty", "pickled", "text", "hugeheader", "truncated")}


@pytest.fixture
def loras(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    return folder


@pytest.fixture
def manager(loras, models_dir):
    return ModelManager(models_dir=models_dir, loras_dir=loras, device="cpu")


def test_each_lora_is_listed_once_with_family_and_trigger(manager, loras, demo_paths):
    _small_main_lora(loras / "my_cat.safetensors", family="flux", trigger="ohwx cat")
    _small_main_lora(loras / "webui" / "my_cat.safetensors", family="flux")
    _small_main_lora(loras / "diffusers" / "my_cat.safetensors", family="flux")
    write_diffusers_lora(demo_paths.sdxl_folder, loras / "third_party.safetensors", family="sdxl")
    write_diffusers_lora(demo_paths.flux_folder, loras / "sub" / "other.safetensors", family="flux")
    bad = _unreadable_files(loras)
    details = {info.name: info for info in manager.lora_details()}
    assert sorted(details) == sorted(
        ["my_cat.safetensors", "third_party.safetensors", "sub/other.safetensors"] + [f"{n}.safetensors" for n in bad]
    )
    assert (details["my_cat.safetensors"].family, details["my_cat.safetensors"].trigger_word) == ("flux", "ohwx cat")
    assert details["third_party.safetensors"].family == "sdxl", "inferred from the key names"
    assert details["sub/other.safetensors"].family == "flux"
    for name in bad:
        info = details[f"{name}.safetensors"]
        assert info.family is None and info.problem.startswith("corrupt or not a LoRA file"), name

    tab = GenerateTab(model_manager=manager, config=object(), translations={})
    strings = {
        "lora_entry": "{name} · {family}",
        "lora_entry_other_family": "{name} ({family}, not for {model_family})",
        "lora_trigger": "{label} · trigger: {trigger}",
        "lora_unreadable": "{name} (unreadable)",
    }
    choices = dict((value, label) for label, value in tab.lora_choices(demo_paths.sdxl_folder.name, strings))
    assert choices["my_cat.safetensors"] == "my_cat (Flux, not for SDXL) · trigger: ohwx cat"
    assert choices["third_party.safetensors"] == "third_party · SDXL"
    assert choices["empty.safetensors"] == "empty (unreadable)"
    flux_choices = dict((value, label) for label, value in tab.lora_choices(demo_paths.flux_folder.name, strings))
    assert flux_choices["my_cat.safetensors"] == "my_cat · Flux · trigger: ohwx cat"


def test_other_family_and_unreadable_loras_are_refused_before_loading(manager, loras, demo_paths):
    _small_main_lora(loras / "my_cat.safetensors", family="flux")
    bad = _unreadable_files(loras)
    request = GenerationRequest(model=demo_paths.sdxl_folder.name, prompt="a cat", steps=2, width=64, height=64)
    with pytest.raises(UserError) as refused:
        manager.generate(GenerationRequest(**{**request.__dict__, "loras": (LoraChoice("my_cat.safetensors"),)}))
    assert str(refused.value).startswith("my_cat.safetensors is a Flux LoRA; the selected model is SDXL")
    for name in bad:
        with pytest.raises(UserError) as refused:
            manager.generate(GenerationRequest(**{**request.__dict__, "loras": (LoraChoice(f"{name}.safetensors"),)}))
        message = str(refused.value)
        assert f"corrupt or not a LoRA file: {name}.safetensors" in message and "another base model" not in message
    assert manager.loaded_model is None, "refused before any model was loaded"


def test_a_fifo_in_the_loras_folder_never_blocks(manager, loras):
    os.mkfifo(loras / "pipe.safetensors")
    _small_main_lora(loras / "ok.safetensors", family="sdxl")
    done = []
    worker = threading.Thread(target=lambda: done.append(manager.lora_details()), daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert done and [info.name for info in done[0]] == ["ok.safetensors"]
    with pytest.raises(UserError, match="is not a regular file: only LoRA files are read"):
        manager.lora_info("pipe.safetensors")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": 151}, "Steps 151 is not allowed: use a whole number between 1 and 150"),
        ({"steps": 0}, "Steps 0 is not allowed: use a whole number between 1 and 150"),
        ({"width": 2064}, "Width 2064 is not valid for SDXL: use a multiple of 8 between 64 and 2048"),
        ({"height": 4096}, "Height 4096 is not valid for SDXL: use a multiple of 8 between 64 and 2048"),
        ({"width": 100}, "Width 100 is not valid for SDXL: use a multiple of 8"),
        ({"guidance": math.nan}, "Guidance must be a number between 0 and 50 (got nan)"),
        ({"guidance": math.inf}, "Guidance must be a number between 0 and 50 (got inf)"),
        (
            {"loras": (LoraChoice("a.safetensors", math.nan, slot=3),)},
            "LoRA 3 (a.safetensors) weight must be a number between -5 and 5 (got nan)",
        ),
        (
            {"loras": (LoraChoice("a.safetensors", -5.5),)},
            "LoRA 1 (a.safetensors) weight must be a number between -5 and 5",
        ),
        ({"loras": (LoraChoice("a.safetensors", math.inf, slot=2),)}, "LoRA 2 (a.safetensors) weight"),
    ],
)
def test_numbers_out_of_range_are_refused_naming_field_and_range(changes, message):
    request = GenerationRequest(**{**dict(model="m", prompt="a cat", width=1024, height=1024), **changes})
    with pytest.raises(UserError) as refused:
        validate_request(request, "sdxl")
    assert message in str(refused.value)


def test_limits_come_from_the_config_and_bounds_are_accepted(manager, demo_paths):
    from types import SimpleNamespace

    validate_request(
        GenerationRequest(
            model="m",
            prompt="x",
            steps=150,
            width=2048,
            height=2048,
            guidance=50.0,
            loras=(LoraChoice("a", -5.0), LoraChoice("b", 5.0)),
        ),
        "sdxl",
    )
    GenerateTab(
        model_manager=manager, config=SimpleNamespace(MAX_GENERATE_STEPS=10, MAX_IMAGE_SIDE=512), translations={}
    )
    assert manager.limits == GenerateLimits(max_steps=10, max_side=512)
    request = GenerationRequest(model=demo_paths.sdxl_folder.name, prompt="a cat", steps=11, width=64, height=64)
    with pytest.raises(UserError, match="between 1 and 10"):
        manager.generate(request)
    with pytest.raises(UserError, match="between 64 and 512"):
        manager.generate(GenerationRequest(**{**request.__dict__, "steps": 2, "width": 640}))
    assert manager.loaded_model is None


def test_page_and_api_values_that_are_not_numbers_are_named():
    assert lora_choices_from_args(("a", 0.5, None, 1.0, "b", None, None, 1.0)) == (
        LoraChoice("a", 0.5, slot=1),
        LoraChoice("b", 1.0, slot=3),
    )
    with pytest.raises(UserError, match=r"LoRA 2 \(b\) weight must be a number"):
        lora_choices_from_args((None, 1.0, "b", "heavy"))
    assert whole_number("Steps", 20.0) == 20 and whole_number("Seed", None, default=-1) == -1
    for value in (math.nan, math.inf, 2.5, "many", None):
        with pytest.raises(UserError, match="Steps must be a whole number"):
            whole_number("Steps", value)


def test_config_declares_and_checks_the_limits(tmp_path):
    from core.config import config_from_dict

    base = {
        "MODELS_DIR": "m",
        "LORAS_DIR": "l",
        "LORA_PROJECTS_DIR": "p",
        "OUTPUTS_DIR": "o",
        "DEFAULT_SDXL_MODEL_FOR_LORA": "a",
        "DEFAULT_FLUX_MODEL_FOR_LORA": "b",
        "DEFAULT_SD15_MODEL_FOR_LORA": "c",
    }
    config = config_from_dict(base, base_dir=tmp_path)
    assert (config.MAX_GENERATE_STEPS, config.MAX_IMAGE_SIDE) == (150, 2048)
    assert config_from_dict({**base, "MAX_GENERATE_STEPS": 40}, base_dir=tmp_path).MAX_GENERATE_STEPS == 40
    for key, value, message in (
        ("MAX_GENERATE_STEPS", 0, "MAX_GENERATE_STEPS must be between 1 and 1000"),
        ("MAX_IMAGE_SIDE", 100000, "MAX_IMAGE_SIDE must be between 64 and 8192"),
        ("MAX_IMAGE_SIDE", "big", "MAX_IMAGE_SIDE must be a int"),
        ("MAX_GENERATE_STEPS", True, "MAX_GENERATE_STEPS must be a int"),
    ):
        with pytest.raises(UserError, match=message):
            config_from_dict({**base, key: value}, base_dir=tmp_path)
