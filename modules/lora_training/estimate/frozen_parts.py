"""What stays on the training device beside the denoiser, counted from the component configs on the meta
device: the text encoders when their outputs are not cached (or they get a LoRA), the VAE when the latents
are not cached (then every micro-batch is encoded on the device first)."""

from __future__ import annotations

from pathlib import Path

import torch


def text_encoder_on_meta(folder: Path) -> torch.nn.Module:
    """The transformers text encoder saved in ``folder`` (its config.json), built on the meta device."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    model_class = getattr(transformers, (config.architectures or [""])[0], None)
    if model_class is None:
        raise ValueError(f"{folder / 'config.json'} names no transformers model class")
    with torch.device("meta"):
        return model_class(config)


def text_encoder_parts(
    components: Path,
    *,
    encoders: tuple[str, ...],
    with_lora: tuple[str, ...],
    targets: tuple[str, ...],
    weight_bytes: int,
    adapter_values,
) -> tuple[int, int]:
    """(bytes of the ``encoders``' frozen weights, adapter values on the ``targets`` Linear layers of the
    encoders in ``with_lora``, by ``adapter_values(out_features, in_features)``)."""
    weights = adapters = 0
    for name in encoders:
        model = text_encoder_on_meta(Path(components) / name)
        weights += sum(p.numel() for p in model.parameters()) * weight_bytes
        if name not in with_lora:
            continue
        for module_name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and module_name.rsplit(".", 1)[-1] in targets:
                adapters += adapter_values(module.out_features, module.in_features)
    return weights, adapters


def vae_encode_bytes(components: Path, *, side: int, batch: int) -> tuple[int, int]:
    """(fp32 weight bytes of the VAE, peak bytes alive while it encodes ``batch`` images of ``side``²)."""
    from diffusers import AutoencoderKL

    from modules.lora_training.estimate.vae_decode import FusedAttentionOutput, LiveBytes

    config = AutoencoderKL.load_config(Path(components) / "vae")
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config).float()
    weights = sum(p.numel() for p in vae.parameters()) * 4
    images = torch.empty(batch, config.get("in_channels", 3), side, side, device="meta")
    counter = LiveBytes()
    with torch.no_grad(), FusedAttentionOutput(), counter:
        vae.encode(images)
    return weights, counter.peak + counter.largest  # one more of the largest: the convolutions' workspace
