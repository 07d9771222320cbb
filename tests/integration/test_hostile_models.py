"""Base models named by a careless or hostile caller: nothing blocks, nothing outside models/ is read."""

from __future__ import annotations

import os
import threading

import pytest

from core.errors import UserError
from core.model_files import model_entry


def _within(seconds: float, call):
    """``call()``'s result or exception, failing the test (not freezing the suite) if it blocks."""
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except Exception as exc:  # noqa: BLE001 - handed back to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    return outcome


def test_a_named_pipe_as_base_model_is_refused_without_blocking(models_dir, tmp_path):
    fifo = tmp_path / "models" / "pipe.safetensors"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    outcome = _within(5, lambda: model_entry(fifo.parent, "pipe.safetensors"))
    assert isinstance(outcome.get("error"), UserError) and "not a regular file" in str(outcome["error"])
    folder = tmp_path / "models" / "folder"
    folder.mkdir()
    os.mkfifo(folder / "model_index.json")
    outcome = _within(5, lambda: model_entry(fifo.parent, "folder"))
    assert isinstance(outcome.get("error"), UserError) and "model_index.json" in str(outcome["error"])


def test_absolute_paths_outside_models_are_refused(models_dir, tmp_path):
    from tests.demo_names import DEMO_SDXL_NAME

    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"\0" * 16)
    with pytest.raises(UserError, match="outside the models folder"):
        model_entry(models_dir, str(outside))
    with pytest.raises(UserError, match="outside the models folder"):
        model_entry(models_dir, "/dev/zero")
    with pytest.raises(UserError, match="outside"):
        model_entry(models_dir, "../" + outside.name)
    inside = model_entry(models_dir, str(models_dir.resolve() / f"{DEMO_SDXL_NAME}.safetensors"))
    assert inside.family == "sdxl" and inside.single_file
