"""Review 9 #23: a FIFO in a model folder's component (``unet/config.json``) leaves that folder out of the
model list at once; reading it by name blocked the list (page loads, /list_models) for ever."""

import contextlib
import json
import os

import pytest

from core.errors import UserError
from core.model_files import list_models
from core.regular_files import read_config
from families import detect
from tests.blocking_calls import outcome_within


@pytest.fixture
def fifo_model(tmp_path):
    folder = tmp_path / "models" / "odd"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    fifo = folder / "unet" / "config.json"
    os.mkfifo(fifo)
    yield folder
    with contextlib.suppress(OSError):  # unblock any reader the code under test left waiting
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_a_fifo_component_file_leaves_the_folder_out_of_the_list(fifo_model):
    assert outcome_within(lambda: list_models(fifo_model.parent)) == []
    outcome = outcome_within(lambda: detect(fifo_model))
    assert isinstance(outcome, UserError) and "unet/config.json is not a regular file" in str(outcome)


def test_a_fifo_config_reads_as_no_config(fifo_model):
    assert outcome_within(lambda: read_config(fifo_model / "unet" / "config.json")) is None
    assert read_config(fifo_model / "model_index.json") == {"_class_name": "StableDiffusionPipeline"}


@pytest.mark.parametrize("index", ["[1]", '{"_class_name": 5}', '{"_class_name": ["a"]}', '"x"', "{NaN"])
def test_an_odd_model_index_leaves_only_that_folder_out(tmp_path, index):
    """Review 9 #22: one odd model_index.json raised AttributeError/TypeError out of list_models."""
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "model_index.json").write_text(index)
    assert list_models(tmp_path) == []
    with pytest.raises(UserError, match="odd"):
        detect(odd)


def test_one_folder_failing_in_any_way_does_not_break_the_list(tmp_path, monkeypatch):
    import core.model_files as model_files

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text("{}")

    def detect_or_fail(path):
        if path.name == "a":
            raise RuntimeError("a family's own check failed")
        return "some-family"

    monkeypatch.setattr(model_files, "detect_family", detect_or_fail)
    assert [entry.name for entry in list_models(tmp_path)] == ["b"]
