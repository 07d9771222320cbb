"""An exponential moving average of the adapter weights, kept in fp32 beside them on the device.

After each applied optimizer step ``s`` (counted from 1): up to ``start_step`` the average is the
weights themselves; from then on ``average = decay * average + (1 - decay) * weights``. Its state (the
averaged tensors and how many averaging updates they had) goes into each checkpoint, so a resumed run
continues the same average. :meth:`AdapterEMA.applied` puts the averaged weights into the model for a
while (samples, the EMA LoRA file) and the trained ones back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from core.errors import UserError


class AdapterEMA:
    def __init__(self, params: dict[str, torch.nn.Parameter], *, decay: float, start_step: int) -> None:
        self.params = params
        self.decay = decay
        self.start_step = start_step
        self.shadow = {name: p.detach().float().clone() for name, p in params.items()}
        self.updates = 0  # averaging updates so far (steps after start_step)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights as they are after optimizer step ``step``."""
        for name, param in self.params.items():
            if step <= self.start_step:
                self.shadow[name].copy_(param.detach())
            else:
                self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)
        if step > self.start_step:
            self.updates += 1

    @torch.no_grad()
    def restart_from_weights(self) -> None:
        """The average set to the weights as they are now (a resumed run whose checkpoint kept no average)."""
        for name, param in self.params.items():
            self.shadow[name].copy_(param.detach())
        self.updates = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().cpu().contiguous() for name, tensor in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], *, updates: int) -> None:
        if set(state) != set(self.shadow):
            missing = sorted(set(self.shadow) ^ set(state))[:3]
            raise UserError(f"Cannot resume: the checkpoint's EMA does not match the adapter layers ({missing}).")
        for name, tensor in state.items():
            self.shadow[name].copy_(tensor.to(self.shadow[name].device, torch.float32))
        self.updates = updates

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model inside the block; the trained ones back after it."""
        with torch.no_grad():
            trained = {name: p.detach().clone() for name, p in self.params.items()}
            for name, param in self.params.items():
                param.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(trained[name])


def load_output_weights(family, state, config) -> str:
    """Load a checkpoint's adapter weights as the run's main LoRA file holds them: the average when the run
    saved it there (``ema_weights`` "ema") and the checkpoint kept one, else the trained weights; which
    ("ema" or "raw")."""
    family.load_lora_state_dict(state.lora)
    if config.ema and config.ema_weights == "ema" and state.ema is not None:
        load_averaged(family.lora_modules(), state.ema)
        return "ema"
    return "raw"


def load_averaged(modules: dict[str, torch.nn.Module], state: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's averaged weights (keys ``<part>/<parameter name>``, as :class:`AdapterEMA` names them)
    into the adapter layers of ``modules`` (part name → module)."""
    params = {f"{part}/{name}": p for part, module in modules.items() for name, p in module.named_parameters()}
    unknown = sorted(set(state) - set(params))[:3]
    if unknown:
        raise UserError(f"The checkpoint's EMA does not match the adapter layers ({unknown}).")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
