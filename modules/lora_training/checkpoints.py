"""Resumable checkpoints: ``checkpoints/step-000250/`` written whole or not at all.

Each holds the LoRA weights (safetensors), the optimizer, LR-scheduler and grad-scaler
states (``torch.save``, read back with ``weights_only=True``), the step and the config, and with EMA on
the averaged adapter weights (``ema.safetensors``) and their update count. No RNG
state: every random draw of a step derives from the run's seed and the step (:mod:`.data`). Only our own files are ever read back with torch.load.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from core.atomic import atomic_path

_PREFIX = "step-"


@dataclass(frozen=True)
class CheckpointState:
    step: int
    lora: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    config: dict
    skipped: int = 0  # steps whose update was skipped (non-finite gradients): they moved the data on
    ema: dict[str, torch.Tensor] | None = None  # the averaged adapter weights (:mod:`.ema`), when EMA is on
    ema_updates: int = 0


def checkpoint_dir(checkpoints: Path, step: int) -> Path:
    return Path(checkpoints) / f"{_PREFIX}{step:06d}"


def list_checkpoints(checkpoints: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one has no state.json and is ignored)."""
    folder = Path(checkpoints)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def latest_checkpoint(checkpoints: Path) -> Path | None:
    found = list_checkpoints(checkpoints)
    return found[-1] if found else None


def save_checkpoint(checkpoints: Path, state: CheckpointState, *, keep: int, protect: int | None = None) -> Path:
    """Write ``state`` whole, then remove all but the ``keep`` newest checkpoints, except the one of step
    ``protect`` (the best so far by validation)."""
    from safetensors.torch import save_file

    final = checkpoint_dir(checkpoints, state.step)
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        save_file(state.lora, str(tmp / "lora.safetensors"))
        if state.ema is not None:
            save_file(state.ema, str(tmp / "ema.safetensors"))
        torch.save(
            {
                "optimizer": state.optimizer,
                "scheduler": state.scheduler,
                "scaler": state.scaler,
            },
            tmp / "training_state.pt",
        )
        (tmp / "config.json").write_text(json.dumps(state.config, indent=2))
        # Written last: its presence marks the checkpoint complete.
        meta = {"step": state.step, "skipped": state.skipped}
        if state.ema is not None:
            meta["ema_updates"] = state.ema_updates
        (tmp / "state.json").write_text(json.dumps(meta))
    kept = checkpoint_dir(checkpoints, protect) if protect is not None else None
    for old in list_checkpoints(checkpoints)[:-keep]:
        if old != kept:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: Path) -> CheckpointState:
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / "state.json").read_text())
    training = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
    ema = folder / "ema.safetensors"
    return CheckpointState(
        step=int(meta["step"]),
        lora=load_file(str(folder / "lora.safetensors")),
        optimizer=training["optimizer"],
        scheduler=training["scheduler"],
        scaler=training["scaler"],
        config=json.loads((folder / "config.json").read_text()),
        skipped=int(meta.get("skipped", 0)),
        ema=load_file(str(ema)) if ema.is_file() else None,
        ema_updates=int(meta.get("ema_updates", 0)),
    )
