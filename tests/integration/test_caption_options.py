"""Training with shuffled tags, kept tokens and tag dropout: the caption sequence and the LoRA survive a
stop + resume exactly, and cached text embeddings adapt (every variant cached, or encoding at each step)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import modules.lora_training.train as train_module
from families.flux import FluxFamily
from families.sdxl import SDXLFamily
from modules.lora_training.config import TrainConfig, config_from_dict
from modules.lora_training.dataset.captions import split_tags
from modules.lora_training.events import Log, StepDone
from modules.lora_training.train import train
from tests.demo_names import DEMO_FLUX_NAME, DEMO_SDXL_NAME

MANY_TAGS = "ohwx, red hair, smiling, outdoors, blue sky, tree, portrait"
FEW_TAGS = "ohwx, red hair, smiling"


def _caption_project(project, caption: str):
    projects, name = project
    for path in (projects / name / "images").glob("*.txt"):
        path.write_text(caption, encoding="utf-8")
    return projects, name


def _config(project_name, /, **options):
    values = {"project": project_name, "base_model": DEMO_SDXL_NAME, "steps": 3, "rank": 4, "alpha": 4.0}
    values["also_save_webui"] = False
    return config_from_dict(TrainConfig, {**values, **options})


@pytest.fixture
def drawn(monkeypatch):
    """The captions the trainer draws: {(step, sample index): caption}."""
    seen: dict[tuple[int, str], str] = {}
    original = train_module.caption_variant

    def recording(caption, **kwargs):
        variant = original(caption, **kwargs)
        seen[(kwargs["step"], kwargs["index"])] = variant
        return variant

    monkeypatch.setattr(train_module, "caption_variant", recording)
    return seen


def _encoded(monkeypatch, family_class) -> list[str]:
    """Every caption the family encodes, in order."""
    calls: list[str] = []
    original = family_class.encode_text

    def counting(self, captions):
        calls.extend(captions)
        return original(self, captions)

    monkeypatch.setattr(family_class, "encode_text", counting)
    return calls


def test_stop_and_resume_draw_the_same_captions_and_train_the_same_lora(project, models_dir, tmp_path, drawn):
    projects, name = _caption_project(project, MANY_TAGS)
    options = {"shuffle_caption": True, "keep_tokens": 2, "tag_dropout": 0.3}
    straight = train(
        _config(name, name="straight", **options),
        projects_dir=projects,
        models_dir=models_dir,
        loras_dir=tmp_path / "a",
    )
    assert straight.status == "finished"
    uninterrupted = dict(drawn)
    assert len(uninterrupted) == 3 and len(set(uninterrupted.values())) > 1
    for caption in uninterrupted.values():
        assert split_tags(caption)[:2] == ["ohwx", "red hair"], "the trigger and the kept token stay first"
        assert set(split_tags(caption)) <= set(split_tags(MANY_TAGS))

    drawn.clear()
    done = {"step": 0}

    def on_event(event):
        if isinstance(event, StepDone):
            done["step"] = event.step

    config = _config(name, name="resumed", **options)
    folders = {"projects_dir": projects, "models_dir": models_dir, "loras_dir": tmp_path / "b"}
    stopped = train(config, **folders, on_event=on_event, should_stop=lambda: done["step"] >= 2)
    assert stopped.status == "stopped" and stopped.step == 2
    resumed = train(config, **folders, resume=True)
    assert resumed.status == "finished" and resumed.step == 3
    assert drawn == uninterrupted, "the same caption for every (step, sample) after stop + resume"
    first = load_file(str(straight.checkpoint / "lora.safetensors"))
    final = load_file(str(resumed.checkpoint / "lora.safetensors"))
    assert all(torch.equal(final[k], first[k]) for k in first), "resumed run = uninterrupted run"


def test_cached_embeddings_with_shuffle_encode_at_each_step(project, models_dir, tmp_path, monkeypatch, drawn):
    projects, name = _caption_project(project, MANY_TAGS)
    encoded = _encoded(monkeypatch, SDXLFamily)
    events = []
    config = _config(name, steps=2, shuffle_caption=True, cache_text_embeddings=True, sample_every_steps=0)
    result = train(config, projects_dir=projects, models_dir=models_dir, loras_dir=tmp_path, on_event=events.append)
    assert result.status == "finished"
    logs = [e.message for e in events if isinstance(e, Log)]
    assert "Caption shuffle/tag dropout: captions are encoded at each step (text encoders stay on the device)" in logs
    described = next(line for line in logs if line.startswith("Training: "))
    assert "caption tags shuffled (the first 1 and the trigger kept in place)" in described
    assert "cached text embeddings" not in described
    assert set(drawn.values()) <= set(encoded), "each step's variants went through the text encoders"


def test_few_variants_are_cached_once_and_read_from_the_cache(project, models_dir, tmp_path, monkeypatch, drawn):
    projects, name = _caption_project(project, FEW_TAGS)  # 2 orders of the two tags past the trigger
    encoded = _encoded(monkeypatch, SDXLFamily)
    started = {}

    def on_event(event):
        if isinstance(event, Log) and event.message.startswith("Training: "):
            started["encoded"] = len(encoded)
        events.append(event)

    events = []
    config = _config(name, steps=2, shuffle_caption=True, keep_tokens=0, tag_dropout=0.0, sample_every_steps=0)
    result = train(config, projects_dir=projects, models_dir=models_dir, loras_dir=tmp_path, on_event=on_event)
    assert result.status == "finished"
    logs = [e.message for e in events if isinstance(e, Log)]
    assert "Caption shuffle/tag dropout: 2 caption variants cached" in logs
    assert {"ohwx, red hair, smiling", "ohwx, smiling, red hair"} <= set(encoded[: started["encoded"]])
    assert len(encoded) == started["encoded"], "no text encoding during the steps"
    assert set(drawn.values()) == {"ohwx, red hair, smiling", "ohwx, smiling, red hair"}


def test_flux_trains_with_shuffled_tags_encoded_at_each_step(project, models_dir, tmp_path, monkeypatch, drawn):
    projects, name = _caption_project(project, MANY_TAGS)
    encoded = _encoded(monkeypatch, FluxFamily)
    config = _config(name, base_model=DEMO_FLUX_NAME, steps=2, shuffle_caption=True, tag_dropout=0.2)
    result = train(config, projects_dir=projects, models_dir=models_dir, loras_dir=tmp_path)
    assert result.status == "finished"
    assert set(drawn.values()) <= set(encoded)
