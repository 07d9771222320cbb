"""The webui copy's check applies LoKr and LoHa changes to probe vectors from their factors: the response must
equal the full weight change (built here as peft and ComfyUI build it) times the probes, for every layout."""

import pytest
import torch

from modules.lora_training.lycoris_copy import comfy_scale, lycoris_response


def _random(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


LOKR_LAYOUTS = {
    "both full": {"lokr_w1": (4, 3), "lokr_w2": (5, 7)},
    "w2 split": {"lokr_w1": (4, 3), "lokr_w2_a": (5, 2), "lokr_w2_b": (2, 7)},
    "both split": {"lokr_w1_a": (4, 2), "lokr_w1_b": (2, 3), "lokr_w2_a": (5, 2), "lokr_w2_b": (2, 7)},
}


@pytest.mark.parametrize("layout", LOKR_LAYOUTS)
def test_a_lokr_response_is_the_kronecker_product_times_the_probes(layout):
    t = {name: _random(*shape, seed=i) for i, (name, shape) in enumerate(LOKR_LAYOUTS[layout].items())}
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    probes = _random(21, 6, seed=9)
    expected = torch.kron(w1, w2) @ probes * 0.5
    assert torch.allclose(lycoris_response(t, probes, 0.5), expected, atol=1e-5)


def test_a_loha_response_is_the_hadamard_product_times_the_probes():
    t = {
        name: _random(*shape, seed=i)
        for i, (name, shape) in enumerate(
            {"hada_w1_a": (9, 3), "hada_w1_b": (3, 11), "hada_w2_a": (9, 3), "hada_w2_b": (3, 11)}.items()
        )
    }
    probes = _random(11, 4, seed=7)
    expected = ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])) @ probes * 2.0
    assert torch.allclose(lycoris_response(t, probes, 2.0), expected, atol=1e-4)


def test_comfyui_scales_by_alpha_over_the_rank_of_the_decomposed_factor():
    alpha = {"alpha": torch.tensor(8.0)}
    assert comfy_scale({"hada_w1_b": torch.zeros(4, 9), **alpha}) == 2.0
    assert comfy_scale({"lokr_w1": torch.zeros(2, 2), "lokr_w2_b": torch.zeros(16, 9), **alpha}) == 0.5
    assert comfy_scale({"lokr_w1_b": torch.zeros(2, 2), "lokr_w2_b": torch.zeros(4, 9), **alpha}) == 2.0
    assert comfy_scale({"lokr_w1": torch.zeros(2, 2), "lokr_w2": torch.zeros(4, 9), **alpha}) == 1.0
    assert comfy_scale({"hada_w1_b": torch.zeros(4, 9)}) == 1.0


def test_dora_row_norms_from_the_factors_equal_the_dense_ones():
    from types import SimpleNamespace

    from modules.lora_training.lycoris_copy import dora_norms

    base, down, up = _random(12, 10, seed=1), _random(3, 10, seed=2), _random(12, 3, seed=3)
    base_norm, merged_norm = dora_norms(base, SimpleNamespace(down=down, up=up, scale=0.7))
    assert torch.allclose(base_norm, torch.linalg.norm(base, dim=1), rtol=1e-5)
    assert torch.allclose(merged_norm, torch.linalg.norm(base + 0.7 * up @ down, dim=1), rtol=1e-4)
