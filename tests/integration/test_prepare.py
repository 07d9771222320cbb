"""prepare() on a messy folder: keeps exactly the good images, explains every skip."""

import json

import pytest
from PIL import Image

from core.errors import UserError
from modules.lora_training.config import PrepareConfig, config_from_dict
from modules.lora_training.dataset.captions import inject_trigger
from modules.lora_training.dataset.prepare import prepare
from tests.image_folders import GOOD_SOURCES, folder_hashes, make_messy_folder, noise_image

RESOLUTION = 256


def _config(images, **changes):
    values = dict(project="messy", images_dir=str(images), trigger="ohwx", resolution=RESOLUTION, captioner="none")
    values["include_subfolders"] = True  # the messy folder keeps one photo in a subfolder
    values.update(changes)
    return config_from_dict(PrepareConfig, values)


@pytest.fixture
def messy(tmp_path):
    images = tmp_path / "photos"
    expected_skips = make_messy_folder(images)
    return images, expected_skips


def test_prepare_keeps_the_good_images_and_explains_skips(tmp_path, messy, models_dir):
    images, expected_skips = messy
    before = folder_hashes(images)
    events = []
    result = prepare(_config(images), projects_dir=tmp_path / "projects", models_dir=models_dir, on_event=events.append)

    assert {e["source"] for e in result.used} == GOOD_SOURCES
    skipped = {e["source"]: e["reason"] for e in result.skipped}
    assert set(skipped) == set(expected_skips)
    for source, reason in expected_skips.items():
        assert skipped[source].startswith(reason), (source, skipped[source])

    for entry in result.used:
        with Image.open(result.project_dir / "images" / entry["image"]) as image:
            width, height = image.size
            assert image.mode == "RGB"
        assert [width, height] == entry["bucket"]
        assert width % 64 == 0 and height % 64 == 0
        assert abs(width * height - RESOLUTION**2) <= 0.1 * RESOLUTION**2
        caption = (result.project_dir / "images" / entry["caption_file"]).read_text().strip()
        assert caption == entry["caption"] and caption.startswith("ohwx")

    by_source = {e["source"]: e for e in result.used}
    assert by_source["rotated.jpg"]["original_size"] == [240, 360], "EXIF orientation applied"
    assert by_source["more/panorama.png"]["caption"] == "ohwx, a wide view of a valley"
    assert by_source["landscape.jpg"]["bucket"][0] > by_source["landscape.jpg"]["bucket"][1]
    assert [e["source"] for e in result.truncated()] == ["portrait.webp"]
    assert "CLIP reads the first 75" in result.summary()

    manifest = json.loads((result.project_dir / "manifest.json").read_text())
    assert len(manifest["images"]) == len(GOOD_SOURCES) + len(expected_skips)
    assert "Buckets:" in result.summary() and "skipped truncated.jpg" in result.summary()
    assert folder_hashes(images) == before, "source folder untouched"
    assert any(type(e).__name__ == "PrepFinished" for e in events)


def test_florence2_captions_with_trigger_and_incremental_rerun(tmp_path, messy, demo_paths, models_dir):
    from modules.lora_training.dataset.captioners import Florence2Captioner

    images, _ = messy
    config = _config(images, captioner="florence2", caption_model=str(demo_paths.florence_folder))
    projects = tmp_path / "projects"
    first = prepare(config, projects_dir=projects, models_dir=models_dir)
    assert first.captioned == len(GOOD_SOURCES) - 2, "the two images with a .txt keep it (mode keep)"
    captioner = Florence2Captioner(demo_paths.florence_folder, task=config.caption_task)
    for entry in first.used:
        assert entry["caption"].split(", ")[0] == "ohwx"
        assert entry["caption"].lower().count("ohwx") == 1
        if entry["caption_origin"] == "florence2":
            with Image.open(first.project_dir / "images" / entry["image"]) as image:
                expected = captioner.caption([image.convert("RGB")])[0]
            assert expected.strip(), "the tiny captioner writes text"
            assert entry["caption"] == inject_trigger(expected, "ohwx")

    kept = next(e for e in first.used if e["source"] == "square.png")
    edited = first.project_dir / "images" / kept["caption_file"]
    edited.write_text("ohwx, my own careful caption\n")
    (images / "landscape.jpg").unlink()  # removed from the folder

    second = prepare(config, projects_dir=projects, models_dir=models_dir)
    assert second.captioned == 0, "nothing re-captioned"
    assert edited.read_text().strip() == "ohwx, my own careful caption"
    assert "landscape.jpg" not in {e["source"] for e in second.used}
    names = {p.name for p in (first.project_dir / "images").iterdir()}
    masks = {e["mask"] for e in second.used if e.get("mask")}  # transparent.png's alpha channel
    assert names == {e["image"] for e in second.used} | {e["caption_file"] for e in second.used} | masks
    assert len(masks) == 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"project": ""}, "Project name is empty"),
        ({"project": "../escape"}, "must not contain"),
        ({"project": "a/b"}, "must not contain"),
        ({"project": "nul"}, "reserved"),
        ({"images_dir": "/definitely/not/here"}, "does not exist"),
        ({"trigger": " "}, "trigger word is empty"),
    ],
)
def test_bad_input_is_named_and_creates_nothing(tmp_path, messy, models_dir, changes, message):
    images, _ = messy
    projects = tmp_path / "projects"
    with pytest.raises(UserError, match=message):
        prepare(_config(images, **changes), projects_dir=projects, models_dir=models_dir)
    assert not projects.exists() or not any(projects.iterdir())


