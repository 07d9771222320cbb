"""Training runs in fp16/bf16 on the CPU, kept open to look inside: the precision checks the tests share."""

from __future__ import annotations

import math

import torch

from modules.lora_training.config import TrainConfig
from modules.lora_training.events import Log, StepDone
from modules.lora_training.train import Trainer

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def trained_in(trainer: Trainer, *, half: torch.dtype) -> None:
    """The LoRA path's rule: trainable adapter parameters (and their gradients) fp32, the frozen base half."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert trainer.trainable and all(p.dtype == torch.float32 for p in trainer.trainable)
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in trainer.trainable)
    modules = trainer.family.lora_modules().values()
    layers = [m for model in modules for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(layer.get_base_layer().weight.dtype == half for layer in layers)
    assert all(not p.requires_grad for layer in layers for p in layer.get_base_layer().parameters())


def run_trainer(config: TrainConfig, *, root, models_dir) -> tuple[Trainer, object, list]:
    """Setup and run as ``train()`` does, keeping the trainer to look inside; (trainer, result, events)."""
    events: list = []
    trainer = Trainer(
        config,
        projects_dir=root / "projects",
        models_dir=models_dir,
        loras_dir=root / "loras",
        on_event=events.append,
        should_stop=lambda: False,
        resume=False,
    )
    try:
        trainer.setup()
        result = trainer.run()
    finally:
        if hasattr(trainer, "hash_pool"):
            trainer.hash_pool.shutdown(wait=False)
        trainer.processes.close()
    return trainer, result, events


def all_steps_applied(trainer: Trainer, result, events: list) -> list[float]:
    logs = [e.message for e in events if isinstance(e, Log)]
    losses = [e.loss for e in events if isinstance(e, StepDone)]
    assert result.status == "finished", (result.message, logs)
    assert len(losses) == result.step and all(math.isfinite(v) for v in losses), losses
    assert not [line for line in logs if "not applied" in line], logs
    assert trainer.skipped == 0
    return losses
