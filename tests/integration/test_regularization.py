"""Regularization images: the batch mix follows the ratio, the prior term enters the loss with its weight,
rendered class images are cached and reused, folders of class images are cropped like photos."""

from pathlib import Path

import pytest

from core.errors import UserError
from modules.lora_training.config import TrainConfig, config_from_dict
from modules.lora_training.data import BatchStream, MixedStream, TrainItem, planned_steps
from modules.lora_training.events import Log, PrepProgress, StepDone
from modules.lora_training.regularization import folder_class_images
from modules.lora_training.train import lora_header, train
from tests.demo_names import DEMO_SDXL_NAME
from tests.image_folders import noise_image


def _items(count: int, prefix: str) -> list[TrainItem]:
    return [
        TrainItem(f"{prefix}{i:04d}", Path(f"{prefix}{i}.png"), prefix, (64, 64), (64, 64), (0, 0))
        for i in range(count)
    ]


def _mix(ratio: float, seed: int) -> MixedStream:
    common = {"batch_size": 2, "repeats": 1, "seed": seed, "shuffle": True}
    return MixedStream(
        BatchStream(_items(10, "subject"), **common), BatchStream(_items(7, "class"), **common), ratio=ratio, seed=seed
    )


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.9])
def test_the_batch_mix_follows_the_ratio_and_the_seed(ratio):
    stream = _mix(ratio, seed=3)
    kinds = [stream.share(m, rank=0, world=1).prior for m in range(1000)]
    assert abs(sum(kinds) - ratio * 1000) <= 1
    for start in range(0, 1000, 100):  # spread evenly, not bunched
        assert abs(sum(kinds[start : start + 100]) - ratio * 100) <= 1
    shares = [stream.share(m, rank=0, world=1) for m in range(50)]
    assert all(s.items[0].caption == ("class" if s.prior else "subject") for s in shares)
    assert kinds == [_mix(ratio, seed=3).share(m, rank=0, world=1).prior for m in range(1000)], "same seed"
    phases = {tuple(_mix(ratio, seed=seed).share(m, rank=0, world=1).prior for m in range(20)) for seed in range(8)}
    assert len(phases) > 1, "the seed sets where the class batches fall"


def test_training_images_keep_their_order_and_the_run_grows_to_keep_its_epochs():
    stream = _mix(0.25, seed=1)
    plain = BatchStream(_items(10, "subject"), batch_size=2, repeats=1, seed=1, shuffle=True)
    subject = [s for s in (stream.share(m, rank=0, world=1) for m in range(40)) if not s.prior]
    assert [s.items for s in subject] == [plain.share(i, rank=0, world=1).items for i in range(len(subject))]
    common = {"batch_size": 1, "repeats": 1, "accumulation": 1, "epochs": 3, "steps": None}
    assert planned_steps([10], **common) == 30 and planned_steps([10], **common, reg_ratio=0.25) == 40


def test_a_class_prompt_is_needed_and_folders_are_cropped_like_photos(tmp_path):
    with pytest.raises(UserError, match="class_prompt"):
        config_from_dict(TrainConfig, {"project": "x", "base_model": "m", "reg_ratio": 0.5})
    folder = tmp_path / "dogs"
    folder.mkdir()
    noise_image(120, 64, seed=1).save(folder / "a.png")
    noise_image(64, 64, seed=2).save(folder / "b.jpg")
    (folder / "c.png").write_bytes(b"not an image")
    events = []
    items = folder_class_images(
        folder, store=tmp_path / "store", caption="a dog", resolution=64, max_image_bytes=2**20, on_event=events.append
    )
    assert len(items) == 2 and all(i.caption == "a dog" and i.bucket == (64, 64) for i in items)
    assert all(i.image_path.parent == tmp_path / "store" and i.image_path.is_file() for i in items)
    assert any("1 file(s)" in e.message for e in events if isinstance(e, Log))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError):
        folder_class_images(
            tmp_path / "empty", store=tmp_path / "s", caption="x", resolution=64, max_image_bytes=9, on_event=print
        )


