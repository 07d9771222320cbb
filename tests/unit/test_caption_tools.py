"""Caption tools as pure functions: one caption after each action, and the tag frequency table."""

import pytest

from core.errors import UserError
from modules.lora_training.caption_tools import apply_action, tag_frequencies


def act(caption, action, tag="", replacement=""):
    return apply_action(caption, action=action, tag=tag, replacement=replacement, trigger="ohwx")


def test_each_action_on_one_caption():
    caption = "ohwx, red shirt, smiling, outdoors"
    assert act(caption, "add", "sunny") == "ohwx, red shirt, smiling, outdoors, sunny"
    assert act(caption, "add", "smiling") == caption, "a tag already there is not added twice"
    assert act(caption, "remove", "smiling") == "ohwx, red shirt, outdoors"
    assert act(caption, "remove", "smil") == caption, "whole tags only"
    assert act(caption, "replace", "red shirt", "blue shirt") == "ohwx, blue shirt, smiling, outdoors"
    assert act(caption, "replace", "red shirt", "smiling") == "ohwx, smiling, outdoors", "no duplicate after it"
    assert act(caption, "prefix", replacement="photo") == "ohwx, photo, red shirt, smiling, outdoors"
    assert act("red shirt", "prefix", replacement="photo") == "photo, red shirt", "no trigger: at the very start"
    assert act(caption, "suffix", replacement="film grain") == caption + ", film grain"
    with pytest.raises(UserError, match="action must be one of"):
        act(caption, "shout")


def test_frequencies_count_captions_not_repeats():
    captions = {"a.png": "ohwx, red, red, blue", "b.png": "ohwx, blue", "c.png": "ohwx"}
    assert tag_frequencies(captions) == [("ohwx", 3), ("blue", 2), ("red", 1)]
