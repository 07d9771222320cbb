"""The training work of one micro-batch, counted without weights or a device.

The denoiser is built on the ``meta`` device with its real configuration, LoRA is added as
in training, and one forward + backward at the bucket size runs under an operation
counter: every dispatched operation with its FLOPs (torch's own formulas) and the bytes it
reads and writes. Attention is recorded as one fused operation, as real devices run it,
not as the meta device's decomposition. Saved-tensor hooks measure what autograd keeps
for the backward pass; with gradient checkpointing, each block's forward is counted
twice (the recomputation) and only its inputs stay between the passes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from core.model_files import ModelEntry
from core.regular_files import read_config
from families import family as model_family

_FREE = {"aten.empty.memory_format", "aten.new_empty.default", "aten.empty_strided.default", "aten.detach.default"}


@dataclass
class StepWork:
    """Operations of one micro-batch: how many of each kind, and how to run one of each."""

    counts: Counter = field(default_factory=Counter)  # kind → calls
    flops: dict = field(default_factory=dict)  # kind → FLOPs of one call
    moved: dict = field(default_factory=dict)  # kind → bytes of one call, at 4 bytes per value
    replays: dict = field(default_factory=dict)  # heavy kind → (function, meta args, meta kwargs)
    activation_bytes: float = 0.0  # what autograd keeps for the backward pass, at 4 bytes per value
    largest_activation: float = 0.0  # the biggest single tensor among them

    def add(self, kind, *, flops: float, moved: float, replay=None) -> None:
        if kind not in self.counts:
            self.flops[kind], self.moved[kind] = flops, moved
            if replay is not None and flops > 0:
                self.replays[kind] = replay
        self.counts[kind] += 1

    @property
    def calls(self) -> int:
        return sum(self.counts.values())

    @property
    def total_flops(self) -> float:
        return sum(self.flops[kind] * count for kind, count in self.counts.items())


class _AttentionOp(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention on ``meta``: one fused op forward, one backward."""

    @staticmethod
    def forward(ctx, work, query, key, value):
        ctx.work, ctx.shapes = work, (query.shape, key.shape, value.shape)
        _record_attention(work, query, key, value, backward=False)
        output = query.new_empty(*query.shape[:-1], value.shape[-1])
        ctx.save_for_backward(query, key, value, output)  # what a fused kernel keeps (plus a small logsumexp)
        return output

    @staticmethod
    def backward(ctx, grad):
        q, k, v = (torch.empty(shape, device="meta") for shape in ctx.shapes)
        _record_attention(ctx.work, q, k, v, backward=True)
        return None, torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _record_attention(work: StepWork, query, key, value, *, backward: bool) -> None:
    *batch, q_len, depth = query.shape
    heads = 1
    for size in batch:
        heads *= size
    k_len, v_depth = key.shape[-2], value.shape[-1]
    forward_flops = 2.0 * heads * q_len * k_len * (depth + v_depth)
    values = query.numel() + key.numel() + value.numel() + query.numel() // depth * v_depth
    shapes = (tuple(query.shape), tuple(key.shape), tuple(value.shape))
    like = tuple(torch.empty(shape, device="meta") for shape in shapes)
    replay = (attention_forward_backward if backward else attention_forward, like, {})
    # A fused backward recomputes the scores: about 2.5 times the forward's matmuls.
    work.add(
        ("attention backward" if backward else "attention", shapes),
        flops=forward_flops * (2.5 if backward else 1.0),
        moved=4.0 * values * (2 if backward else 1),
        replay=replay,
    )


def attention_forward(query, key, value):
    return torch.nn.functional.scaled_dot_product_attention(query, key, value)


def attention_forward_backward(query, key, value):
    """Forward and backward together; the forward's own time is subtracted where it is replayed."""
    query, key, value = (t.detach().requires_grad_() for t in (query, key, value))
    torch.nn.functional.scaled_dot_product_attention(query, key, value).sum().backward()


class _FusedAttention(TorchFunctionMode):
    def __init__(self, work: StepWork) -> None:
        super().__init__()
        self.work = work

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention and kwargs.get("attn_mask") is None:
            named = dict(zip(("query", "key", "value"), args, strict=False)) | kwargs
            return _AttentionOp.apply(self.work, named["query"], named["key"], named["value"])
        return func(*args, **kwargs)


class SavedActivations:
    """Bytes autograd keeps for the backward pass, and what gradient checkpointing would keep.

    Installed as the denoiser's checkpointing function when checkpointing is on: each block
    then runs its forward once more (the recomputation, so it is counted) and once for
    real, with the tensors it saves attributed to it. With checkpointing, what stays is
    everything saved outside the blocks, the blocks' inputs, and one block's own tensors
    at a time while the backward pass recomputes it.
    """

    def __init__(self, parameters) -> None:
        self.parameters = {p.untyped_storage()._cdata for p in parameters}
        self.saved: dict[int, int] = {}
        self.blocks: list[dict[int, int]] = []
        self.block_inputs: dict[int, int] = {}
        self._current: dict[int, int] | None = None

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in self.parameters:
            self.saved[storage._cdata] = storage.nbytes()
            if self._current is not None:
                self._current[storage._cdata] = storage.nbytes()
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def checkpoint(self, block, *args, **kwargs):
        with torch.no_grad():
            block(*args, **kwargs)
        for value in tree_leaves((args, kwargs)):
            if isinstance(value, torch.Tensor):
                self.block_inputs[value.untyped_storage()._cdata] = value.untyped_storage().nbytes()
        outer, self._current = self._current, {}
        try:
            return block(*args, **kwargs)
        finally:
            self.blocks.append(self._current)
            self._current = outer

    def kept_bytes(self, *, checkpointing: bool) -> int:
        if not checkpointing:
            return sum(self.saved.values())
        inside = {key for block in self.blocks for key in block}
        outside = sum(size for key, size in self.saved.items() if key not in inside)
        largest_block = max((sum(block.values()) for block in self.blocks), default=0)
        return outside + sum(self.block_inputs.values()) + largest_block