def _first_step(project, models_dir, loras: Path, **options):
    projects, name = project
    values = {"project": name, "base_model": DEMO_SDXL_NAME, "steps": 1, "rank": 4, "alpha": 4.0}
    values |= {"reg_ratio": 0.5, "class_prompt": "a photo of a dog", "reg_count": 2, "sample_steps": 2}
    values |= {"gradient_accumulation": 2, "validation_share": 0.0, **options}
    events = []
    result = train(
        config_from_dict(TrainConfig, values),
        projects_dir=projects,
        models_dir=models_dir,
        loras_dir=loras,
        on_event=events.append,
        new_run=True,
    )
    assert result.status == "finished", result.message
    loss = next(e.loss for e in events if isinstance(e, StepDone))
    renders = sum(1 for e in events if isinstance(e, PrepProgress) and e.stage == "class_images")
    return loss, renders, events, result


def test_prior_loss_enters_with_its_weight_and_rendered_class_images_are_reused(project, models_dir, tmp_path):
    none, first_renders, _, _ = _first_step(project, models_dir, tmp_path / "a", prior_loss_weight=0.0)
    one, renders, events, result = _first_step(project, models_dir, tmp_path / "b", prior_loss_weight=1.0)
    two, _, _, _ = _first_step(project, models_dir, tmp_path / "c", prior_loss_weight=2.0)
    assert first_renders == 2 and renders == 0, "rendered once, then read from the cache"
    stored = list((project[0] / ".class_images").glob("*/*.png"))
    assert len(stored) == 2
    # One of the step's two micro-batches is the class batch: loss = (subject + w * prior) / 2.
    prior = 2 * (one - none)
    assert prior > 0
    assert two == pytest.approx(none + prior, rel=1e-6), "the prior part scales with prior_loss_weight"
    described = next(e.message for e in events if isinstance(e, Log) and e.message.startswith("Training:"))
    assert "2 class images (rendered by the base model) captioned 'a photo of a dog', 50% of the micro-batches" in (
        described
    )
    header = lora_header(result.lora_path)
    assert header["ss_num_reg_images"] == "2" and '"prior_loss_weight": 1.0' in header["lora_studio.regularization"]
    from modules.lora_training.export import inspect_lora

    assert '  regularization: {"class_prompt": "a photo of a dog", "images": 2' in inspect_lora(result.lora_path)


def test_the_estimate_names_the_extra_steps_and_the_rendering(models_dir):
    from modules.lora_training.estimate import estimate_run

    values = {"project": "x", "base_model": DEMO_SDXL_NAME, "reg_ratio": 0.2, "class_prompt": "a dog", "reg_count": 50}
    text = estimate_run(config_from_dict(TrainConfig, values), models_dir=models_dir, resolution=64, timing=False)
    assert "20% of the micro-batches are class images; a run set by epochs takes 1.25x the steps" in text.describe()
    assert "50 class images are rendered once" in text.describe()


def test_a_stop_while_rendering_keeps_the_images_made_and_resume_renders_the_rest(project, models_dir, tmp_path):
    projects, name = project
    values = {"project": name, "base_model": DEMO_SDXL_NAME, "steps": 1, "rank": 4, "alpha": 4.0}
    values |= {"reg_ratio": 0.5, "class_prompt": "a dog", "reg_count": 3, "sample_steps": 2, "validation_share": 0.0}
    config = config_from_dict(TrainConfig, values)
    events = []
    common = {"projects_dir": projects, "models_dir": models_dir, "loras_dir": tmp_path}
    stop = lambda: any(isinstance(e, PrepProgress) and e.stage == "class_images" for e in events)  # noqa: E731
    stopped = train(config, on_event=events.append, should_stop=stop, **common)
    assert stopped.status == "stopped" and stopped.step == 0
    assert len(list((projects / ".class_images").glob("*/*.png"))) == 1
    events.clear()
    resumed = train(config, on_event=events.append, resume=True, **common)
    assert resumed.status == "finished"
    assert sum(1 for e in events if isinstance(e, PrepProgress) and e.stage == "class_images") == 2
    assert len(list((projects / ".class_images").glob("*/*.png"))) == 3


