"""Before training: peak memory and seconds per step for the chosen settings.

Weights, LoRA parameters, gradients and optimizer states are counted exactly from the
safetensors headers (nothing is loaded). Activations are the tensors autograd keeps for
the backward pass, counted in one forward + backward on the meta device
(:func:`count_work_for_config` and ``step_work``, also the basis of the time estimate);
the quick estimate logged when a run starts scales a per-family figure at 1024² instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.model_files import ModelEntry

GIB = 2**30
CUDA_OVERHEAD_GIB = 0.8
OPTIMIZER_BYTES_PER_PARAM = {
    "adamw": 8,
    "adamw8bit": 2,
    "paged_adamw8bit": 2,
    "lion": 4,
    "lion8bit": 1,
    "prodigy": 16,
}


@dataclass(frozen=True)
class MemoryEstimate:
    total_bytes: int
    parts: dict[str, int]
    device: str
    device_bytes: int | None
    activations_counted: bool = False

    @property
    def fits(self) -> bool | None:
        return None if self.device_bytes is None else self.total_bytes <= self.device_bytes

    def describe(self) -> str:
        parts = ", ".join(f"{name} {size / GIB:.2f}" for name, size in self.parts.items())
        how = "counted" if self.activations_counted else "approximated, Estimate counts them"
        line = f"Estimated peak memory: {self.total_bytes / GIB:.1f} GiB ({parts} GiB; activations {how}) on {self.device}."
        if self.fits is False:
            line += (
                f" This will not fit in {self.device_bytes / GIB:.1f} GiB: turn on gradient checkpointing, "
                "an 8-bit optimizer and caching, or lower the batch size, resolution or rank."
            )
        return line


def weight_bytes_of(shapes: dict[str, tuple[int, ...]], *, weight_bytes: int, quantization: str, blocks: str) -> int:
    """Bytes of the frozen weights, the quantized block layers (inside ``blocks``) counted at their packed size."""
    from modules.lora_training.quantize import is_quantized_weight, quantized_bytes

    total = 0
    for key, shape in shapes.items():
        if quantization != "none" and len(shape) == 2 and is_quantized_weight(key, blocks=blocks):
            total += quantized_bytes(shape, quantization)
        else:
            total += _numel(shape) * weight_bytes
    return total


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def lora_parameter_count(shapes: dict[str, tuple[int, ...]], targets: tuple[str, ...], rank: int) -> int:
    total = 0
    for key, shape in shapes.items():
        if len(shape) == 2 and any(key.endswith(f".{t}.weight") for t in targets):
            total += rank * (shape[0] + shape[1])
    return total


def estimate_memory(
    *,
    entry: ModelEntry,
    rank: int,
    targets: tuple[str, ...],
    optimizer: str,
    resolution: int,
    batch_size: int,
    gradient_checkpointing: bool,
    weight_bytes: int,
    device: str,
    device_bytes: int | None,
    quantization: str = "none",
    activation_bytes: int | None = None,
    sample_bytes: int = 0,
) -> MemoryEstimate:
    """Peak memory of training; ``sample_bytes`` is what rendering a sample needs beside the weights,
    LoRA and optimizer state (the VAE and its decode), counted where it exceeds the training activations."""
    from families import family as model_family

    kind = model_family(entry.family)
    shapes = kind.denoiser_shapes(entry)
    weights = weight_bytes_of(
        shapes, weight_bytes=weight_bytes, quantization=quantization, blocks=kind.quantized_blocks
    )
    lora = lora_parameter_count(shapes, targets, rank)
    counted = activation_bytes is not None
    if activation_bytes is None:
        with_gc, without_gc = kind.activation_gib
        per_image = (with_gc if gradient_checkpointing else without_gc) * GIB * (resolution / 1024) ** 2
        activation_bytes = int(per_image * batch_size)
    parts = {
        "weights": weights,
        "LoRA + gradients": lora * 8,
        "optimizer": lora * OPTIMIZER_BYTES_PER_PARAM[optimizer],
        "activations": activation_bytes,
    }
    if sample_bytes > activation_bytes:
        parts["sample images (VAE decode)"] = sample_bytes - activation_bytes
    if device == "cuda":
        parts["CUDA context"] = int(CUDA_OVERHEAD_GIB * GIB)
    return MemoryEstimate(
        total_bytes=sum(parts.values()),
        parts=parts,
        device=device,
        device_bytes=device_bytes,
        activations_counted=counted,
    )


def detected_device() -> tuple[str, int | None]:
    """("cuda" and the GPU's memory) or ("cpu" and the machine's RAM)."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.cuda.get_device_properties(0).total_memory
    try:
        pages = __import__("os").sysconf("SC_PHYS_PAGES") * __import__("os").sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        pages = None
    return "cpu", pages


