"""Caption variants: pinned tags never move, the others are shuffled or dropped, deterministically."""

from __future__ import annotations

import pytest

from modules.lora_training.caption_variants import (
    all_variants,
    caption_variant,
    variant_count,
    variants_to_cache,
)
from modules.lora_training.dataset.captions import split_tags

CAPTION = "ohwx, red hair, smiling, outdoors, blue sky, tree, portrait, looking at viewer"


def _variant(caption=CAPTION, *, step=0, index=0, **options):
    settings = {"trigger": "ohwx", "keep_tokens": 1, "shuffle": True, "dropout": 0.0, "seed": 42}
    return caption_variant(caption, **{**settings, **options}, step=step, index=index)


def test_off_returns_the_caption_as_it_is():
    messy = "ohwx,red hair ,  smiling"
    assert _variant(messy, shuffle=False, dropout=0.0) == messy


@pytest.mark.parametrize("keep", [0, 1, 2, 3])
def test_the_first_tokens_and_the_trigger_never_move_and_the_rest_is_a_permutation(keep):
    tags = split_tags(CAPTION)
    orders = set()
    for step in range(40):
        shown = split_tags(_variant(keep_tokens=keep, step=step))
        assert shown[: max(keep, 1)] == tags[: max(keep, 1)], "kept tokens (and the trigger) stay first"
        assert sorted(shown) == sorted(tags)
        orders.add(tuple(shown))
    assert len(orders) > 20, "the other tags are shuffled"


def test_a_trigger_that_is_not_first_stays_where_it_is():
    caption = "red hair, smiling, ohwx woman, outdoors, blue sky, tree"
    for step in range(30):
        shown = split_tags(_variant(caption, keep_tokens=0, step=step))
        assert shown[2] == "ohwx woman"
        assert sorted(shown) == sorted(split_tags(caption))
    # with dropout the trigger keeps its place among the tags that remain: present once, never dropped
    for step in range(30):
        shown = split_tags(_variant(caption, keep_tokens=0, dropout=0.5, step=step))
        assert shown.count("ohwx woman") == 1


def test_dropout_keeps_a_subset_in_the_original_order_without_shuffle():
    tags = split_tags(CAPTION)
    sizes = set()
    for step in range(40):
        shown = split_tags(_variant(shuffle=False, dropout=0.5, step=step))
        assert shown[0] == "ohwx"
        assert shown == [tag for tag in tags if tag in shown], "a subset, in order"
        sizes.add(len(shown))
    assert len(sizes) > 2 and max(sizes) <= len(tags)


def test_dropout_one_leaves_only_the_kept_tokens():
    for step in range(10):
        assert _variant(keep_tokens=2, dropout=1.0, step=step) == "ohwx, red hair"
        assert _variant(keep_tokens=0, dropout=1.0, shuffle=False, step=step) == "ohwx"


def test_the_same_seed_step_and_item_give_the_same_variant():
    first = [_variant(dropout=0.3, step=step, index=f"0/{i}/abc") for step in range(5) for i in range(3)]
    again = [_variant(dropout=0.3, step=step, index=f"0/{i}/abc") for step in range(5) for i in range(3)]
    assert first == again
    assert len(set(first)) > 1, "steps and items differ"
    assert _variant(seed=1, step=3) != _variant(seed=2, step=3) or _variant(seed=1, step=4) != _variant(seed=2, step=4)


def test_a_caption_without_commas_or_empty_is_kept():
    assert _variant("ohwx") == "ohwx"
    assert _variant("") == ""
    assert _variant("a photo of ohwx on a beach", dropout=0.0) == "a photo of ohwx on a beach"


@pytest.mark.parametrize(("shuffle", "dropout"), [(True, 0.0), (True, 0.4), (False, 0.4)])
def test_all_variants_lists_every_variant_the_steps_draw(shuffle, dropout):
    caption = "ohwx, a, b, c"
    listed = all_variants(caption, trigger="ohwx", keep_tokens=1, shuffle=shuffle, dropout=dropout)
    drawn = {_variant(caption, shuffle=shuffle, dropout=dropout, step=step) for step in range(300)}
    assert drawn == listed
    count = variant_count(caption, trigger="ohwx", keep_tokens=1, shuffle=shuffle, dropout=dropout)
    assert count == len(listed)


def test_variants_are_cached_only_when_that_is_cheaper():
    few = ["ohwx, a, b, c", "ohwx, d, e"]  # 6 + 2 variants: at most 6 per caption
    options = {"trigger": "ohwx", "keep_tokens": 1, "shuffle": True, "dropout": 0.0}
    cached = variants_to_cache(few, **options, encodings=100)
    assert cached is not None and len(cached) == 8
    assert variants_to_cache(few, **options, encodings=5) is None, "a short run encodes fewer than 8 captions"
    assert variants_to_cache([CAPTION], **options, encodings=10**6) is None, "7 shuffled tags: 5040 orders"
    assert variants_to_cache(few, **{**options, "dropout": 0.1}, encodings=10**6) is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tag_dropout": float("nan")}, "tag_dropout must be a finite number"),
        ({"tag_dropout": 1.5}, "tag_dropout must be between 0 and 1"),
        ({"keep_tokens": 65}, "keep_tokens must be between 0 and 64"),
        ({"keep_tokens": -1}, "keep_tokens must be between 0 and 64"),
        ({"shuffle_caption": "yes"}, "shuffle_caption must be true or false"),
    ],
)
def test_the_options_are_bounded_in_the_config(options, message):
    from core.errors import UserError
    from modules.lora_training.config import TrainConfig, config_from_dict

    with pytest.raises(UserError, match=message):
        config_from_dict(TrainConfig, {"project": "p", "base_model": "m", **options})
    defaults = config_from_dict(TrainConfig, {"project": "p", "base_model": "m"})
    assert (defaults.shuffle_caption, defaults.keep_tokens, defaults.tag_dropout) == (False, 1, 0.0)


def test_the_run_log_names_the_options_that_are_on():
    from modules.lora_training.caption_variants import describe_options

    assert describe_options(shuffle=False, keep_tokens=1, dropout=0.0) == []
    assert describe_options(shuffle=True, keep_tokens=2, dropout=0.25) == [
        "caption tags shuffled (the first 2 and the trigger kept in place)",
        "tag dropout 0.25",
    ]
    assert describe_options(shuffle=True, keep_tokens=0, dropout=0.0) == [
        "caption tags shuffled (the trigger kept in place)"
    ]


def test_counting_the_variants_of_a_caption_of_many_tags_stops_at_the_ceiling():
    import time

    huge = ", ".join(f"t{i}" for i in range(30_000))
    started = time.perf_counter()
    for shuffle, dropout in [(True, 0.0), (True, 0.1), (False, 0.1)]:
        assert variant_count(huge, trigger="", keep_tokens=0, shuffle=shuffle, dropout=dropout, ceiling=12) == 13
    assert (
        variants_to_cache([huge, "a, b"], trigger="", keep_tokens=0, shuffle=True, dropout=0.1, encodings=10**9) is None
    )
    assert time.perf_counter() - started < 1.0
    small = {"trigger": "", "keep_tokens": 0, "shuffle": True}
    assert [variant_count("a, b, c", **small, dropout=d, ceiling=c) for d, c in [(0.0, 6), (0.1, 16), (0.1, 15)]] == [
        6,
        16,
        16,
    ]
    assert variant_count("a", **small, dropout=0.0, ceiling=0) == 1
