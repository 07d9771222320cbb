"""Resumable checkpoints: ``checkpoints/step-000250/`` written whole or not at all.

Each holds the LoRA weights (safetensors), the optimizer, LR-scheduler and grad-scaler
states (``torch.save``, read back with ``weights_only=True``), the step and the config, and with EMA on
the averaged adapter weights (``ema.safetensors``) and their update count. No RNG
state: every random draw of a step derives from the run's seed and the step (:mod:`.data`). Only our own files are ever read back with torch.load.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from core.atomic import atomic_path
from core.errors import UserError
from core.regular_files import UnreadableFile, load_safetensors_bounded, read_bounded, read_json_bounded

_PREFIX = "step-"
# ASCII digits only: "step-²" passes str.isdigit and int() refuses it; a name of thousands of digits is no step
_STEP_NAME = re.compile(r"step-[0-9]{1,12}")
MAX_JSON_BYTES = 4 * 2**20
MAX_WEIGHTS_BYTES = 64 * 2**30  # a checkpoint's LoRA / optimizer state: large, still bounded


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
    found = [
        p for p in folder.iterdir() if _STEP_NAME.fullmatch(p.name) and p.is_dir() and (p / "state.json").is_file()
    ]
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
    """The checkpoint in ``folder``; each file is opened once, as a regular file (a FIFO or a device put there
    would block the whole server), and a file that cannot be read is a UserError naming it."""
    folder = Path(folder)
    meta = _read(folder / "state.json", lambda p: read_json_bounded(p, max_bytes=MAX_JSON_BYTES))
    training = _read(folder / "training_state.pt", _load_training_state)
    if not isinstance(meta, dict) or not _is_count(meta.get("step")):
        raise UserError(f"{folder / 'state.json'} is not a checkpoint's state; delete the folder {folder}.")
    ema = folder / "ema.safetensors"
    has_ema = os.path.lexists(ema)
    return CheckpointState(
        step=meta["step"],
        lora=_read(folder / "lora.safetensors", _load_tensors),
        optimizer=training["optimizer"],
        scheduler=training["scheduler"],
        scaler=training["scaler"],
        config=_read(folder / "config.json", lambda p: read_json_bounded(p, max_bytes=MAX_JSON_BYTES)),
        skipped=_count(meta.get("skipped", 0)),
        ema=_read(ema, _load_tensors) if has_ema else None,
        ema_updates=_count(meta.get("ema_updates", 0)),
    )


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 10**12


def _count(value) -> int:
    return value if _is_count(value) else 0


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_safetensors_bounded(path, max_bytes=MAX_WEIGHTS_BYTES)


def _load_training_state(path: Path) -> dict:
    data = read_bounded(path, max_bytes=MAX_WEIGHTS_BYTES)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise UnreadableFile(f"not a readable training state ({str(exc)[:200]})") from exc
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "scaler"} <= set(state):
        raise UnreadableFile("is not a training state")
    return state


def _read(path: Path, reader):
    try:
        return reader(path)
    except UnreadableFile as exc:
        raise UserError(
            f"Checkpoint file {path} cannot be used ({exc}); delete the folder {path.parent} (or the whole run) and train again."
        ) from exc
