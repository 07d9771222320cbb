"""Before training: how long one optimizer step will take, from counted work replayed on the device.

The denoiser is built on the ``meta`` device (no weights, no memory), LoRA is added as in
training, and one forward + backward at the bucket size runs under an operation counter,
with gradient checkpointing when asked (its recomputation is counted too). Attention is
recorded as one fused operation, as the real device runs it, not as the meta device's
decomposition. Then, on the real device and in the training dtype:

- every distinct heavy operation (matmuls, convolutions, attention and their backward)
  runs once on random inputs of its exact shapes and is timed, biggest first, within a
  time budget;
- the light ones (element-wise, norms) are charged their bytes at the measured memory
  bandwidth, plus the measured cost of one dispatched call.

On the CPU the two add up; on a GPU, launching runs ahead of the kernels, so the slower
of the host and device sides sets the pace.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from core.model_files import FLUX, ModelEntry

_FREE = {"aten.empty.memory_format", "aten.new_empty.default", "aten.empty_strided.default", "aten.detach.default"}


@dataclass(frozen=True)
class DeviceSpeed:
    device: str
    dtype: torch.dtype
    flops_per_s: float  # dense matmul throughput
    bytes_per_s: float  # memory bandwidth (a large copy)
    seconds_per_call: float  # one dispatched op, Python and autograd included


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
    replay = (_attention_backward if backward else _attention_forward, like, {})
    # A fused backward recomputes the scores: about 2.5 times the forward's matmuls.
    work.add(
        ("attention backward" if backward else "attention", shapes),
        flops=forward_flops * (2.5 if backward else 1.0),
        moved=4.0 * values * (2 if backward else 1),
        replay=replay,
    )


def _attention_forward(query, key, value):
    return torch.nn.functional.scaled_dot_product_attention(query, key, value)


def _attention_backward(query, key, value):
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


class _SavedActivations:
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
    with torch.no_grad() if function is not _attention_backward else torch.enable_grad():
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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def denoiser_blueprint(entry: ModelEntry, *, models_dir: Path) -> tuple[type, dict]:
    """The denoiser's class and its real configuration, read without loading weights."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    if entry.family == FLUX:
        if entry.single_file:
            from core.flux_single_file import checkpoint_shapes, rope_axes_of, transformer_config_from_shapes
            from core.pipelines import flux_components_folder

            config = transformer_config_from_shapes(checkpoint_shapes(entry.path))
            axes = rope_axes_of(flux_components_folder(entry.path, models_dir))
            config["axes_dims_rope"] = list(axes) if axes else [16, 56, 56]
            return FluxTransformer2DModel, config
        return FluxTransformer2DModel, dict(FluxTransformer2DModel.load_config(entry.path / "transformer"))
    if entry.single_file:
        from core.pipelines import single_file_config_folder

        folder = single_file_config_folder(entry.path, models_dir)
    else:
        folder = entry.path
    return UNet2DConditionModel, dict(UNet2DConditionModel.load_config(folder / "unet"))


def narrow_config(family: str, config: dict) -> dict:
    """The same architecture, every block and layer kept, at the smallest widths it accepts.

    Running it costs almost no arithmetic, so its time is what the host spends driving the
    real model's operations (Python, autograd, dispatch, kernel launches).
    """
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if family == FLUX:
        config.update(
            num_attention_heads=1,
            attention_head_dim=16,
            axes_dims_rope=[4, 4, 8],
            joint_attention_dim=16,
            pooled_projection_dim=16,
        )
        return config
    blocks = len(config["block_out_channels"])
    config.update(
        block_out_channels=[32] * blocks,
        norm_num_groups=32,
        attention_head_dim=1,
        num_attention_heads=None,
        cross_attention_dim=16,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
    )
    return config


def components_folder(entry: ModelEntry, models_dir: Path) -> Path:
    """The diffusers folder holding the VAE and tokenizer configs that go with ``entry``."""
    if not entry.single_file:
        return entry.path
    if entry.family == FLUX:
        from core.pipelines import flux_components_folder

        return flux_components_folder(entry.path, models_dir)
    from core.pipelines import single_file_config_folder

    return single_file_config_folder(entry.path, models_dir)


def latent_geometry(entry: ModelEntry, models_dir: Path) -> tuple[int, int]:
    """(VAE downscale factor, text tokens the denoiser attends to)."""
    folder = components_folder(entry, models_dir)
    vae_blocks = len(_read_json(folder / "vae" / "config.json").get("block_out_channels", [0, 0, 0, 0]))
    if entry.family != FLUX:
        return 2 ** (vae_blocks - 1), 77
    limit = _read_json(folder / "tokenizer_2" / "tokenizer_config.json").get("model_max_length", 512)
    return 2 ** (vae_blocks - 1), min(512, int(limit))


def denoiser_inputs(family: str, config, *, batch: int, latent_side: int, text_length: int, make) -> dict:
    """Inputs shaped as the training step feeds the denoiser; ``make(*shape)`` creates each tensor."""
    if family == FLUX:
        tokens = (latent_side // 2) ** 2
        return {
            "hidden_states": make(batch, tokens, config["in_channels"]),
            "timestep": make(batch),
            "pooled_projections": make(batch, config["pooled_projection_dim"]),
            "encoder_hidden_states": make(batch, text_length, config["joint_attention_dim"]),
            "txt_ids": make(text_length, 3),
            "img_ids": make(tokens, 3),
            "guidance": make(batch) if config.get("guidance_embeds") else None,
            "return_dict": False,
        }
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    return {
        "sample": make(batch, config.get("in_channels", 4), latent_side, latent_side),
        "timestep": make(batch),
        "encoder_hidden_states": make(batch, 77, config["cross_attention_dim"]),
        "added_cond_kwargs": {"text_embeds": make(batch, pooled), "time_ids": make(batch, 6)},
        "return_dict": False,
    }


def _trainable(model_class, config: dict, *, targets, rank: int, gradient_checkpointing: bool):
    """The denoiser as training holds it: frozen, LoRA added, checkpointing as asked."""
    from peft import LoraConfig

    model = model_class.from_config(config)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)))
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
) -> StepWork:
    """Every operation of one training micro-batch of the LoRA-wrapped denoiser, with its FLOPs and bytes."""
    model_class, config = denoiser_blueprint(entry, models_dir=models_dir)
    with torch.device("meta"):
        model = _trainable(model_class, config, targets=targets, rank=rank, gradient_checkpointing=False)
    activations = _SavedActivations(model.parameters())
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


def measure_host_seconds(
    entry: ModelEntry,
    *,
    models_dir: Path,
    targets: tuple[str, ...],
    rank: int,
    gradient_checkpointing: bool,
    optimizer: str,
    speed: DeviceSpeed,
) -> float:
    """Seconds the host spends on one training step of this architecture: its narrow copy, timed
    through forward, backward, clipping and the optimizer, as the training loop runs them."""
    from modules.lora_training.optim import build_optimizer

    model_class, config = denoiser_blueprint(entry, models_dir=models_dir)
    narrow = narrow_config(entry.family, config)
    with torch.device(speed.device):
        model = _trainable(
            model_class, narrow, targets=targets, rank=rank, gradient_checkpointing=gradient_checkpointing
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
