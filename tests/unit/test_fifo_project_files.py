"""Review 9 #2: a FIFO in place of a project's JSON file (manifest, evaluation, training config, caption
cache) is refused at once; reading it by name blocked Prepare and the tab's handlers for ever."""

import contextlib
import os

import pytest

from core.errors import UserError
from modules.lora_training.dataset.caption_run import CaptionCache
from modules.lora_training.manifest import ProjectManifest
from modules.lora_training.project import ProjectPaths, read_json
from modules.lora_training.validation import Evaluation
from tests.blocking_calls import outcome_within


@pytest.fixture
def fifo_project(tmp_path):
    paths = ProjectPaths.for_project(tmp_path, "evil")
    paths.root.mkdir()
    yield paths
    for name in os.listdir(paths.root):  # unblock any reader the code under test left waiting
        with contextlib.suppress(OSError):
            os.close(os.open(paths.root / name, os.O_WRONLY | os.O_NONBLOCK))


def test_a_fifo_manifest_is_a_user_error_at_once(fifo_project):
    os.mkfifo(fifo_project.manifest)
    outcome = outcome_within(lambda: ProjectManifest.read(fifo_project))
    assert isinstance(outcome, UserError) and "not a regular file" in str(outcome)
    assert outcome_within(lambda: ProjectManifest.read_or_none(fifo_project)) is None


def test_a_missing_manifest_is_still_none(fifo_project):
    assert ProjectManifest.read(fifo_project) is None


def test_a_fifo_project_json_is_a_user_error(fifo_project):
    path = fifo_project.root / "training_config.json"
    os.mkfifo(path)
    outcome = outcome_within(lambda: read_json(path))
    assert isinstance(outcome, UserError) and "not a regular file" in str(outcome)
    assert read_json(fifo_project.root / "absent.json", {}) == {}


def test_a_fifo_evaluation_reads_as_no_figures(fifo_project):
    path = fifo_project.root / "evaluation.json"
    os.mkfifo(path)
    outcome = outcome_within(lambda: Evaluation.read(path, up_to_step=100))
    assert isinstance(outcome, Evaluation) and outcome.best() is None


def test_a_fifo_caption_cache_reads_as_empty(fifo_project):
    os.mkfifo(fifo_project.caption_cache)
    outcome = outcome_within(lambda: CaptionCache(fifo_project.caption_cache))
    assert isinstance(outcome, CaptionCache) and outcome.entries == {}