def test_empty_and_unusable_folders(tmp_path, models_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    projects = tmp_path / "projects"
    with pytest.raises(UserError, match="is empty"):
        prepare(_config(empty), projects_dir=projects, models_dir=models_dir)
    (empty / "a.jpg").write_text("nope")
    with pytest.raises(UserError, match="No usable image.*not an image: 1"):
        prepare(_config(empty), projects_dir=projects, models_dir=models_dir)
    assert not (projects / "messy").exists()


def test_unknown_options_and_bad_values_are_named():
    with pytest.raises(UserError, match="unknown option.*resoluton"):
        config_from_dict(PrepareConfig, {"project": "a", "images_dir": "x", "trigger": "t", "resoluton": 512})
    with pytest.raises(UserError, match="captioner must be one of florence2, none"):
        config_from_dict(PrepareConfig, {"project": "a", "images_dir": "x", "trigger": "t", "captioner": "blip"})
    with pytest.raises(UserError, match="multiple of 64"):
        config_from_dict(PrepareConfig, {"project": "a", "images_dir": "x", "trigger": "t", "resolution": 500})


def test_cli_prepare(tmp_path, messy, models_dir):
    import subprocess
    import sys

    from tests.conftest import ROOT, write_config

    images, _ = messy
    config = write_config(tmp_path, models_dir)
    command = [sys.executable, "-m", "modules.lora_training", "--app-config", str(config), "prepare"]
    args = ["--project", "cli", "--images", str(images), "--trigger", "ohwx", "--resolution", "256"]
    args.append("--include-subfolders")
    done = subprocess.run(command + args + ["--captioner", "none"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Prepared 8 image(s)" in done.stdout
    bad = subprocess.run(command + args + ["--captioner", "blip"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "captioner must be one of" in bad.stderr


def test_bad_input_corpus_each_file_gets_a_reason(tmp_path, models_dir):
    """Flat images, mixed-case extensions, odd names and a `..` path: reasons, no crash."""
    from PIL import Image

    from tests.image_folders import noise_image

    photos = tmp_path / "corpus"
    photos.mkdir()
    Image.new("RGB", (200, 200), (0, 0, 0)).save(photos / "black.png")
    Image.new("RGB", (200, 200), (255, 255, 255)).save(photos / "white.png")
    noise_image(200, 160, seed=1).save(photos / "UPPER CASE.JPG")
    noise_image(160, 200, seed=2).save(photos / "emoji 🐈 ünïcode.JpEg")
    weird = tmp_path / "corpus" / ".." / "corpus"
    result = prepare(_config(weird, resolution=128), projects_dir=tmp_path / "projects", models_dir=models_dir)
    assert {e["source"] for e in result.used} == {"UPPER CASE.JPG", "emoji 🐈 ünïcode.JpEg"}
    reasons = {e["source"]: e["reason"] for e in result.skipped}
    assert reasons == {"black.png": reasons["black.png"], "white.png": reasons["white.png"]}
    assert all(r.startswith("blank image") for r in reasons.values()), "not mistaken for duplicates of each other"


def test_of_two_duplicates_the_original_name_is_kept(tmp_path, models_dir):
    photos = tmp_path / "photos"
    photos.mkdir()
    image = noise_image(300, 300, seed=77)
    for name in ("IMG_0001 (1).jpg", "IMG_0001.jpg", "IMG_0001 - Copy.jpg"):
        image.save(photos / name, quality=95)
    result = prepare(_config(photos), projects_dir=tmp_path / "projects", models_dir=models_dir)
    assert [entry["source"] for entry in result.used] == ["IMG_0001.jpg"]
    assert {e["source"]: e["reason"] for e in result.skipped} == {
        "IMG_0001 (1).jpg": "duplicate of IMG_0001.jpg",
        "IMG_0001 - Copy.jpg": "duplicate of IMG_0001.jpg",
    }
