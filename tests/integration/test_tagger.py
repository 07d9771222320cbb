"""The WD14 tagger: the published preprocessing, the tiny tagger's known scores, the tag rules in prepared
captions (thresholds, cap, exclusions, always-include, rating, underscores, brackets, trigger), the
Florence-2 + tags ensemble, the per-image caption cache and the fallbacks when a captioner fails."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from core.errors import UserError
from model_formats.demo_models import TINY_TAGS, tiny_tagger_weights
from modules.lora_training.config import PrepareConfig, config_from_dict
from modules.lora_training.dataset import wd14_tagger
from modules.lora_training.dataset.captions import inject_trigger, sentence_and_tags
from modules.lora_training.dataset.prepare import prepare
from modules.lora_training.dataset.wd14_tagger import TagSettings, WD14Tagger, preprocess

NAMES = [name for name, _ in TINY_TAGS]
CATEGORIES = [category for _, category in TINY_TAGS]
COLOURS = {  # top half, bottom half
    "red.png": ((210, 40, 40), (210, 40, 40)),
    "sky.png": ((60, 110, 220), (50, 200, 60)),
    "night.png": ((20, 20, 90), (25, 15, 80)),
    "pale.png": ((235, 230, 240), (220, 225, 235)),
}


def hand_preprocess(image: Image.Image, size: int) -> np.ndarray:
    """The published recipe, step by step: alpha on white, centred white square, bicubic resize, RGB→BGR."""
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
    alpha = rgba[..., 3:] / 255
    rgb = np.rint(rgba[..., :3] * alpha + 255 * (1 - alpha))
    height, width = rgb.shape[:2]
    side = max(height, width)
    square = np.full((side, side, 3), 255.0)
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = rgb
    if side != size:  # the resize is PIL's bicubic filter, as in the reference
        square = np.asarray(Image.fromarray(square.astype(np.uint8)).resize((size, size), Image.BICUBIC), float)
    return square[:, :, ::-1].astype(np.float32)


def known_scores(image: Image.Image) -> np.ndarray:
    """The tiny tagger's scores computed from its weights: quadrant means of the BGR input / 255."""
    x = hand_preprocess(image, 64).astype(np.float64)
    features = x.reshape(2, 32, 2, 32, 3).mean(axis=(1, 3)).reshape(12) / 255
    weight, bias = tiny_tagger_weights()
    return 1 / (1 + np.exp(-(features @ weight + bias)))


def expected_tags(scores, *, general=0.35, character=0.85, cap=0, rating=False, exclude=(), include=(), **rules):
    kept = [
        i
        for i, category in enumerate(CATEGORIES)
        if ((category == 4 and scores[i] > character) or (category == 0 and scores[i] > general))
        and NAMES[i] not in exclude
    ]
    kept.sort(key=lambda i: -scores[i])
    kept = kept[:cap] if cap else kept
    kept.sort(key=lambda i: (CATEGORIES[i] != 4, -scores[i]))
    names = [*include, *(NAMES[i] for i in kept)]
    if rating:
        names.append(max((i for i, c in enumerate(CATEGORIES) if c == 9), key=lambda i: scores[i]))
        names[-1] = NAMES[names[-1]]
    out = []
    for name in names:
        if rules.get("spaces", True) and name != "^_^":
            name = name.replace("_", " ")
        if rules.get("escape", True):
            name = name.replace("(", "\\(").replace(")", "\\)")
        out.append(name)
    return out


def _photos(folder):
    folder.mkdir()
    rng = np.random.default_rng(5)
    for name, (top, bottom) in COLOURS.items():
        pixels = np.zeros((64, 96, 3))
        pixels[:32], pixels[32:] = top, bottom
        pixels += rng.integers(-12, 13, size=pixels.shape)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / name)
    return folder


@pytest.fixture
def photos(tmp_path):
    return _photos(tmp_path / "photos")


def _config(photos, **changes):
    values = {"project": "tags", "images_dir": str(photos), "trigger": "ohwx", "resolution": 64}
    return config_from_dict(PrepareConfig, {"captioner": "tags", **values, **changes})


def _crop(result, entry) -> Image.Image:
    with Image.open(result.project_dir / "images" / entry["image"]) as image:
        return image.convert("RGB")


