"""Before training: how long one optimizer step will take, from counted work replayed on the device.

The work comes from :mod:`.work` (the meta device). Then, on the real device and in
the training dtype:

- every distinct heavy operation (matmuls, convolutions, attention and their backward)
  runs once on random inputs of its exact shapes and is timed, biggest first, within a
  time budget; the light ones (element-wise, norms) are charged their bytes at the
  measured memory bandwidth;
- the host's cost of driving all of them (Python, autograd, dispatch, launches, the
  optimizer) is timed on a narrow copy of the same architecture: every block and layer
  kept at the smallest widths, so it does almost no arithmetic.

On the CPU the two add up; on a GPU, launching runs ahead of the kernels, so the slower
of the host and device sides sets the pace.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._pytree import tree_map

from core.model_files import ModelEntry
from families import family as model_family
from modules.lora_training.estimate.work import (
    StepWork,
    attention_forward_backward,
    denoiser_blueprint,
    denoiser_inputs,
    trainable_denoiser,
)


@dataclass(frozen=True)
class DeviceSpeed:
    device: str
    dtype: torch.dtype
    flops_per_s: float  # dense matmul throughput
    bytes_per_s: float  # memory bandwidth (a large copy)
    seconds_per_call: float  # one dispatched op, Python and autograd included


@dataclass(frozen=True)
class StepTimeEstimate:
    seconds_per_micro_batch: float
    micro_batches: int
    total_flops: float
    calls: int
    replayed_share: float  # of the FLOPs, timed by running the real operation
    speed: DeviceSpeed

    @property
    def seconds_per_step(self) -> float:
        return self.seconds_per_micro_batch * self.micro_batches

    def describe(self) -> str:
        return (
            f"Estimated time: {self.seconds_per_step:.2f} s/step on {self.speed.device} "
            f"({self.total_flops * self.micro_batches / 1e12:.3g} TFLOP per step, "
            f"{self.replayed_share:.0%} of it timed on this device; {self.calls} operations per micro-batch)."
        )


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(function, *, repeats: int, device: str) -> float:
    """Seconds per call of ``function`` after one warm-up call."""
    function()
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    _synchronize(device)
    return (time.perf_counter() - started) / repeats


def measure_device(device: str, dtype: torch.dtype) -> DeviceSpeed:
    """Throughput, bandwidth and per-call cost of ``device`` in ``dtype`` (about a second)."""
    on_gpu = device == "cuda"
    size = 8192 if on_gpu else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    flops_per_s = 2 * size**3 / _timed(lambda: a @ b, repeats=10 if on_gpu else 4, device=device)

    source = torch.empty(2**28 if on_gpu else 2**24, device=device, dtype=torch.uint8)
    target = torch.empty_like(source)
    bytes_per_s = 2 * source.numel() / _timed(lambda: target.copy_(source), repeats=10, device=device)

    one = torch.ones(1, device=device, dtype=dtype)
    return DeviceSpeed(
        device=device,
        dtype=dtype,
        flops_per_s=flops_per_s,
        bytes_per_s=bytes_per_s,
        seconds_per_call=_timed(lambda: one + one, repeats=200, device=device),
    )


def _materialize(value, *, device: str, dtype: torch.dtype):
    """A random tensor on ``device`` shaped like a meta tensor (floating ones in ``dtype``)."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_floating_point():
        return torch.randn(tuple(value.shape), device=device, dtype=dtype)
    return torch.zeros(tuple(value.shape), device=device, dtype=value.dtype)


def _replay_seconds(replay, *, device: str, dtype: torch.dtype) -> float:
    function, args, kwargs = replay
    real_args = tree_map(lambda v: _materialize(v, device=device, dtype=dtype), args)
    real_kwargs = tree_map(lambda v: _materialize(v, device=device, dtype=dtype), kwargs)
    with torch.no_grad() if function is not attention_forward_backward else torch.enable_grad():
        return _timed(lambda: function(*real_args, **real_kwargs), repeats=3, device=device)


