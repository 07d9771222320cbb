"""What a first-time user sees before training: the live step arithmetic, the checkpoint/sample cadence,
the default captioner, caption detail in words, and a console without known-harmless noise."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from core.console import KNOWN_NOISE, quiet_known_noise
from core.i18n import translate
from model_formats.demo_models import DEMO_FLORENCE_NAME
from modules.lora_training.config import TrainConfig
from modules.lora_training.data import epoch_batches, every_tenth, planned_steps
from modules.lora_training.dataset.scan import count_image_files
from modules.lora_training.form import AUTO, BY_NAME, config_values, default_widget_values, run_plan, widget_values
from modules.lora_training.ui import LoraTrainingTab

MODULE_JSON = Path(__file__).resolve().parents[2] / "modules" / "lora_training" / "module.json"
ENGLISH = json.loads(MODULE_JSON.read_text(encoding="utf-8"))["language"]["en"]


def english(key, **values):
    return translate(key, ENGLISH, **values)


@pytest.mark.parametrize(("sizes", "batch", "repeats"), [([12], 1, 1), ([5, 3, 1], 2, 1), ([7, 2], 4, 3)])
def test_planned_steps_count_the_batches_the_trainer_draws(sizes, batch, repeats):
    items = [SimpleNamespace(bucket=(64 * (b + 1), 64)) for b, size in enumerate(sizes) for _ in range(size)]
    drawn = len(epoch_batches(items, batch_size=batch, repeats=repeats, seed=1, epoch=0, shuffle=True))
    assert planned_steps(sizes, batch_size=batch, repeats=repeats, accumulation=1, epochs=1, steps=None) == drawn
    assert planned_steps(sizes, batch_size=batch, repeats=repeats, accumulation=1, epochs=3, steps=None) == 3 * drawn
    assert planned_steps(sizes, batch_size=batch, repeats=repeats, accumulation=1, epochs=3, steps=40) == 40


def test_cadence_auto_is_a_tenth_of_the_run_and_zero_is_never():
    assert every_tenth(None, 120) == 12
    assert every_tenth(None, 3) == 1, "a short run still gets its checkpoints and samples"
    assert every_tenth(0, 120) == 0
    assert every_tenth(25, 120) == 25


def test_the_plan_line_shows_the_arithmetic_and_the_cadence():
    values = {**default_widget_values(), "epochs": 10, "repeats": 1, "batch_size": 1}
    assert run_plan([12], values, t=english, exact=True) == (
        "12 images × 1 repeats × 10 epochs ÷ batch 1 = 120 steps; a checkpoint every 12 steps, a sample every 12 steps."
    )
    changed = {**values, "steps": 300, "save_every_steps": 0, "sample_every_steps": 50}
    assert run_plan([12], changed, t=english, exact=False) == (
        "300 steps (Steps is set, so epochs are not used); a checkpoint only at the end, a sample every 50 steps."
    )
    assert run_plan(None, values, t=english, exact=False) == english("plan_unknown")
    assert run_plan([40], values, t=english, exact=False).startswith("about 40 images")


def test_cadence_fields_start_on_every_tenth_of_the_run():
    page = {**default_widget_values(), "project": "p", "base_model": "m"}
    assert page["save_every_steps"] == AUTO and page["sample_every_steps"] == AUTO, "the page starts on auto"
    config = TrainConfig(**config_values(TrainConfig, page))
    assert config.save_every_steps is None and config.sample_every_steps is None
    zero = TrainConfig(**config_values(TrainConfig, {**page, "save_every_steps": 0, "sample_every_steps": 0}))
    assert zero.save_every_steps == 0 and zero.sample_every_steps == 0
    assert TrainConfig(project="p", base_model="m").save_every_steps == 0, "CLI and API keep their explicit default"
    assert widget_values({"save_every_steps": None, "sample_every_steps": 0}) == {
        "save_every_steps": AUTO,
        "sample_every_steps": 0,
    }, "a preset's null shows as the automatic value"


def test_caption_detail_is_offered_in_words():
    labels = dict(BY_NAME["caption_task"].choice_labels)
    assert set(labels) == set(BY_NAME["caption_task"].choices)
    assert [english(labels[task]) for task in BY_NAME["caption_task"].choices] == [
        "short (a few words)",
        "detailed (a sentence or two)",
        "very detailed (a paragraph)",
    ]


def test_the_random_demo_florence_is_not_the_default_captioner(tmp_path):
    def tab():
        config = SimpleNamespace(MODELS_DIR=tmp_path, LORA_PROJECTS_DIR=tmp_path, IMAGE_ROOTS=[tmp_path])
        return LoraTrainingTab(jobs=None, model_manager=None, gestionnaire=None, config=config)

    (tmp_path / "captioners" / DEMO_FLORENCE_NAME).mkdir(parents=True)
    (tmp_path / "captioners" / DEMO_FLORENCE_NAME / "config.json").write_text("{}")
    assert tab().default_captioner() == "none"
    (tmp_path / "captioners" / "Florence-2-base").mkdir()  # where real weights go (README)
    assert tab().default_captioner() == "florence2"


def test_image_files_are_counted_quickly_and_within_bounds(tmp_path):
    for name in ("a.jpg", "b.PNG", "notes.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.webp").write_bytes(b"x")
    (tmp_path / "link.png").symlink_to(tmp_path / "a.jpg")
    assert count_image_files(tmp_path, subfolders=False) == 2
    assert count_image_files(tmp_path, subfolders=True) == 3
    assert count_image_files(tmp_path, subfolders=True, limit=2) <= 2


def test_counting_photos_reads_no_more_than_its_limit(tmp_path, monkeypatch):
    from modules.lora_training.dataset import scan

    for index in range(500):
        (tmp_path / f"{index}.png").write_bytes(b"x")
    read = []
    real_scandir = scan.os.scandir

    class Counting:  # the real scandir, its entries counted as they are read
        def __init__(self, path):
            self.inner = real_scandir(path)

        def __enter__(self):
            return (read.append(entry) or entry for entry in self.inner)

        def __exit__(self, *exc):
            self.inner.close()

    monkeypatch.setattr(scan.os, "scandir", Counting)
    assert count_image_files(tmp_path, subfolders=True, limit=100) == 100
    assert len(read) <= 101


def test_known_noise_is_dropped_and_other_warnings_pass():
    quiet_known_noise(progress_bars=True)
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    for entry in KNOWN_NOISE:
        logger = logging.getLogger(entry.logger)
        logger.addHandler(handler)
        try:
            logger.warning("prefix %s suffix", entry.contains)
            logger.warning("a new warning from the same library")
        finally:
            logger.removeHandler(handler)
    assert seen == ["a new warning from the same library"] * len(KNOWN_NOISE)


def test_the_plan_line_counts_the_class_image_batches():
    values = {**default_widget_values(), "epochs": 10, "repeats": 1, "batch_size": 1, "reg_ratio": 0.25}
    assert run_plan([12], values, t=english, exact=True).startswith(
        "12 images × 1 repeats × 10 epochs ÷ batch 1 = 160 steps, with 25% class-image batches on top;"
    )