def test_preprocessing_matches_the_published_recipe():
    pixels = np.random.default_rng(0).integers(0, 256, size=(40, 64, 4), dtype=np.uint8)
    pixels[:10, :, 3] = 0  # transparent: white
    pixels[10:20, :, 3] = 128  # half transparent
    pixels[20:, :, 3] = 255
    image = Image.fromarray(pixels, mode="RGBA")
    ours = preprocess(image, 64)
    assert ours.shape == (64, 64, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, hand_preprocess(image, 64), atol=1.0)  # PIL rounds the composite
    assert (ours[:12] == 255).all() and (ours[52:] == 255).all(), "padded with white above and below"
    assert ours[12 + 25, 7].tolist() == pixels[25, 7, 2::-1].astype(np.float32).tolist(), "BGR, 0..255"
    wide = Image.fromarray(pixels[..., :3]).resize((128, 80))
    np.testing.assert_array_equal(preprocess(wide, 64), hand_preprocess(wide, 64))


def test_the_tiny_tagger_scores_what_its_weights_say(demo_paths):
    tagger = WD14Tagger(demo_paths.tagger_folder, settings=TagSettings(), device="cpu", batch_size=3)
    assert tagger.size == 64 and list(tagger.table.names) == NAMES
    images = [Image.new("RGB", (80, 50), colour) for colour in ((220, 30, 30), (40, 90, 200), (250, 250, 250))]
    np.testing.assert_allclose(tagger.scores(images), np.stack([known_scores(i) for i in images]), atol=1e-5)
    captions = tagger.caption(images)
    assert captions == [", ".join(expected_tags(known_scores(i))) for i in images]
    assert "tiny character \\(demo\\)" in captions[0], "a character above 0.85, brackets escaped"
    on_cuda = WD14Tagger(demo_paths.tagger_folder, settings=TagSettings(), device="cuda")
    assert on_cuda.session.get_providers()[-1] == "CPUExecutionProvider", "the CPU provider when CUDA's is absent"
    np.testing.assert_allclose(on_cuda.scores(images), tagger.scores(images), atol=1e-4)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"tag_threshold": 0.6, "character_threshold": 0.95},
        {"max_tags": 2, "rating_tag": True},
        {"exclude_tags": "red theme, ^_^", "include_tags": "solo, ohwx, my_tag"},
        {"tag_spaces": False, "escape_brackets": False, "tag_threshold": 0.05},
    ],
)
def test_prepared_tag_captions_follow_the_settings(tmp_path, photos, models_dir, settings):
    result = prepare(_config(photos, **settings), projects_dir=tmp_path / "projects", models_dir=models_dir)
    rules = {
        "general": settings.get("tag_threshold", 0.35),
        "character": settings.get("character_threshold", 0.85),
        "cap": settings.get("max_tags", 0),
        "rating": settings.get("rating_tag", False),
        "exclude": ("red_theme", "^_^") if "exclude_tags" in settings else (),
        "include": ("solo", "ohwx", "my_tag") if "include_tags" in settings else (),
        "spaces": settings.get("tag_spaces", True),
        "escape": settings.get("escape_brackets", True),
    }
    assert len(result.used) == len(COLOURS)
    for entry in result.used:
        tags = expected_tags(known_scores(_crop(result, entry)), **rules)
        assert entry["caption"] == inject_trigger(", ".join(tags), "ohwx"), entry["source"]
        assert entry["caption"].split(", ")[0] == "ohwx" and entry["caption"].split(", ").count("ohwx") == 1
        assert entry["caption_origin"] == "tags"
        caption_file = result.project_dir / "images" / entry["caption_file"]
        assert caption_file.read_text().strip() == entry["caption"]
    captions = " | ".join(e["caption"] for e in result.used)
    assert ("tiny character \\(demo\\)" in captions) == (rules["character"] < 0.9 and rules["escape"])
    if rules["cap"]:
        assert all(len(e["caption"].split(", ")) <= 1 + 2 + 1 for e in result.used)


