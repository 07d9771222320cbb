"""The project manifest: one typed reader for what Prepare wrote."""

import json

import pytest

from core.errors import UserError
from modules.lora_training.manifest import DEFAULT_RESOLUTION, ProjectManifest, resolution_of
from modules.lora_training.project import ProjectPaths

USED = {
    "source": "cat.jpg",
    "sha256": "ab" * 32,
    "status": "used",
    "image": "cat-abababab.png",
    "caption_file": "cat-abababab.txt",
    "caption": "ohwx, a cat",
    "original_size": [300, 200],
    "bucket": [64, 48],
    "crop": {"resized": [72, 48], "left": 4, "top": 0},
}
SKIPPED = {"source": "x.png", "status": "skipped", "reason": "corrupt or truncated image", "sha256": None}


@pytest.fixture
def paths(tmp_path):
    paths = ProjectPaths.for_project(tmp_path, "cats")
    paths.root.mkdir()
    return paths


def test_a_written_manifest_reads_back_typed(paths):
    ProjectManifest(settings={"trigger": "ohwx", "resolution": 64}, entries=(USED, SKIPPED), source_dir="/p").write(
        paths
    )
    raw = json.loads(paths.manifest.read_text())
    assert raw["buckets"] == {"64x48": 1} and raw["config"]["trigger"] == "ohwx" and len(raw["images"]) == 2
    manifest = ProjectManifest.read(paths)
    assert (manifest.trigger, manifest.resolution, manifest.bucket_sizes()) == ("ohwx", 64, [1])
    [image] = manifest.prepared_images(paths)
    assert image.bucket == (64, 48) and image.crop_top_left == (0, 4) and image.resized_size == (72, 48)
    assert resolution_of(paths) == 64


def test_missing_is_none_and_unreadable_says_prepare_again(paths):
    assert ProjectManifest.read(paths) is None and resolution_of(paths) == DEFAULT_RESOLUTION
    for text in ("{not json", "[1, 2]", '{"images": 5}', "\udcff"):
        paths.manifest.write_text(text, errors="surrogateescape")
        with pytest.raises(UserError, match=r"Project 'cats': manifest.json is unreadable .*run Prepare again"):
            ProjectManifest.read(paths)
        assert ProjectManifest.read_or_none(paths) is None
        assert resolution_of(paths) == DEFAULT_RESOLUTION


@pytest.mark.parametrize(
    "change",
    [
        {"image": "../../outside.png"},
        {"caption_file": "/etc/passwd"},
        {"bucket": [64]},
        {"crop": {"left": "x", "top": 0}},
        {"sha256": None, "original_size": None},
    ],
)
def test_an_edited_entry_is_refused_not_followed(paths, change):
    paths.manifest.write_text(json.dumps({"config": {"resolution": 64}, "images": [{**USED, **change}]}))
    with pytest.raises(UserError, match="unreadable.*run Prepare again"):
        ProjectManifest.read(paths).prepared_images(paths)


def test_odd_settings_fall_back_to_the_defaults(paths):
    for resolution in (None, "64", True, -5):
        ProjectManifest(settings={"resolution": resolution, "trigger": 7}, entries=()).write(paths)
        manifest = ProjectManifest.read(paths)
        assert manifest.resolution == DEFAULT_RESOLUTION and manifest.trigger == "7"