def test_the_app_reads_class_images_only_inside_its_image_roots(app_config, tmp_path_factory):
    from core.model_manager import ModelManager
    from modules.lora_training.jobs import TrainingJobs

    manager = ModelManager(models_dir=app_config.MODELS_DIR, loras_dir=app_config.LORAS_DIR, device="cpu")
    jobs = TrainingJobs(model_manager=manager, app_config=app_config)
    outside = tmp_path_factory.mktemp("elsewhere")  # beside the app's tmp folder, its only image root
    config = config_from_dict(
        TrainConfig,
        {"project": "p", "base_model": DEMO_SDXL_NAME, "reg_ratio": 0.3, "class_prompt": "a dog"}
        | {"reg_images_dir": str(outside)},
    )
    with pytest.raises(UserError, match="is not inside the folders this app may read"):
        jobs.start(train_config=config)
    assert not jobs.is_running()


def _dog_folder(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for index in range(count):
        noise_image(96 + 8 * (index % 3), 64, seed=50 + index).save(folder / f"dog{index:02d}.png")
    return folder


def _read_folder(folder, store, *, resolution=64, should_stop=lambda: False, on_event=lambda event: None):
    return folder_class_images(
        folder,
        store=store,
        caption="a dog",
        resolution=resolution,
        max_image_bytes=2**20,
        on_event=on_event,
        should_stop=should_stop,
    )


def test_class_images_are_decoded_once_and_a_stop_ends_the_read_at_the_next_file(tmp_path, monkeypatch):
    import time

    import modules.lora_training.dataset.images as images

    real, decoded = images.load_image, []
    monkeypatch.setattr(images, "load_image", lambda data: decoded.append(1) or real(data))
    folder = _dog_folder(tmp_path / "dogs", 12)
    first = _read_folder(folder, tmp_path / "store")
    assert len(decoded) == 12
    again = _read_folder(folder, tmp_path / "store")
    assert len(decoded) == 12, "a rerun reads the bytes, finds their crop and decodes nothing"
    assert again == first
    (tmp_path / "store" / first[0].image_path.name).unlink()  # a crop gone: that one file is decoded again
    assert _read_folder(folder, tmp_path / "store") == first and len(decoded) == 13
    assert len(_read_folder(folder, tmp_path / "store", resolution=128)) == 12 and len(decoded) == 25

    events, stopped_at = [], []

    def stop() -> bool:
        if not stopped_at and any(isinstance(e, PrepProgress) for e in events):
            stopped_at.append(time.monotonic())
        return bool(stopped_at)

    read = _read_folder(folder, tmp_path / "fresh", should_stop=stop, on_event=events.append)
    assert time.monotonic() - stopped_at[0] < 1.0
    assert len(read) == 1 and len(list((tmp_path / "fresh").glob("*.png"))) == 1, "the read ended at the next file"


def test_a_sweep_reads_class_images_only_inside_the_image_roots(app_config, sdxl_project, tmp_path_factory):
    import json

    from core.model_manager import ModelManager
    from modules.lora_training.jobs import TrainingJobs
    from modules.lora_training.sweep_space import parse_space
    from tests.conftest import seven_image_copy

    with pytest.raises(UserError, match='Sweep parameter reg_images_dir: .* cannot be swept; set it in "fixed"'):
        parse_space(json.dumps({"parameters": {"reg_images_dir": ["/etc", "/root"]}}), trials=2)
    import shutil

    copied, name = seven_image_copy(sdxl_project, tmp_path_factory.mktemp("seven") / "projects")
    shutil.copytree(copied / name, app_config.LORA_PROJECTS_DIR / name)
    outside = _dog_folder(tmp_path_factory.mktemp("elsewhere") / "dogs", 2)  # beside the app's only image root
    inside = _dog_folder(app_config.IMAGE_ROOTS[0] / "dogs", 2)
    manager = ModelManager(models_dir=app_config.MODELS_DIR, loras_dir=app_config.LORAS_DIR, device="cpu")
    jobs = TrainingJobs(model_manager=manager, app_config=app_config)
    fixed = {"reg_ratio": 0.5, "class_prompt": "a dog"}

    def space(folder) -> str:
        return json.dumps({"parameters": {"rank": [4, 8]}, "fixed": {**fixed, "reg_images_dir": str(folder)}})

    for refused in (outside, "/etc"):
        with pytest.raises(UserError, match="is not inside the folders this app may read"):
            jobs.sweep(name, space_text=space(refused), trials=2, base_model=DEMO_SDXL_NAME)
    from modules.lora_training.sweep import Place, open_sweep, study_names

    place = Place(app_config.LORA_PROJECTS_DIR, app_config.MODELS_DIR, name, image_roots=app_config.IMAGE_ROOTS)
    assert not jobs.is_running() and study_names(place) == [], "refused before any study exists"
    assert open_sweep(place, space_text=space(inside), trials=2, base_model=DEMO_SDXL_NAME).settings[
        "reg_images_dir"
    ] == str(inside)


def test_the_trainer_reads_the_class_folder_the_start_check_resolved(project, models_dir, tmp_path, monkeypatch):
    projects, name = project
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _dog_folder(tmp_path / "home" / "dogs", 3)
    values = {"project": name, "base_model": DEMO_SDXL_NAME, "steps": 1, "rank": 4, "validation_share": 0.0}
    config = config_from_dict(
        TrainConfig, values | {"reg_ratio": 0.5, "class_prompt": "a dog", "reg_images_dir": "~/dogs"}
    )
    common = {"projects_dir": projects, "models_dir": models_dir, "loras_dir": tmp_path / "loras"}
    with pytest.raises(UserError, match="is not inside the folders this app may read"):
        train(config, image_roots=[tmp_path / "photos"], **common)  # refused before the model loads
    events = []

    def stop() -> bool:  # Stop pressed once the first class image is read
        return any(isinstance(e, PrepProgress) and e.stage == "class_images" for e in events)

    stopped = train(config, on_event=events.append, should_stop=stop, image_roots=[tmp_path / "home"], **common)
    assert stopped.status == "stopped" and stopped.step == 0
    assert not any(isinstance(e, Log) and e.message.startswith("Latents:") for e in events), "no caching once stopped"
    read = [e for e in events if isinstance(e, PrepProgress) and e.stage == "class_images"]
    assert [(e.done, e.total) for e in read] == [(1, 3)], "~/dogs read as the start check resolved it, then stopped"
    assert len(list((projects / ".class_images" / "from-folders").glob("*.png"))) == 1


def test_a_stop_while_caching_latents_ends_at_the_next_image_and_keeps_what_was_written(project, models_dir, tmp_path):
    projects, name = project
    values = {"project": name, "base_model": DEMO_SDXL_NAME, "steps": 1, "rank": 4, "alpha": 4.0, "flip": True}
    config = config_from_dict(TrainConfig, values)
    events = []
    common = {"projects_dir": projects, "models_dir": models_dir, "loras_dir": tmp_path}
    stop = lambda: any(isinstance(e, PrepProgress) and e.stage == "caching_latents" for e in events)  # noqa: E731
    stopped = train(config, on_event=events.append, should_stop=stop, **common)
    assert stopped.status == "stopped" and stopped.step == 0
    assert [e.done for e in events if isinstance(e, PrepProgress) and e.stage == "caching_latents"] == [1]
    assert not any(isinstance(e, Log) and e.message.startswith("Latents:") for e in events)
    assert len(list((projects / name / "cache" / "latents").glob("*.safetensors"))) == 1, "the one written is kept"
    events.clear()
    resumed = train(config, on_event=events.append, resume=True, **common)
    assert resumed.status == "finished"
    latents = next(e.message for e in events if isinstance(e, Log) and e.message.startswith("Latents:"))
    assert latents.endswith("1 from cache"), latents
