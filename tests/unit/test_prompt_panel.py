"""lora_weight: a LoRA, DoRA, LoKr or LoHa layer at weight 0 gives the base output, at 1 its trained output, restored after."""

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model

from modules.lora_training.prompt_panel import lora_weight


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_weights_zero_half_and_one(dora):
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(4, 8)
    base = model(x)
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=["proj"], use_dora=dora))
    layer = model.base_model.model.proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    if dora:
        with torch.no_grad():
            layer.lora_magnitude_vector["default"].weight.mul_(1.5)
    trained = model(x)
    with torch.no_grad():
        with lora_weight([model], 0.0):
            assert torch.allclose(model(x), base), "weight 0 is the base model"
        with lora_weight([model], 0.5):
            half = model(x)
        assert torch.allclose(model(x), trained), "restored after"
        with lora_weight([model], 1.0):
            assert torch.allclose(model(x), trained)
    assert not torch.allclose(half, base) and not torch.allclose(half, trained)
    assert not layer.disable_adapters


@pytest.mark.parametrize("config", [LoKrConfig, LoHaConfig], ids=["lokr", "loha"])
def test_lycoris_layers_follow_the_weight(config):
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(4, 8)
    base = model(x)
    model = get_peft_model(model, config(r=2, alpha=2, target_modules=["proj"], init_weights=False))
    trained = model(x)
    assert not torch.allclose(trained, base)
    with torch.no_grad():
        with lora_weight([model], 0.0):
            assert torch.allclose(model(x), base), "weight 0 is the base model"
        with lora_weight([model], 0.5):
            assert torch.allclose(model(x), (base + trained) / 2, atol=1e-6), "the change scales linearly"
        assert torch.allclose(model(x), trained), "restored after"