def _backward(loss: torch.Tensor) -> None:
    """``loss.backward()`` without passing through ``__torch_function__``: a mode's handler runs
    with the mode switched off, and the backward pass (with the forward that gradient
    checkpointing recomputes in it) must still see the fused attention."""
    from torch.autograd.graph import _engine_run_backward

    _engine_run_backward(
        (loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True, accumulate_grad=True
    )


class _OperationCounter(TorchDispatchMode):
    def __init__(self, work: StepWork) -> None:
        super().__init__()
        self.work = work

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if str(func) in _FREE:
            return out
        formula = flop_registry.get(func._overloadpacket)
        flops = float(formula(*args, **kwargs, out_val=out)) if formula is not None else 0.0
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        moved = 0.0 if func.is_view else 4.0 * sum(t.numel() for t in tensors)
        kind = (
            str(func),
            repr(tree_map(lambda x: tuple(x.shape) if isinstance(x, torch.Tensor) else x, (args, kwargs))),
        )
        self.work.add(kind, flops=flops, moved=moved, replay=(func, args, kwargs))
        return out


def _read_json(path: Path) -> dict:
    return read_config(path) or {}  # a regular file only: a FIFO there would block the estimate


def denoiser_blueprint(entry: ModelEntry, *, models_dir: Path) -> tuple[type, dict]:
    """The denoiser's class and its real configuration, read without loading weights."""
    return model_family(entry.family).denoiser_blueprint(entry, models_dir=models_dir)


def components_folder(entry: ModelEntry, models_dir: Path) -> Path:
    """The diffusers folder holding the VAE and tokenizer configs that go with ``entry``."""
    return model_family(entry.family).components_folder(entry, models_dir)


def latent_geometry(entry: ModelEntry, models_dir: Path) -> tuple[int, int]:
    """(VAE downscale factor, text tokens the denoiser attends to)."""
    folder = components_folder(entry, models_dir)
    vae_blocks = len(_read_json(folder / "vae" / "config.json").get("block_out_channels", [0, 0, 0, 0]))
    return 2 ** (vae_blocks - 1), model_family(entry.family).text_tokens(folder)


def denoiser_inputs(family: str, config, *, batch: int, latent_side: int, text_length: int, make) -> dict:
    """Inputs shaped as the training step feeds the denoiser; ``make(*shape)`` creates each tensor."""
    return model_family(family).meta_inputs(
        config, batch=batch, latent_side=latent_side, text_length=text_length, make=make
    )


def trainable_denoiser(
    model_class,
    config: dict,
    *,
    targets,
    rank: int,
    gradient_checkpointing: bool,
    network: str = "lora",
    factor: int = -1,
):
    """The denoiser as training holds it: frozen, its adapter (LoRA, DoRA, LoKr, LoHa) added, checkpointing as asked."""
    from families.adapter_configs import adapter_config

    model = model_class.from_config(config)
    model.requires_grad_(False)
    model.add_adapter(adapter_config(network, rank=rank, alpha=rank, targets=list(targets), factor=factor))
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


# Optimizer state traffic per LoRA value and step: parameter, gradient and two moments, read and written.
_OPTIMIZER_ACCESSES = 7


def count_step_work(
    entry: ModelEntry,
    *,
    models_dir: Path,
    targets: tuple[str, ...],
    rank: int,
    batch: int,
    side: int,
    gradient_checkpointing: bool,
    network: str = "lora",
    factor: int = -1,
) -> StepWork:
    """Every operation of one training micro-batch of the LoRA-wrapped denoiser, with its FLOPs and bytes."""
    model_class, config = denoiser_blueprint(entry, models_dir=models_dir)
    with torch.device("meta"):
        model = trainable_denoiser(
            model_class,
            config,
            targets=targets,
            rank=rank,
            gradient_checkpointing=False,
            network=network,
            factor=factor,
        )
    activations = SavedActivations(model.parameters())
    if gradient_checkpointing:
        model.enable_gradient_checkpointing(gradient_checkpointing_func=activations.checkpoint)
    downscale, text_length = latent_geometry(entry, models_dir)
    inputs = denoiser_inputs(
        entry.family,
        config,
        batch=batch,
        latent_side=side // downscale,
        text_length=text_length,
        make=lambda *shape: torch.empty(*shape, device="meta"),
    )
    work = StepWork()
    hooks = torch.autograd.graph.saved_tensors_hooks(activations.pack, activations.unpack)
    with _FusedAttention(work), _OperationCounter(work):
        with hooks:
            output = model(**inputs)[0]
        _backward(output.float().square().mean())
    work.activation_bytes = float(activations.kept_bytes(checkpointing=gradient_checkpointing))
    work.largest_activation = float(max(activations.saved.values(), default=0))
    lora_values = sum(p.numel() for p in model.parameters() if p.requires_grad)
    work.add(("optimizer step",), flops=0.0, moved=4.0 * _OPTIMIZER_ACCESSES * lora_values)
    return work
