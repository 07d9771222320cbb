"""Review 9 #11: a user preset is checked like a saved one before it reaches the form (raw JSONDecodeError,
AttributeError, TypeError before; NaN, inf, -5 and "big" were pushed into the widgets)."""

import json
import os
import threading

import pytest

from core.errors import UserError
from modules.lora_training.preset_files import preset_names, read_preset

BAD = [
    "{oops",
    "[1]",
    '{"options": [1]}',
    '{"options": {"rank": NaN}}',
    '{"options": {"learning_rate": 1e999}}',
    '{"options": {"epochs": -5}}',
    '{"options": {"optimizer": ["x"]}}',
    '{"options": {}, "resolution": "big"}',
    '{"options": {}, "note": 5}',
]


@pytest.mark.parametrize("content", BAD)
def test_a_bad_user_preset_is_a_user_error_naming_it(tmp_path, content):
    (tmp_path / "mine.json").write_text(content)
    with pytest.raises(UserError, match="Preset 'mine' cannot be used"):
        read_preset("mine", user_dir=tmp_path)


def test_a_good_user_preset_and_every_shipped_one_still_read(tmp_path):
    (tmp_path / "mine.json").write_text(json.dumps({"resolution": 768, "options": {"rank": 8, "optimizer": "adamw"}}))
    preset = read_preset("mine", user_dir=tmp_path)
    assert preset["options"]["rank"] == 8 and preset["options"]["learning_rate"] > 0
    for name in preset_names():
        assert isinstance(read_preset(name)["options"], dict)


def test_a_fifo_preset_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "mine.json")
    outcome = []

    def read():
        try:
            read_preset("mine", user_dir=tmp_path)
        except UserError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(5)
    if worker.is_alive():
        os.close(os.open(tmp_path / "mine.json", os.O_WRONLY | os.O_NONBLOCK))
    assert outcome, "a FIFO preset blocked (or was not refused)"
