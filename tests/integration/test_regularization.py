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