def test_florence2_and_tags_sentence_then_new_tags(tmp_path, photos, models_dir, demo_paths):
    from modules.lora_training.dataset.captioners import Florence2Captioner

    config = _config(photos, captioner="florence2+tags", caption_model=str(demo_paths.florence_folder))
    result = prepare(config, projects_dir=tmp_path / "projects", models_dir=models_dir)
    florence = Florence2Captioner(demo_paths.florence_folder, task=config.caption_task)
    for entry in result.used:
        crop = _crop(result, entry)
        sentence = florence.caption([crop])[0]
        tags = ", ".join(expected_tags(known_scores(crop)))
        assert entry["caption"] == inject_trigger(sentence_and_tags(sentence, tags), "ohwx")
        assert entry["caption_origin"] == "florence2+tags" and "caption_fallback" not in entry
    assert sentence_and_tags("A Red Theme photo under a blue  sky", "red theme, blue_sky, bright, Bright") == (
        "A Red Theme photo under a blue sky, bright"
    )
    assert sentence_and_tags("a tiny character (demo)", "tiny character \\(demo\\), skyline") == (
        "a tiny character (demo), skyline"
    )


def test_a_second_prepare_takes_the_tags_from_the_cache(tmp_path, photos, models_dir, monkeypatch):
    projects = tmp_path / "projects"
    first = prepare(_config(photos), projects_dir=projects, models_dir=models_dir)
    cache = json.loads((first.project_dir / "caption_cache.json").read_text())
    assert set(cache["entries"]) == {e["sha256"] for e in first.used}

    loads = []
    original = wd14_tagger.WD14Tagger.__init__

    def counted(self, *args, **kwargs):
        loads.append(kwargs["settings"])
        original(self, *args, **kwargs)

    monkeypatch.setattr(wd14_tagger.WD14Tagger, "__init__", counted)
    events = []
    again = prepare(
        _config(photos, recaption=True), projects_dir=projects, models_dir=models_dir, on_event=events.append
    )
    assert loads == [], "every output was cached: no model loaded"
    assert [e["caption"] for e in again.used] == [e["caption"] for e in first.used]
    assert again.captioned == len(COLOURS)
    assert any("(4 taken from the caption cache)" in getattr(e, "message", "") for e in events)
    other = prepare(_config(photos, tag_threshold=0.5), projects_dir=projects, models_dir=models_dir)
    assert len(loads) == 1 and loads[0].general_threshold == 0.5, "other settings: the tagger runs"
    assert all("caption_fallback" not in e for e in other.used)


def _failing_on_red(original):
    def caption(self, images, **kwargs):
        if any(np.asarray(image)[..., 0].mean() > 150 and np.asarray(image)[..., 2].mean() < 100 for image in images):
            raise RuntimeError("broken on red")
        return original(self, images, **kwargs)

    return caption


def test_a_failing_captioner_falls_back_with_the_reason(tmp_path, photos, models_dir, demo_paths, monkeypatch):
    from modules.lora_training.dataset.captioners import Florence2Captioner

    monkeypatch.setattr(WD14Tagger, "caption", _failing_on_red(WD14Tagger.caption))
    config = _config(photos, captioner="florence2+tags", caption_model=str(demo_paths.florence_folder))
    events = []
    result = prepare(config, projects_dir=tmp_path / "projects", models_dir=models_dir, on_event=events.append)
    by_source = {e["source"]: e for e in result.used}
    red = by_source["red.png"]
    assert (
        red["caption_origin"] == "florence2" and "tags failed (RuntimeError: broken on red)" in red["caption_fallback"]
    )
    assert red["caption"] == inject_trigger(
        Florence2Captioner(config.caption_model).caption([_crop(result, red)])[0], "ohwx"
    )
    assert any(
        "Caption of red.png: tags failed (RuntimeError: broken on red)" in getattr(e, "message", "") for e in events
    )
    assert all(by_source[s]["caption_origin"] == "florence2+tags" for s in by_source if s != "red.png")
    manifest = json.loads((result.project_dir / "manifest.json").read_text())
    assert any("broken on red" in image.get("caption_fallback", "") for image in manifest["images"])

    monkeypatch.setattr(Florence2Captioner, "caption", _failing_on_red(Florence2Captioner.caption))
    both = prepare(  # another project: its caption cache does not hold Florence-2's caption of red.png
        _config(photos, captioner="florence2+tags", caption_model=config.caption_model, project="both"),
        projects_dir=tmp_path / "projects",
        models_dir=models_dir,
    )
    red = next(e for e in both.used if e["source"] == "red.png")
    assert red["caption"] == "ohwx" and red["caption_origin"] == "trigger only"
    assert "florence2: RuntimeError: broken on red" in red["caption_fallback"]
    assert "caption of red.png: no captioner worked" in both.summary()


