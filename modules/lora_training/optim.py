"""Optimizers and learning-rate schedules by name."""

from __future__ import annotations

import math

import torch


def build_optimizer(name: str, param_groups: list[dict], *, weight_decay: float):
    if name == "adamw":
        return torch.optim.AdamW(param_groups, weight_decay=weight_decay)
    if name in ("adamw8bit", "lion8bit", "paged_adamw8bit"):
        import bitsandbytes as bnb

        cls = {
            "adamw8bit": bnb.optim.AdamW8bit,
            "lion8bit": bnb.optim.Lion8bit,
            "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
        }
        return cls[name](param_groups, weight_decay=weight_decay)
    if name == "lion":
        from lion_pytorch import Lion

        # Never use_triton=True: lion-pytorch calls exit() when triton is missing.
        return Lion(param_groups, weight_decay=weight_decay, use_triton=False)
    if name == "prodigy":
        from prodigyopt import Prodigy

        # Prodigy finds the step size itself; the configured lr is its multiplier (1.0 is usual).
        return Prodigy(param_groups, weight_decay=weight_decay, safeguard_warmup=True, use_bias_correction=True)
    raise ValueError(f"unknown optimizer {name!r}")


def lr_multiplier(
    step: int, *, schedule: str, warmup_steps: int, total_steps: int, num_cycles: int = 1, power: float = 1.0
) -> float:
    """The factor applied to the base learning rate at ``step`` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0)))
    if schedule == "polynomial":
        return max(0.0, (1.0 - progress) ** power)
    raise ValueError(f"unknown lr schedule {schedule!r}")


def build_scheduler(optimizer, config, *, total_steps: int):
    def factor(step: int) -> float:
        return lr_multiplier(
            step,
            schedule=config.lr_scheduler,
            warmup_steps=config.lr_warmup_steps,
            total_steps=total_steps,
            num_cycles=config.lr_num_cycles,
            power=config.lr_power,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
