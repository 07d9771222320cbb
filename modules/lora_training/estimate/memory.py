"""Peak memory of training, from the safetensors headers and the counted activations.

Weights, LoRA parameters, gradients and optimizer states are counted exactly from the
safetensors headers (nothing is loaded). Activations are the tensors autograd keeps for
the backward pass, counted in one forward + backward on the meta device (:mod:`.work`);
without that count a per-family figure at 1024² is scaled instead (marked "approximated").
"""

from __future__ import annotations

from dataclasses import dataclass

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


def adapter_values(out_features: int, in_features: int, *, rank: int, network: str, factor: int) -> int:
    """Trainable values peft adds to one linear layer: LoRA rank·(in + out), DoRA one magnitude per output
    row more, LoHa two such pairs; LoKr a full w1 (out_l, in_m) and w2 (out_k, in_n), w2 as two rank-r factors
    when the rank is under half its larger side (peft's ``factorization`` splits each side)."""
    if network == "lokr":
        from peft.tuners.lokr.layer import factorization

        out_l, out_k = factorization(out_features, factor)
        in_m, in_n = factorization(in_features, factor)
        w2 = rank * (out_k + in_n) if rank < max(out_k, in_n) / 2 else out_k * in_n
        return out_l * in_m + w2
    pairs = rank * (in_features + out_features)
    return {"loha": 2 * pairs, "dora": pairs + out_features}.get(network, pairs)


def lora_parameter_count(
    shapes: dict[str, tuple[int, ...]], targets: tuple[str, ...], rank: int, *, network: str = "lora", factor: int = -1
) -> int:
    """Adapter parameters on the targeted layers (:func:`adapter_values`); a convolution (out, in, kh, kw)
    counts as a linear layer of in·kh·kw inputs."""
    total = 0
    for key, shape in shapes.items():
        if len(shape) in (2, 4) and any(key.endswith(f".{t}.weight") for t in targets):
            out_features, in_features = shape[0], _numel(shape[1:])
            total += adapter_values(out_features, in_features, rank=rank, network=network, factor=factor)
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
    ema: bool = False,
    network: str = "lora",
    factor: int = -1,
    resident: dict[str, int] | None = None,
    text_adapter_values: int = 0,
) -> MemoryEstimate:
    """Peak memory of training. ``sample_bytes`` (the VAE and its decode) and ``resident["VAE encode"]`` count
    where they exceed the training activations; the other ``resident`` parts are frozen weights kept on the
    device beside the denoiser; ``text_adapter_values``: the text encoders' adapter."""
    from families import family as model_family

    kind = model_family(entry.family)
    shapes = kind.denoiser_shapes(entry)
    weights = weight_bytes_of(
        shapes, weight_bytes=weight_bytes, quantization=quantization, blocks=kind.quantized_blocks
    )
    lora = lora_parameter_count(shapes, targets, rank, network=network, factor=factor) + text_adapter_values
    resident = dict(resident or {})
    encode = resident.pop("VAE encode", 0)
    counted = activation_bytes is not None
    if activation_bytes is None:
        with_gc, without_gc = kind.activation_gib
        per_image = (with_gc if gradient_checkpointing else without_gc) * GIB * (resolution / 1024) ** 2
        activation_bytes = int(per_image * batch_size)
    parts = {
        "weights": weights,
        **resident,
        "LoRA + gradients": lora * 8,
        "optimizer": lora * OPTIMIZER_BYTES_PER_PARAM[optimizer],
        "activations": activation_bytes,
    }
    if ema:  # the moving average: one fp32 copy of the adapter (its update costs no more than a copy per step)
        parts["EMA copy"] = lora * 4
    if max(sample_bytes, encode) > activation_bytes:
        label = "sample images (VAE decode)" if sample_bytes >= encode else "VAE encode"
        parts[label] = max(sample_bytes, encode) - activation_bytes
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
