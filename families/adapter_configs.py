"""peft configs of the adapter types a run can train: LoRA, DoRA, LoKr and LoHa (peft's own implementations).

The settings keep the names kohya/LyCORIS users know: ``rank`` (LyCORIS' network_dim), ``alpha``
(network_alpha) and, for LoKr, ``factor``. Each adapter starts as no change to the model: LoRA/DoRA
with gaussian downs and zero ups, LoKr with a zero ``w1`` and LoHa with a zero ``w2_b`` (peft's defaults).
"""

from __future__ import annotations

# The parameter names each adapter type adds to a layer (peft's), to find the trainable ones.
ADAPTER_PARAMETER_PREFIXES = ("lora_", "lokr_", "hada_")
LYCORIS_NETWORKS = ("lokr", "loha")


def adapter_config(
    network: str, *, rank: int, alpha: float, targets: list[str], exclude: str | None = None, factor: int = -1
):
    """The peft config of ``network`` ("lora", "dora", "lokr" or "loha") on ``targets``."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    common = {"target_modules": list(targets), "exclude_modules": exclude}
    if network == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, decompose_factor=factor, **common)
    if network == "loha":
        return LoHaConfig(r=rank, alpha=alpha, **common)
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", use_dora=network == "dora", **common)


def is_adapter_parameter(name: str) -> bool:
    """True for a parameter an adapter added (``...to_q.lokr_w1.default``), not a base weight."""
    return any(f".{prefix}" in f".{name}" for prefix in ADAPTER_PARAMETER_PREFIXES)
