"""Review 9 #1: a FIFO (or other non-regular file) in a checkpoint folder is refused at once, never opened
blocking (safetensors' load_file blocked in open() holding the GIL: the whole server stopped)."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from core.errors import UserError
from modules.lora_training import checkpoints as ckpt
from tests.blocking_calls import BLOCKED, outcome_within


def _checkpoint(folder):
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"step": 10}))
    (folder / "config.json").write_text("{}")
    torch.save({"optimizer": {}, "scheduler": {}, "scaler": None}, folder / "training_state.pt")
    save_file({"a": torch.zeros(2)}, str(folder / "lora.safetensors"))
    return folder


def _load_in_thread(folder):
    outcome = outcome_within(lambda: ckpt.load_checkpoint(folder))
    if outcome == BLOCKED:  # unblock the thread so the suite does not keep a stuck reader
        for name in os.listdir(folder):
            path = folder / name
            if not path.is_file() and not path.is_dir():
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("load_checkpoint blocked on a FIFO")
    return outcome


def test_a_regular_checkpoint_loads(tmp_path):
    state = _load_in_thread(_checkpoint(tmp_path / "step-000010"))
    assert state.step == 10 and torch.equal(state.lora["a"], torch.zeros(2)) and state.ema is None


@pytest.mark.parametrize("name", ["lora.safetensors", "ema.safetensors", "training_state.pt", "state.json"])
def test_a_fifo_in_a_checkpoint_is_a_user_error_at_once(tmp_path, name):
    folder = _checkpoint(tmp_path / "step-000010")
    if (folder / name).exists():
        (folder / name).unlink()
    os.mkfifo(folder / name)
    outcome = _load_in_thread(folder)
    assert isinstance(outcome, UserError) and "not a regular file" in str(outcome) and name in str(outcome)


def test_a_damaged_lora_file_is_a_user_error(tmp_path):
    folder = _checkpoint(tmp_path / "step-000010")
    (folder / "lora.safetensors").write_bytes(b"\x00" * 20)
    assert isinstance(_load_in_thread(folder), UserError)


def test_checkpoint_names_that_are_not_ascii_steps_are_left_out(tmp_path):
    """Review 9 #10: a folder "step-²" with a state.json raised a raw ValueError for Resume, Evaluate, pruning."""
    _checkpoint(tmp_path / "step-000010")
    for odd in ("step-\u00b2", "step-" + "9" * 200, "step-12\n", "step--1"):
        (tmp_path / odd).mkdir()
        (tmp_path / odd / "state.json").write_text("{}")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000010"]
