"""The frozen base model in 8-bit or 4-bit (bitsandbytes), to fit large models on smaller cards.

Only the linear layers inside the blocks a family names (``family.quantized_blocks``) are
quantized (nearly all of a large transformer's weights, a U-Net's attention); embeddings,
norms and output layers keep their precision. LoRA wraps the quantized layers and stays in fp32. The weights are quantized
when the model moves to its device, one layer at a time.
"""

from __future__ import annotations

import torch

from modules.lora_training.config import QUANTIZATIONS

_NF4_BLOCK = 64  # weights per absmax; the absmax values are themselves 8-bit in blocks of 256


def quantized_bytes(shape: tuple[int, int], mode: str) -> int:
    """Bytes bitsandbytes stores for a (rows, columns) weight, scales included."""
    rows, columns = shape
    count = rows * columns
    if mode == "int8":
        return count + 4 * rows  # one fp32 scale per row
    absmax = -(-count // _NF4_BLOCK)
    return count // 2 + absmax + 4 * -(-absmax // 256)


def is_quantized_weight(name: str, *, blocks: str) -> bool:
    """Whether the 2-D weight ``name`` (diffusers naming) lives in a quantized layer, inside ``blocks``."""
    return blocks in name and name.endswith(".weight")


def _quantized_linear(layer: torch.nn.Linear, *, mode: str, compute_dtype: torch.dtype) -> torch.nn.Module:
    import bitsandbytes as bnb

    has_bias = layer.bias is not None
    with torch.device("meta"):
        if mode == "nf4":
            quantized = bnb.nn.Linear4bit(
                layer.in_features, layer.out_features, bias=has_bias, compute_dtype=compute_dtype, quant_type="nf4"
            )
        else:
            quantized = bnb.nn.Linear8bitLt(
                layer.in_features, layer.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0
            )
    if mode == "nf4":
        quantized.weight = bnb.nn.Params4bit(layer.weight.data, requires_grad=False, quant_type="nf4")
    else:
        quantized.weight = bnb.nn.Int8Params(layer.weight.data, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        quantized.bias = torch.nn.Parameter(layer.bias.data, requires_grad=False)
    return quantized


def quantize_block_linears(
    model: torch.nn.Module, *, mode: str, compute_dtype: torch.dtype, blocks: str
) -> tuple[int, float]:
    """Swap the block linear layers of ``model`` for bitsandbytes layers.

    Returns how many layers and which share of the model's weights; the weights are
    quantized by the next ``model.to(device)``.
    """
    if mode not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {mode!r}")
    if mode == "none":
        return 0, 0.0
    total = sum(p.numel() for p in model.parameters())
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and is_quantized_weight(f"{name}.weight", blocks=blocks)
    ]
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quantized_linear(layer, mode=mode, compute_dtype=compute_dtype))
    share = sum(layer.weight.numel() for _, layer in targets) / total if total else 0.0
    return len(targets), share
