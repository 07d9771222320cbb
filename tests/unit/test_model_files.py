import pytest

from core.errors import UserError
from core.model_files import list_loras, resolve_inside
from core.model_manager import GenerationRequest, LoraChoice, validate_request
from families import family_of_state_keys


def test_family_from_tensor_names():
    assert family_of_state_keys(["conditioner.embedders.1.model.ln_final.weight"]) == "sdxl"
    assert family_of_state_keys(["double_blocks.0.img_attn.qkv.weight"]) == "flux"
    assert family_of_state_keys(["transformer_blocks.0.attn.add_q_proj.weight"]) == "flux"
    assert family_of_state_keys(["model.diffusion_model.input_blocks.0.0.weight"]) is None


def test_resolve_inside_refuses_escapes(tmp_path):
    assert resolve_inside(tmp_path, "a/b.safetensors") == tmp_path.resolve() / "a" / "b.safetensors"
    for bad in ("../x.safetensors", "/etc/passwd", "a/../../x"):
        with pytest.raises(UserError):
            resolve_inside(tmp_path, bad)


def test_list_loras_skips_hidden_partial_and_webui_copies(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "webui").mkdir()
    for name in ("a.safetensors", "sub/b.safetensors", ".a.safetensors.partial", "notes.txt", "webui/a.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "c.safetensors").write_bytes(b"x")
    assert list_loras(tmp_path) == ["a.safetensors", "sub/b.safetensors"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompt": "   "}, "prompt is empty"),
        ({"width": 100}, "Width 100 is not valid for SDXL: use a multiple of 8"),
        ({"height": 8}, "Height 8"),
        ({"steps": 0}, "Steps"),
        ({"loras": tuple(LoraChoice(f"{i}.safetensors") for i in range(5))}, "At most 4"),
    ],
)
def test_bad_generation_requests_are_explained(changes, message):
    request = GenerationRequest(model="m", prompt="a cat", width=64, height=64)
    with pytest.raises(UserError, match=message):
        validate_request(GenerationRequest(**{**request.__dict__, **changes}), "sdxl")


def test_flux_needs_multiples_of_16():
    with pytest.raises(UserError, match="multiple of 16"):
        validate_request(GenerationRequest(model="m", prompt="x", width=72, height=64), "flux")
