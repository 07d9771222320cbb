"""EMA, masked loss and class images in the precisions a GPU user picks, on the CPU: one short run per
precision with all three on (SDXL + LoKr in fp16 with the GradScaler, Flux + DoRA in bf16). The average
stays fp32 and finite, the masks weight the loss in the half-precision path, the class images are
rendered by the half-precision base model and mixed in."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from modules.lora_training.config import TrainConfig, config_from_dict
from modules.lora_training.events import Log
from tests.half_precision import HALF, all_steps_applied, run_trainer, trained_in
from tests.integration.test_masked_loss import masked_project  # noqa: F401 - the fixture, shared
from tests.plain_pipelines import DEMO_MODELS

RUNS = [("sdxl", "lokr", "fp16"), ("flux", "dora", "bf16")]
STEPS = 3


def _options(family: str, network: str, precision: str) -> dict:
    values = {"project": "masked", "base_model": DEMO_MODELS[family], "name": f"options-{family}-{precision}"}
    values |= {"steps": STEPS, "network": network, "rank": 4, "alpha": 4.0, "learning_rate": 1e-2, "seed": 2}
    values |= {"mixed_precision": precision, "validation_share": 0.0, "flip": True}
    values |= {"ema": True, "ema_decay": 0.8, "ema_start_step": 1, "ema_weights": "ema"}
    values |= {"masked_loss": True, "mask_floor": 0.2}
    values |= {"reg_ratio": 0.5, "class_prompt": "a photo of a dog", "reg_count": 2, "sample_steps": 2}
    return values | {"gradient_accumulation": 2}  # one subject and one class micro-batch per step


@pytest.fixture(scope="module", params=RUNS, ids=["-".join(r) for r in RUNS])
def run(request, masked_project, models_dir):  # noqa: F811 - the fixture imported above
    family, network, precision = request.param
    projects = masked_project[0]
    config = config_from_dict(TrainConfig, _options(family, network, precision))
    trainer, result, events = run_trainer(config, root=projects.parent, models_dir=models_dir)
    return {"trainer": trainer, "result": result, "events": events, "precision": precision, "projects": projects}


def test_the_run_trains_the_adapter_in_fp32_and_applies_every_step(run):
    trainer = run["trainer"]
    all_steps_applied(trainer, run["result"], run["events"])
    trained_in(trainer, half=HALF[run["precision"]])
    assert (trainer.scaler is not None) == (run["precision"] == "fp16")


def test_the_average_is_fp32_finite_and_saved_beside_the_raw_weights(run):
    trainer, result = run["trainer"], run["result"]
    ema = trainer.ema
    assert ema.updates == STEPS - 1, "averaged after each applied step past the start step"
    assert ema.shadow.keys() == ema.params.keys() and len(ema.shadow) == len(trainer.trainable)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in ema.shadow.values())
    assert any(not torch.equal(ema.shadow[n], p.detach()) for n, p in ema.params.items()), "an average, not a copy"
    main = load_file(str(result.lora_path))
    raw = load_file(str(result.lora_path.with_name(f"{result.lora_path.stem}.raw.safetensors")))
    assert main.keys() == raw.keys()
    assert all(torch.isfinite(v.float()).all() for v in [*main.values(), *raw.values()])
    assert any(not torch.equal(main[k], raw[k]) for k in main), "the main file holds the average"
    checkpoint = load_file(str(result.checkpoint / "ema.safetensors"))
    assert checkpoint and all(v.dtype == torch.float32 for v in checkpoint.values())


def test_the_masks_weight_the_loss_in_the_half_precision_path(run):
    """The trainer's own micro-batch loss (autocast, half weights) with the masks, without, and at floor 1."""
    trainer = run["trainer"]
    assert any(
        "masked loss (2 of 4 images have a mask; floor 0.2)" in e.message for e in run["events"] if isinstance(e, Log)
    )
    shares = (trainer.stream.share(m, rank=0, world=1) for m in range(40))
    share = next(s for s in shares if not s.prior and all(item.mask_path for item in s.items))
    config = trainer.config
    losses = {}
    for label, options in {"masked": {}, "off": {"masked_loss": False}, "floor 1": {"mask_floor": 1.0}}.items():
        trainer.config = dataclasses.replace(config, **options)
        with torch.no_grad():
            losses[label] = trainer._micro_loss(share, draw=7, micro=0).item()
    trainer.config = config
    assert all(np.isfinite(list(losses.values())))
    assert losses["floor 1"] == pytest.approx(losses["off"], rel=1e-6), "only the weights differ"
    assert losses["masked"] < 0.9 * losses["off"], losses


def test_class_images_are_rendered_in_half_precision_and_mixed_in(run):
    trainer = run["trainer"]
    described = next(e.message for e in run["events"] if isinstance(e, Log) and e.message.startswith("Training:"))
    assert "2 class images (rendered by the base model)" in described
    assert len(trainer.class_items) == 2
    for item in trainer.class_items:
        pixels = np.asarray(Image.open(item.image_path).convert("RGB"), dtype=np.float32)
        assert pixels.std() > 5, "a real image (NaN latents decode to one flat colour)"
    mix = [trainer.stream.share(m, rank=0, world=1).prior for m in range(2 * STEPS)]
    assert sum(mix) == STEPS, mix