@dataclass(frozen=True)
class _ConfigPlan:
    """What an estimate needs to know about a config: the model, its LoRA layers, device and dtype."""

    entry: ModelEntry
    targets: tuple[str, ...]
    device: str
    device_bytes: int | None
    weight_dtype: object
    compute_dtype: object


def _plan(config, *, models_dir: Path) -> _ConfigPlan:
    from core.model_files import model_entry
    from core.model_manager import pick_device
    from families import family as model_family
    from modules.lora_training.train import choose_precision

    entry = model_entry(models_dir, config.base_model)
    family = model_family(entry.family)
    targets = family.target_modules(config.lora_targets)
    device, device_bytes = detected_device()
    device = pick_device(config.device) if config.device != "auto" else device
    precision = choose_precision(config.mixed_precision, device, family=entry.family)
    return _ConfigPlan(
        entry=entry,
        targets=targets,
        device=device,
        device_bytes=device_bytes,
        weight_dtype=precision.weight_dtype,
        compute_dtype=precision.autocast_dtype or precision.weight_dtype,
    )


def count_work_for_config(config, *, models_dir: Path, resolution: int):
    """The training work of one micro-batch of ``config``, counted on the meta device (a few seconds
    for a full-size U-Net); shared by the memory and the time estimate."""
    from modules.lora_training.step_work import count_step_work

    plan = _plan(config, models_dir=models_dir)
    return count_step_work(
        plan.entry,
        models_dir=models_dir,
        targets=plan.targets,
        rank=config.rank,
        batch=config.batch_size,
        side=resolution,
        gradient_checkpointing=config.gradient_checkpointing,
    )


def estimate_for_config(config, *, models_dir: Path, resolution: int, work=None) -> MemoryEstimate:
    """Peak memory of training ``config``. With ``work`` (from :func:`count_work_for_config`) the
    activations are the tensors autograd keeps, counted; without, a per-family figure scaled by size."""
    plan = _plan(config, models_dir=models_dir)
    activation_bytes = None
    if work is not None:
        scale = plan.compute_dtype.itemsize / 4  # counted at 4 bytes per value
        # The backward pass briefly holds gradients beside the kept tensors: about two of the largest.
        activation_bytes = int((work.activation_bytes + 2 * work.largest_activation) * scale)
    sample_bytes = 0
    if config.sample_every_steps != 0:  # None: every 10% of the run
        from modules.lora_training.sample_memory import vae_decode_bytes
        from modules.lora_training.step_work import components_folder

        vae_weights, decode = vae_decode_bytes(
            components_folder(plan.entry, models_dir), width=resolution, height=resolution
        )
        sample_bytes = vae_weights + decode
    return estimate_memory(
        entry=plan.entry,
        rank=config.rank,
        targets=plan.targets,
        optimizer=config.optimizer,
        resolution=resolution,
        batch_size=config.batch_size,
        gradient_checkpointing=config.gradient_checkpointing,
        weight_bytes=plan.weight_dtype.itemsize,
        quantization=config.base_quantization,
        device=plan.device,
        device_bytes=plan.device_bytes,
        activation_bytes=activation_bytes,
        sample_bytes=sample_bytes,
    )


def estimate_step_time_for_config(config, *, models_dir: Path, resolution: int, work=None):
    """Seconds per optimizer step for ``config`` at ``resolution``, on the device training would use."""
    from modules.lora_training.step_time import estimate_step_seconds, measure_device, measure_host_seconds

    plan = _plan(config, models_dir=models_dir)
    if work is None:
        work = count_work_for_config(config, models_dir=models_dir, resolution=resolution)
    speed = measure_device(plan.device, plan.compute_dtype)
    host = measure_host_seconds(
        plan.entry,
        models_dir=models_dir,
        targets=plan.targets,
        rank=config.rank,
        gradient_checkpointing=config.gradient_checkpointing,
        optimizer=config.optimizer,
        speed=speed,
    )
    return estimate_step_seconds(work, speed, host_seconds=host, micro_batches=config.gradient_accumulation)