def estimate_step_seconds(
    work: StepWork, speed: DeviceSpeed, *, host_seconds: float, micro_batches: int = 1, budget_s: float = 20.0
) -> StepTimeEstimate:
    """One step of ``work`` on ``speed.device``: the heaviest operations replayed within ``budget_s``,
    the rest charged by roofline, plus ``host_seconds`` of driving them."""
    scale = speed.dtype.itemsize / 4
    measured: dict = {}
    started = time.perf_counter()
    heavy = sorted(work.replays, key=lambda kind: work.flops[kind] * work.counts[kind], reverse=True)
    for kind in heavy:
        if time.perf_counter() - started > budget_s:
            break
        try:
            measured[kind] = _replay_seconds(work.replays[kind], device=speed.device, dtype=speed.dtype)
        except (RuntimeError, TypeError, ValueError):
            continue  # an operation that does not run outside its graph falls back to the roofline
    for kind in [k for k in measured if k[0] == "attention backward"]:
        forward = measured.get(("attention", kind[1]))
        if forward is None:
            forward = _replay_seconds(work.replays[("attention", kind[1])], device=speed.device, dtype=speed.dtype)
        measured[kind] -= forward

    kernels = 0.0
    for kind, count in work.counts.items():
        if kind in measured:
            # The host's share of a call is in host_seconds already.
            kernels += max(measured[kind] - speed.seconds_per_call, 0.0) * count
        else:
            kernels += max(work.flops[kind] / speed.flops_per_s, work.moved[kind] * scale / speed.bytes_per_s) * count
    per_micro_batch = max(kernels, host_seconds) if speed.device == "cuda" else kernels + host_seconds
    replayed_flops = sum(work.flops[kind] * work.counts[kind] for kind in measured)
    total = work.total_flops
    return StepTimeEstimate(
        seconds_per_micro_batch=per_micro_batch,
        micro_batches=micro_batches,
        total_flops=total,
        calls=work.calls,
        replayed_share=replayed_flops / total if total else 0.0,
        speed=speed,
    )


def narrow_config(family: str, config: dict) -> dict:
    """The same architecture, every block and layer kept, at the smallest widths it accepts.

    Running it costs almost no arithmetic, so its time is what the host spends driving the
    real model's operations (Python, autograd, dispatch, kernel launches).
    """
    return model_family(family).narrow_config(config)


def measure_host_seconds(
    entry: ModelEntry,
    *,
    models_dir: Path,
    targets: tuple[str, ...],
    rank: int,
    gradient_checkpointing: bool,
    optimizer: str,
    speed: DeviceSpeed,
    network: str = "lora",
    factor: int = -1,
) -> float:
    """Seconds the host spends on one training step of this architecture: its narrow copy, timed
    through forward, backward, clipping and the optimizer, as the training loop runs them."""
    from modules.lora_training.optim import build_optimizer

    model_class, config = denoiser_blueprint(entry, models_dir=models_dir)
    narrow = narrow_config(entry.family, config)
    with torch.device(speed.device):
        model = trainable_denoiser(
            model_class,
            narrow,
            targets=targets,
            rank=rank,
            gradient_checkpointing=gradient_checkpointing,
            network=network,
            factor=factor,
        )
    for param in model.parameters():
        param.data = param.data.to(torch.float32 if param.requires_grad else speed.dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    steps = build_optimizer(optimizer, [{"params": trainable, "lr": 1e-6}], weight_decay=0.0)
    inputs = denoiser_inputs(
        entry.family,
        narrow,
        batch=1,
        latent_side=8,
        text_length=8,
        make=lambda *shape: torch.rand(*shape, device=speed.device, dtype=speed.dtype),
    )

    def step():
        model(**inputs)[0].float().square().mean().backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        steps.step()
        steps.zero_grad(set_to_none=True)

    return min(_timed(step, repeats=1, device=speed.device) for _ in range(3))
