"""The checked reading of ``lora_adapter_metadata`` (core/adapter_metadata.py) on its own: pattern lookup
as peft does it for plain names, diffusers' layer spellings, and what passes or is refused."""

from __future__ import annotations

import json

import pytest

from core.adapter_metadata import adapter_configs, check_adapter_file, lora_layer
from core.errors import UserError


def _meta(**fields) -> dict[str, str]:
    return {"lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in fields.items()})}


def test_patterns_follow_peft_first_match_on_names_and_dotted_suffixes():
    config = adapter_configs(
        _meta(r=4, lora_alpha=4, rank_pattern={"attn1.to_q": 8, "to_q": 2, "^mid.to_q": 16}), file="f"
    )["unet"]
    assert config.rank_of("down.0.attn1.to_q") == 8
    assert config.rank_of("down.0.attn2.to_q") == 2
    assert config.rank_of("mid.to_q") == 2  # "to_q" comes first in the file
    assert config.rank_of("xto_q") == 4  # a suffix starts at a dot
    assert config.rank_of("up.to_k") == 4


def test_thousands_of_lora_patterns_are_looked_up_quickly():
    import time

    pattern = {f"^block.{i}.to_q": 4 for i in range(5000)}
    config = adapter_configs(_meta(r=8, lora_alpha=8, rank_pattern=pattern), file="f")["unet"]
    started = time.perf_counter()
    assert [config.rank_of(f"block.{i}.to_q") for i in range(5000)] == [4] * 5000
    assert time.perf_counter() - started < 2


@pytest.mark.parametrize(
    ("key", "layer"),
    [
        ("unet.a.attn1.processor.to_q_lora.down.weight", ("a.attn1.to_q", "down")),
        ("unet.a.attn1.processor.to_out_lora.up.weight", ("a.attn1.to_out.0", "up")),
        ("unet.a.proj_in.lora.up.weight", ("a.proj_in", "up")),
        ("text_encoder.m.q_proj.lora_A.weight", ("m.q_proj", "down")),
        ("unet.m.lora_B.bias", ("m", "up")),
        ("unet.m.hada_w1_a", None),
    ],
)
def test_diffusers_spellings_of_a_lora_layer(key, layer):
    assert lora_layer(key) == layer


def test_a_plain_layer_name_as_a_string_passes_and_a_pattern_does_not():
    lokr = {"peft_type": "LOKR", "r": 4, "alpha": 4, "target_modules": ["to_q"]}
    assert adapter_configs(_meta(**lokr, exclude_modules="proj_out"), file="f")["unet"].exclude_modules == "proj_out"
    for pattern in (".*", "proj_(out|in)", "(.*.*)*x", "^proj_out"):
        with pytest.raises(UserError, match="regular expression"):
            adapter_configs(_meta(**lokr, exclude_modules=pattern), file="f")


def test_a_rank_that_does_not_match_the_weights_is_refused_before_peft():
    shapes = {"unet.a.processor.to_q_lora.down.weight": (4, 32), "unet.a.processor.to_q_lora.up.weight": (32, 4)}
    check_adapter_file(shapes, _meta(r=4, lora_alpha=2), file="f.safetensors")
    with pytest.raises(UserError, match=r"f.safetensors.*rank 4 but the header says 8"):
        check_adapter_file(shapes, _meta(r=8, lora_alpha=2), file="f.safetensors")
