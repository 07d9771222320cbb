"""Training in several processes (``accelerate launch`` / ``torchrun``, one machine or many) with torch DDP.

The launcher sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
without them (or with ``WORLD_SIZE=1``) everything here is a no-op and training runs in one
process. Gradients are averaged by :class:`torch.nn.parallel.DistributedDataParallel`: bucketed
all-reduces that overlap the backward pass, over the LoRA parameters only (the frozen base model
is never sent). The few other collectives the loop needs (the run id, the stop flag, the step's
loss, waiting for the main process's caches) are the small helpers of :class:`Processes`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch


class Processes:
    """This process's place among the training processes, and the collectives the loop needs."""

    def __init__(self, *, rank: int = 0, world: int = 1) -> None:
        self.rank = rank
        self.world = world

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast(self, value):
        """The main process's ``value``, on every process (any picklable object)."""
        if self.world == 1:
            return value
        shared = [value]
        torch.distributed.broadcast_object_list(shared, src=0)
        return shared[0]

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on one: all of them stop at the same step."""
        if self.world == 1:
            return flag
        tensor = torch.tensor([1.0 if flag else 0.0])
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return bool(tensor.item())

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` (a scalar) over the processes."""
        if self.world == 1:
            return value
        total = value.detach().to("cpu", torch.float32).reshape(1)
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
        return total[0] / self.world

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def start_processes() -> Processes:
    """Join the launcher's process group; one process without a launcher.

    On a CUDA machine CUDA tensors go through NCCL and CPU tensors through gloo, so a run with
    ``device=cpu`` works there too, and the loop's small collectives use CPU tensors."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes()
    on_gpu = torch.cuda.is_available()
    if on_gpu:  # each process owns the GPU of its local rank: "cuda" then means that one
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="cpu:gloo,cuda:nccl" if on_gpu else "gloo")
    return Processes(rank=torch.distributed.get_rank(), world=torch.distributed.get_world_size())


class _LoraHolder(torch.nn.Module):
    """The modules that carry LoRA layers under one parent, so one DDP wrapper covers them all (the
    denoiser and, with text-encoder LoRA, the text encoders). Its forward runs the step's loss function:
    DDP must see the loss computed inside its forward to know when to reduce gradients."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleDict(modules)

    def forward(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        return compute()


class GradientSync:
    """Runs each micro-batch's loss so that, after the last micro-batch of a step, every process holds the
    mean of all processes' LoRA gradients."""

    def __init__(self, modules: dict[str, torch.nn.Module], *, processes: Processes) -> None:
        self.ddp = None
        if processes.world == 1:
            return
        holder = _LoraHolder(modules)
        # Only the LoRA weights take part: the frozen (maybe quantized) base weights and the buffers are
        # identical everywhere and are neither broadcast at the start nor reduced.
        frozen = [name for name, param in holder.named_parameters() if not param.requires_grad]
        frozen += [name for name, _ in holder.named_buffers()]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(holder, frozen)
        # Some LoRA layers may get no gradient (the text encoder's last layer, whose output the denoiser does not
        # read): DDP must look for them at each step. This also keeps gradient checkpointing (diffusers'
        # non-reentrant kind) and no_sync working, which static_graph=True does not with no_sync.
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            holder, find_unused_parameters=True, forward_sync_buffers=False
        )

    @contextlib.contextmanager
    def micro_batch(self, *, last: bool) -> Iterator[Callable[[Callable[[], torch.Tensor]], torch.Tensor]]:
        """Yields ``run(compute)`` for one micro-batch; put its forward and backward inside the block.
        Gradients are reduced only in the backward of the ``last`` micro-batch of a step."""
        if self.ddp is None:
            yield lambda compute: compute()
            return
        with contextlib.nullcontext() if last else self.ddp.no_sync():
            yield self.ddp
