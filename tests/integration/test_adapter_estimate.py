"""The estimate counts each adapter type as training builds it: its parameters exactly (memory) and its
extra work on the meta device (time)."""

import pytest
import torch

from core.model_files import model_entry
from families import family as family_class
from modules.lora_training.estimate.memory import estimate_memory
from modules.lora_training.estimate.work import count_step_work

NETWORKS = [("lora", -1), ("dora", -1), ("lokr", -1), ("lokr", 4), ("loha", -1)]


@pytest.mark.parametrize("layout", ["sdxl_folder", "flux_folder"])
@pytest.mark.parametrize(("network", "factor"), NETWORKS, ids=[f"{n}{f}" for n, f in NETWORKS])
def test_adapter_parameters_are_counted_exactly(models_dir, demo_paths, layout, network, factor):
    entry = model_entry(models_dir, getattr(demo_paths, layout).name)
    family = family_class(entry.family)(entry, models_dir=models_dir, device="cpu", weight_dtype=torch.float32)
    family.add_lora(
        rank=4, alpha=4.0, targets="attention+feedforward", train_text_encoder=False, network=network, factor=factor
    )
    estimate = estimate_memory(
        entry=entry,
        rank=4,
        targets=family.target_modules("attention+feedforward"),
        optimizer="adamw",
        resolution=64,
        batch_size=1,
        gradient_checkpointing=False,
        weight_bytes=4,
        device="cpu",
        device_bytes=None,
        network=network,
        factor=factor,
    )
    trained = sum(p.numel() for p in family.lora_parameters())
    assert estimate.parts["LoRA + gradients"] == trained * 8, (network, factor)


def test_step_work_follows_the_adapter_type(models_dir, demo_paths):
    entry = model_entry(models_dir, demo_paths.sdxl_folder.name)
    targets = family_class("sdxl").attention_targets
    common = {"targets": targets, "rank": 4, "batch": 1, "side": 64, "gradient_checkpointing": False}
    work = {n: count_step_work(entry, models_dir=models_dir, network=n, **common) for n in ("lora", "lokr", "loha")}
    # LoKr and LoHa rebuild each layer's full weight change every step: more work than LoRA's two thin products.
    assert work["loha"].total_flops > work["lora"].total_flops
    assert work["lokr"].total_flops > work["lora"].total_flops
