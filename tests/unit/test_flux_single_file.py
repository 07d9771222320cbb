"""The Flux single-file reader against diffusers' own converter, and its inverse."""

import pytest
import torch

from core.errors import UserError
from families.flux_layout import (
    _all_original_names,
    diffusers_to_original,
    original_to_diffusers,
    transformer_config_from_shapes,
)

FULL_WIDTH = 3072  # diffusers' converter assumes the full-size model's width


def _original_state(*, double: int, single: int, width: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """Random tensors under every BFL name. Only row counts matter to the conversion, so the
    columns stay narrow: a full-width layout fits in a few MB."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name in _all_original_names(double, single):
        if "single_blocks" in name and ".linear1." in name:
            rows = 3 * width + 4 * width
        elif ".qkv." in name:
            rows = 3 * width
        elif name.startswith("img_in."):
            rows = width
        else:
            rows = 2 * 5  # anything even works for the swapped halves
        shape = (rows,) if name.endswith((".bias", ".scale")) else (rows, 3)
        state[prefix + name] = torch.randn(shape, generator=generator)
    return state


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_matches_diffusers_converter_on_a_full_width_layout(prefix):
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    state = _original_state(double=2, single=3, width=FULL_WIDTH, prefix=prefix)
    expected = convert_flux_transformer_checkpoint_to_diffusers(dict(state))
    ours = original_to_diffusers(dict(state))
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(ours[key], value), key


def test_inverse_gives_back_the_original_tensors():
    state = _original_state(double=1, single=2, width=16)
    back = diffusers_to_original(original_to_diffusers(state))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_other_parts_of_an_all_in_one_checkpoint_are_ignored():
    state = _original_state(double=1, single=1, width=16, prefix="model.diffusion_model.")
    state["vae.decoder.conv_in.weight"] = torch.zeros(1)
    state["text_encoders.clip_l.transformer.weight"] = torch.zeros(1)
    assert "vae.decoder.conv_in.weight" not in original_to_diffusers(state)


def test_unknown_tensors_are_refused():
    state = _original_state(double=1, single=1, width=16)
    state["double_blocks.0.img_attn.lora_down.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match="Unrecognised"):
        original_to_diffusers(state)


def test_config_read_off_the_shapes_of_flux_dev():
    shapes = {
        "img_in.weight": (3072, 64),
        "txt_in.weight": (3072, 4096),
        "vector_in.in_layer.weight": (3072, 768),
        "guidance_in.in_layer.weight": (3072, 256),
        "final_layer.linear.weight": (64, 3072),
        "double_blocks.0.img_attn.norm.query_norm.scale": (128,),
        "double_blocks.0.img_mlp.0.weight": (12288, 3072),
        "double_blocks.18.img_mod.lin.weight": (18432, 3072),
        "single_blocks.37.linear2.weight": (3072, 15360),
    }
    config = transformer_config_from_shapes(shapes)
    assert config == {
        "patch_size": 1,
        "in_channels": 64,
        "out_channels": 64,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
    }
    del shapes["guidance_in.in_layer.weight"]
    assert transformer_config_from_shapes(shapes)["guidance_embeds"] is False  # schnell