def test_bad_tagger_folders_are_named(tmp_path, photos, models_dir, demo_paths):
    folder = tmp_path / "tagger"
    folder.mkdir()
    with pytest.raises(UserError, match="WD14 tagger not found"):
        WD14Tagger(folder, settings=TagSettings())
    (folder / "model.onnx").write_bytes((demo_paths.tagger_folder / "model.onnx").read_bytes())
    (folder / "selected_tags.csv").write_text("tag_id,label\n0,a\n")
    with pytest.raises(UserError, match="does not parse.*name and category"):
        WD14Tagger(folder, settings=TagSettings())
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n0,a,zero,1\n")
    with pytest.raises(UserError, match="does not parse.*line 2"):
        WD14Tagger(folder, settings=TagSettings())
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n0,a,0,1\n")
    with pytest.raises(UserError, match="scores 12 tags but selected_tags.csv lists 1"):
        WD14Tagger(folder, settings=TagSettings())
    (folder / "model.onnx").unlink()
    os.mkfifo(folder / "model.onnx")
    with pytest.raises(UserError, match="not a regular file"):
        WD14Tagger(folder, settings=TagSettings())
    with pytest.raises(UserError, match="WD14 tagger 'nowhere' not found"):
        prepare(_config(photos, tagger_model="nowhere"), projects_dir=tmp_path / "projects", models_dir=models_dir)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tag_threshold": float("nan")}, "tag_threshold must be a finite number"),
        ({"character_threshold": 1.5}, "character_threshold must be between 0 and 1"),
        ({"max_tags": -1}, "max_tags must be between 0 and 1000"),
        ({"exclude_tags": "x, " * 2000}, "exclude_tags is longer than 4000"),
        ({"captioner": "tags+florence2"}, "captioner must be one of florence2, none, tags, florence2\\+tags"),
    ],
)
def test_tag_settings_are_validated(photos, changes, message):
    with pytest.raises(UserError, match=message):
        _config(photos, **changes)


def test_cli_prepare_with_tags(tmp_path, photos, models_dir):
    import subprocess
    import sys

    from tests.conftest import ROOT, write_config

    command = [sys.executable, "-m", "modules.lora_training", "--app-config", str(write_config(tmp_path, models_dir))]
    command += ["prepare", "--project", "cli", "--images", str(photos), "--trigger", "ohwx", "--resolution", "64"]
    command += ["--captioner", "tags", "--max-tags", "1", "--rating-tag", "--include-tags", "solo"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "projects" / "cli" / "manifest.json").read_text())
    for entry in (e for e in manifest["images"] if e["status"] == "used"):
        parts = entry["caption"].split(", ")
        assert parts[:2] == ["ohwx", "solo"] and len(parts) == 4 and parts[3] in NAMES[:4], entry["caption"]


def test_the_tab_picks_the_tagger_folder(tmp_path, photos, demo_paths):
    import shutil
    from types import SimpleNamespace

    from modules.lora_training.ui import LoraTrainingTab

    models = tmp_path / "models"
    for folder in (demo_paths.florence_folder, demo_paths.tagger_folder):
        shutil.copytree(folder, models / "captioners" / folder.name)
    config = SimpleNamespace(MODELS_DIR=models, LORA_PROJECTS_DIR=tmp_path, IMAGE_ROOTS=[tmp_path])
    tab = LoraTrainingTab(jobs=None, model_manager=SimpleNamespace(list_models=list), gestionnaire=None, config=config)
    values = {"images_dir": str(photos), "project": "p", "trigger": "ohwx", "captioner": "florence2+tags"}
    values |= {"max_tags": 3, "exclude_tags": "bright"}
    prepared = tab.prepare_config(values)
    assert prepared.tagger_model == str(models / "captioners" / demo_paths.tagger_folder.name)
    assert prepared.caption_model == str(models / "captioners" / demo_paths.florence_folder.name)
    assert (prepared.max_tags, prepared.exclude_tags) == (3, "bright")
    assert tab.default_captioner() == "none", "the demo tagger is not a default"
    shutil.copytree(demo_paths.tagger_folder, models / "captioners" / "wd-swinv2-tagger-v3")
    assert tab.prepare_config({**values, "captioner": "tags"}).tagger_model.endswith("wd-swinv2-tagger-v3")
    assert tab.default_captioner() == "tags", "a real tagger (and no real Florence-2) captions by default"
