"""The memory estimate's exact parts match the models as loaded, in every layout and quantization."""

import pytest
import torch

from core.pipelines import model_entry
from modules.lora_training.estimate import estimate_memory
from modules.lora_training.families import family_class


def _stored_bytes(model: torch.nn.Module) -> int:
    """Bytes the denoiser's parameters hold, bitsandbytes scales included."""
    total = 0
    for param in model.parameters():
        total += param.numel() * param.element_size()
        state = getattr(param, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if state.state2 is not None:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
        scales = getattr(param, "SCB", None)
        if scales is not None:
            total += scales.numel() * scales.element_size()
    return total


@pytest.mark.parametrize(
    ("layout", "quantization"),
    [
        ("sdxl_folder", "none"),
        ("sdxl_single_file", "none"),
        ("flux_folder", "none"),
        ("flux_single_file", "none"),
        ("flux_single_file", "nf4"),
        ("sdxl_folder", "int8"),
    ],
)
def test_weights_and_lora_parts_are_exact(models_dir, demo_paths, layout, quantization):
    entry = model_entry(models_dir, getattr(demo_paths, layout).name)
    family = family_class(entry.family)(
        entry, models_dir=models_dir, device="cpu", weight_dtype=torch.float32, base_quantization=quantization
    )
    measured_weights = _stored_bytes(family.denoiser)
    family.add_lora(rank=4, alpha=4.0, targets="attention+feedforward", train_text_encoder=False)
    estimate = estimate_memory(
        entry=entry,
        rank=4,
        targets=family.attention_targets + family.feedforward_targets,
        optimizer="adamw",
        resolution=64,
        batch_size=1,
        gradient_checkpointing=False,
        weight_bytes=4,
        quantization=quantization,
        device="cpu",
        device_bytes=None,
    )
    lora_params = sum(p.numel() for p in family.lora_parameters())
    assert estimate.parts["weights"] == measured_weights
    assert estimate.parts["LoRA + gradients"] == lora_params * 8
    assert estimate.parts["optimizer"] == lora_params * 8
