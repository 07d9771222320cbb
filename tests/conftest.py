"""Shared fixtures: tiny demo models built once per session, offline."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A models/ folder holding every family's demo model (folder + single file)."""
    from model_formats.demo_models import ensure_demo_models

    folder = tmp_path_factory.mktemp("models")
    ensure_demo_models(folder)
    return folder


@pytest.fixture(scope="session")
def demo_paths(models_dir):
    """The demo models' paths by family: ``sdxl_folder``, ``sdxl_single_file``, ``flux_folder``, ..."""
    from types import SimpleNamespace

    from model_formats.demo_models import demo_model_paths

    paths = demo_model_paths(models_dir)
    by_family = {f"{name}_folder": folder for name, folder in paths.folders.items()}
    by_family |= {f"{name}_single_file": file for name, file in paths.single_files.items()}
    return SimpleNamespace(
        **by_family,
        florence_folder=paths.florence_folder,
        clip_folder=paths.clip_folder,
        tagger_folder=paths.tagger_folder,
    )


def default_model_keys() -> dict[str, str]:
    """``DEFAULT_<FAMILY>_MODEL_FOR_LORA`` → the family's demo model, for every registered family."""
    from families import all_families

    return {f"DEFAULT_{f.name.upper()}_MODEL_FOR_LORA": f.demo_name for f in all_families()}


def write_config(folder: Path, models_dir: Path, **overrides) -> Path:
    data = {
        "MODELS_DIR": str(models_dir),
        "LORAS_DIR": str(folder / "loras"),
        "LORA_PROJECTS_DIR": str(folder / "projects"),
        "OUTPUTS_DIR": str(folder / "outputs"),
        **default_model_keys(),
        "LANGUAGE": "en",
        "DEVICE": "cpu",
        "BUILD_DEMO_MODELS": True,
        "IMAGE_ROOTS": [str(folder)],  # the tests' photos live in their tmp folder, not under home
    }
    data.update(overrides)
    path = folder / "config.json"
    path.write_text(json.dumps(data, indent=2))
    return path


@pytest.fixture
def app_config(tmp_path, models_dir):
    from core.config import ensure_folders, load_config

    config = load_config(write_config(tmp_path, models_dir))
    ensure_folders(config)
    return config


@pytest.fixture(scope="session")
def sdxl_project(tmp_path_factory, models_dir):
    """A prepared project of four 64-px images for the demo SDXL: (projects_dir, project name)."""
    from modules.lora_training.config import PrepareConfig, config_from_dict
    from modules.lora_training.dataset.prepare import prepare
    from tests.image_folders import noise_image

    root = tmp_path_factory.mktemp("sdxl_project")
    photos = root / "photos"
    photos.mkdir()
    for index in range(4):
        noise_image(96 + 16 * index, 96, seed=100 + index).save(photos / f"photo{index}.png")
    config = config_from_dict(
        PrepareConfig,
        {"project": "tiny", "images_dir": str(photos), "trigger": "ohwx", "resolution": 64, "captioner": "none"},
    )
    prepare(config, projects_dir=root / "projects", models_dir=models_dir)
    return root / "projects", "tiny"


def seven_image_copy(sdxl_project, projects_dir: Path):
    """A copy of the shared 4-image project in ``projects_dir``, its crops duplicated under new hashes to 7
    images (enough to hold one out for validation): (projects_dir, project name)."""
    import json
    import shutil

    projects, name = sdxl_project
    shutil.copytree(projects, projects_dir)
    root = projects_dir / name
    manifest = json.loads((root / "manifest.json").read_text())
    used = [e for e in manifest["images"] if e["status"] == "used"]
    for number, entry in enumerate(used[:3]):
        twin = {**entry, "sha256": f"{number:02d}" + entry["sha256"][2:], "image": f"twin{number}.png"}
        twin["caption_file"] = f"twin{number}.txt"
        shutil.copy(root / "images" / entry["image"], root / "images" / twin["image"])
        shutil.copy(root / "images" / entry["caption_file"], root / "images" / twin["caption_file"])
        manifest["images"].append(twin)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return projects_dir, name


@pytest.fixture
def project(sdxl_project, tmp_path):
    """A private copy of the prepared project, without runs (training writes runs and caches into it)."""
    import shutil

    projects, name = sdxl_project
    copy = tmp_path / "projects"
    shutil.copytree(projects, copy)
    shutil.rmtree(copy / name / "runs", ignore_errors=True)
    return copy, name
