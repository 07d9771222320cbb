"""The memory presets fit the GPU their names give, by the tab's own estimate (``estimate_run``: the step
counted on the meta device) on the full-size model of their family at the preset's resolution.

Counting a full-size step on the meta device takes 15-30 s, so the suite checks each family's smallest preset
(the tightest fit); every shipped preset was checked the same way when it was written (README, Presets)."""

from __future__ import annotations

import re

import pytest

from families import FAMILY_NAMES, family
from modules.lora_training.preset_files import preset_names, read_preset
from tests.header_only_models import header_only_full_size

GIB = 2**30
HEADROOM = 0.95  # the allocator's fragmentation and what the estimate leaves out
SHIPPED = [name for name in preset_names() if re.search(r"-\d+gb$", name)]
SMALLEST = [family(name).smallest_preset for name in FAMILY_NAMES]


@pytest.fixture(scope="module")
def full_size_models(tmp_path_factory):
    models = tmp_path_factory.mktemp("full-size") / "models"
    return models, {name: header_only_full_size(name, models) for name in FAMILY_NAMES}


def test_every_shipped_preset_names_its_card_and_family():
    assert len(SHIPPED) == len(preset_names()) >= 11
    for name in SHIPPED:
        assert name.startswith(read_preset(name)["family"] + "-"), name
    assert set(SMALLEST) <= set(SHIPPED)


@pytest.mark.slow
@pytest.mark.parametrize("preset", SMALLEST)
def test_the_preset_fits_its_card(preset, full_size_models, monkeypatch):
    import torch

    import modules.lora_training.estimate.memory as memory
    from modules.lora_training.config import TrainConfig, config_from_dict
    from modules.lora_training.estimate import estimate_run

    models, names = full_size_models
    shipped = read_preset(preset)
    card = int(re.search(r"-(\d+)gb$", preset).group(1)) * GIB
    # The card the preset is for: a CUDA GPU of that size that computes in bf16.
    monkeypatch.setattr(memory, "detected_device", lambda: ("cuda", card))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    config = config_from_dict(
        TrainConfig, {"project": "p", "base_model": names[shipped["family"]], **shipped["options"]}
    )
    estimate = estimate_run(config, models_dir=models, resolution=shipped["resolution"], timing=False)
    assert estimate.memory.activations_counted
    assert estimate.memory.parts["weights"] > 1.5 * GIB, "the full-size model's weights were counted"
    assert estimate.memory.total_bytes <= HEADROOM * card, estimate.describe()
