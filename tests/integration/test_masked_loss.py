"""Masked loss: masks are read and cropped with their photos, and weight the loss with a floor."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from core.model_files import model_entry
from families import family as family_class
from families.training import weighted_mse
from modules.lora_training.config import PrepareConfig, TrainConfig, config_from_dict
from modules.lora_training.data import load_items
from modules.lora_training.dataset.masks import gallery_image, mask_weights
from modules.lora_training.dataset.prepare import prepare
from modules.lora_training.events import Log, StepDone
from modules.lora_training.export import inspect_lora
from modules.lora_training.project import ProjectPaths
from modules.lora_training.train import lora_header, train
from tests.demo_names import DEMO_FLUX_NAME, DEMO_SDXL_NAME
from tests.image_folders import noise_image

BOX = (40, 20, 90, 60)  # left, top, right, bottom of the object in the 150x96 photo


def _photo_with_object(seed: int) -> Image.Image:
    """Grey noise with a red box: the object the mask marks."""
    pixels = np.asarray(noise_image(150, 96, seed=seed).convert("L").convert("RGB")).copy() // 2
    left, top, right, bottom = BOX
    pixels[top:bottom, left:right] = (230, 20, 20)
    return Image.fromarray(pixels)


def _box_mask(size=(150, 96)) -> Image.Image:
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    left, top, right, bottom = BOX
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask, mode="L")


@pytest.fixture(scope="module")
def masked_project(tmp_path_factory, models_dir):
    """Photos with a mask beside, with an alpha channel, with a wrong-size mask and an unreadable one."""
    root = tmp_path_factory.mktemp("masked")
    photos = root / "photos"
    photos.mkdir()
    _photo_with_object(1).save(photos / "beside.jpg", quality=95)
    _box_mask().save(photos / "beside.mask.png")
    rgba = _photo_with_object(2).convert("RGBA")
    rgba.putalpha(_box_mask())
    rgba.save(photos / "alpha.png")
    _photo_with_object(3).save(photos / "wrong.png")
    _box_mask((100, 50)).save(photos / "wrong.mask.png")
    _photo_with_object(4).save(photos / "broken.png")
    (photos / "broken.mask.png").write_bytes(b"not a png")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in photos.iterdir()}
    events = []
    config = config_from_dict(
        PrepareConfig,
        {"project": "masked", "images_dir": str(photos), "trigger": "ohwx", "resolution": 64, "captioner": "none"},
    )
    result = prepare(config, projects_dir=root / "projects", models_dir=models_dir, on_event=events.append)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in photos.iterdir()}
    assert before == after, "sources are only read"
    return root / "projects", result, events


def test_masks_are_cropped_with_their_photos_and_bad_ones_are_skipped_with_a_note(masked_project):
    projects, result, events = masked_project
    by_source = {entry["source"]: entry for entry in result.used}
    assert sorted(by_source) == ["alpha.png", "beside.jpg", "broken.png", "wrong.png"], "mask files are not photos"
    assert by_source["beside.jpg"]["mask_from"] == "file" and by_source["alpha.png"]["mask_from"] == "alpha"
    assert "mask" not in by_source["wrong.png"] and "100x50" in by_source["wrong.png"]["mask_note"]
    assert "mask" not in by_source["broken.png"] and "not a readable image" in by_source["broken.png"]["mask_note"]
    summary = next(e.message for e in events if isinstance(e, Log) and e.message.startswith("Prepared"))
    assert "Loss masks: 2 of 4" in summary and "wrong.mask.png ignored" in summary

    paths = ProjectPaths.for_project(projects, "masked")
    for source in ("beside.jpg", "alpha.png"):
        entry = by_source[source]
        assert entry["crop"]["left"] > 0, "the photo was cropped, not only resized"
        crop = np.asarray(Image.open(paths.images / entry["image"]).convert("RGB")).astype(int)
        mask = np.asarray(Image.open(paths.images / entry["mask"]))
        red = (crop[..., 0] > 150) & (crop[..., 1] < 90)
        marked = mask > 127
        assert red.any() and crop.shape[:2] == mask.shape
        disagree = (red ^ marked).sum()
        assert disagree <= 0.15 * marked.sum(), f"{source}: the mask lies on the object ({disagree} px differ)"
        rows, cols = np.nonzero(marked)
        red_rows, red_cols = np.nonzero(red)
        assert abs(rows.mean() - red_rows.mean()) < 0.5 and abs(cols.mean() - red_cols.mean()) < 0.5


def test_training_items_carry_their_masks_and_the_gallery_shows_an_overlay(masked_project):
    projects, _, _ = masked_project
    paths = ProjectPaths.for_project(projects, "masked")
    items = {item.image_path.name.split("-")[0]: item for item in load_items(paths)}
    assert items["beside"].mask_path is not None and items["wrong"].mask_path is None
    shown = gallery_image(items["beside"].image_path, items["beside"].mask_path, previews=paths.cache / "previews")
    crop = np.asarray(Image.open(items["beside"].image_path).convert("RGB")).astype(float)
    overlay = np.asarray(Image.open(shown)).astype(float)
    outside = np.asarray(Image.open(items["beside"].mask_path)) == 0
    assert shown.name == items["beside"].image_path.name and shown != items["beside"].image_path
    assert overlay[outside].mean() < 0.5 * crop[outside].mean(), "the masked-out part is darkened"
    weights = mask_weights(items["beside"].mask_path, size=(8, 8), flip=False, floor=0.1)
    assert weights.shape == (1, 1, 8, 8) and weights.min() == pytest.approx(0.1) and weights.max() <= 1.0
    flipped = mask_weights(items["beside"].mask_path, size=(8, 8), flip=True, floor=0.1)
    assert torch.allclose(flipped, weights.flip(-1), atol=1e-6)


def test_a_masked_out_region_counts_only_by_the_floor():
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 1:5] = 1.0
    floor = 0.1
    weights = floor + (1 - floor) * mask
    changed = target.clone()
    changed[:, :, mask[0, 0] == 0] += 3.0  # the target changes only where the mask is 0
    difference = weighted_mse(prediction, changed, weights) - weighted_mse(prediction, target, weights)
    outside = (mask == 0).expand_as(target)
    plain = ((prediction - changed) ** 2 - (prediction - target) ** 2) * outside
    assert torch.allclose(difference, floor * plain.mean(dim=(1, 2, 3)), atol=1e-6)
    zero_floor = weighted_mse(prediction, changed, mask) - weighted_mse(prediction, target, mask)
    assert torch.allclose(zero_floor, torch.zeros(2), atol=1e-6), "floor 0: the background does not count at all"


@pytest.mark.parametrize("model", [DEMO_SDXL_NAME, DEMO_FLUX_NAME])
def test_each_family_weights_its_loss_by_the_mask(masked_project, models_dir, model):
    items = load_items(ProjectPaths.for_project(masked_project[0], "masked"))[:2]
    entry = model_entry(models_dir, model)
    family = family_class(entry.family)(entry, models_dir=models_dir, device="cpu", weight_dtype=torch.float32)
    config = config_from_dict(TrainConfig, {"project": "x", "base_model": model})
    family.configure(config)
    generator = torch.Generator().manual_seed(1)
    channels = family.vae.config.latent_channels
    latents = torch.randn(2, channels, 8, 8, generator=generator)
    noise = torch.randn(2, channels, 8, 8, generator=generator)
    with torch.no_grad():
        text = family.encode_text(["ohwx", "a photo"])
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :, :4] = 1.0
    fixed = {"latents": latents, "text": text, "items": items, "generator": None, "config": config}
    fixed |= {"fixed_t": torch.tensor([0.3, 0.7]), "noise": noise}
    with torch.no_grad():
        plain = family.training_loss(**fixed)
        masked = family.training_loss(**fixed, loss_weights=mask)
        floored = family.training_loss(**fixed, loss_weights=0.1 + 0.9 * mask)
    assert torch.allclose(floored, 0.1 * plain + 0.9 * masked, rtol=1e-5), "weights apply per latent pixel"
    assert (masked < plain).all() and (masked > 0).all()


def test_training_with_masked_loss_weights_its_steps_and_says_so(masked_project, models_dir, tmp_path):
    projects, _, _ = masked_project
    losses = {}
    for masked in (False, True):
        events = []
        config = config_from_dict(
            TrainConfig,
            {"project": "masked", "base_model": DEMO_SDXL_NAME, "steps": 1, "rank": 4, "alpha": 4.0, "batch_size": 4}
            | {"masked_loss": masked, "mask_floor": 0.2, "flip": True, "validation_share": 0.0, "overwrite": True},
        )
        result = train(config, projects_dir=projects, models_dir=models_dir, loras_dir=tmp_path, on_event=events.append)
        assert result.status == "finished", result.message
        losses[masked] = next(e.loss for e in events if isinstance(e, StepDone))
    assert any("masked loss (2 of 4 images have a mask; floor 0.2)" in getattr(e, "message", "") for e in events)
    assert lora_header(result.lora_path)["lora_studio.masked_loss"] == "floor 0.2"
    assert "  masked loss: floor 0.2" in inspect_lora(result.lora_path)
    assert losses[True] < losses[False], "the same step, its masked-out pixels weighted by the floor"


def _levels_mask(size=(150, 96)) -> np.ndarray:
    """Five grey levels in bands, as 16-bit values."""
    levels = np.array([0, 1000, 16384, 32768, 65535], dtype=np.uint16)
    columns = np.arange(size[0]) * len(levels) // size[0]
    return np.tile(levels[columns], (size[1], 1))


def test_16_bit_and_transparent_masks_keep_their_levels_through_the_crop(tmp_path, models_dir):
    photos = tmp_path / "photos"
    photos.mkdir()
    sixteen = _levels_mask()
    eight = (sixteen.astype(np.int64) * 255 // 65535).astype(np.uint8)
    for seed, name in enumerate(("eight", "sixteen", "alpha")):
        _photo_with_object(10 + seed).save(photos / f"{name}.png")  # the same size: the same crop
    Image.fromarray(eight, mode="L").save(photos / "eight.mask.png")
    Image.fromarray(sixteen).save(photos / "sixteen.mask.png")  # mode I;16 on disk
    assert Image.open(photos / "sixteen.mask.png").mode.startswith("I")
    transparent = np.stack([np.full_like(eight, 255), eight], axis=-1)  # white, the levels in its alpha
    Image.fromarray(transparent, mode="LA").save(photos / "alpha.mask.png")
    config = config_from_dict(
        PrepareConfig,
        {"project": "levels", "images_dir": str(photos), "trigger": "ohwx", "resolution": 64, "captioner": "none"},
    )
    result = prepare(config, projects_dir=tmp_path / "projects", models_dir=models_dir)
    paths = ProjectPaths.for_project(tmp_path / "projects", "levels")
    by_source = {entry["source"]: entry for entry in result.used}
    crops = {
        name.removesuffix(".png"): np.asarray(Image.open(paths.images / e["mask"])) for name, e in by_source.items()
    }
    assert len(np.unique(crops["eight"])) >= 4, "grey levels, not a binary mask"
    assert np.array_equal(crops["sixteen"], crops["eight"]), "a 16-bit mask crops as its 8-bit twin"
    assert np.array_equal(crops["alpha"], crops["eight"]), "grey x alpha: the alpha is the mask"


def test_validation_weighs_masked_pixels_as_training_does(masked_project, models_dir):
    from modules.lora_training.train import _load_pixels
    from modules.lora_training.validation import NOISE_LEVELS, _noise_for, fixed_noise_loss, validation_weights

    items = load_items(ProjectPaths.for_project(masked_project[0], "masked"))
    items = [next(i for i in items if i.mask_path), next(i for i in items if not i.mask_path)]
    entry = model_entry(models_dir, DEMO_SDXL_NAME)
    family = family_class(entry.family)(entry, models_dir=models_dir, device="cpu", weight_dtype=torch.float32)
    plain = config_from_dict(TrainConfig, {"project": "masked", "base_model": DEMO_SDXL_NAME})
    masked = config_from_dict(TrainConfig, {"project": "masked", "base_model": DEMO_SDXL_NAME, "masked_loss": True})
    family.configure(plain)

    encoded = {}

    def inputs(item):  # each image encoded once: the figures below differ only by their weights
        if item.sha256 not in encoded:
            with torch.no_grad():
                mean, _ = family.encode_image_moments(_load_pixels(item, flip=False)[None]).chunk(2, dim=1)
                encoded[item.sha256] = mean, family.encode_text([item.caption])
        return encoded[item.sha256]

    measured = {
        name: fixed_noise_loss(family, items, inputs=inputs, config=c)
        for name, c in (("plain", plain), ("masked", masked))
    }
    direct = []
    for item in items:
        mean, text = inputs(item)
        weights = validation_weights(item, size=tuple(mean.shape[-2:]), config=masked)
        if item.mask_path is None:
            assert weights is None
        else:
            expected = mask_weights(item.mask_path, size=tuple(mean.shape[-2:]), flip=False, floor=masked.mask_floor)
            assert torch.allclose(weights, expected / expected.mean()) and weights.mean() == pytest.approx(1.0)
        levels = len(NOISE_LEVELS)
        with torch.no_grad():
            loss = family.training_loss(
                latents=family.scale_latents(mean).expand(levels, -1, -1, -1),
                text={key: value.expand(levels, *value.shape[1:]) for key, value in text.items()},
                items=[item] * levels,
                generator=None,
                config=plain,
                fixed_t=torch.tensor(NOISE_LEVELS),
                noise=torch.cat([_noise_for(item, tuple(mean.shape), level) for level in range(levels)]),
                loss_weights=None if weights is None else weights.expand(levels, -1, -1, -1),
            )
        direct.append(float(loss.mean()))
    assert measured["masked"] == pytest.approx(sum(direct) / len(direct), rel=1e-5)
    assert abs(measured["masked"] - measured["plain"]) > 1e-4 * measured["plain"], "the masks change the figure"
