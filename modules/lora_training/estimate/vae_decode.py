"""Memory a sample image adds during training: the fp32 VAE decoding at the sample size.

The decode runs once on the ``meta`` device with the VAE's real configuration, under a
counter of the bytes of tensors alive at once (a no-grad pass frees each intermediate as
soon as nothing holds it). Attention counts as a fused kernel does it, without the score
matrix; one more copy of the largest tensor stands for the convolutions' working memory. The denoiser's own inference activations during sampling are far smaller than the
training activations, which are freed by then, so they are not added.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors created inside it and alive at the same time (views and in-place
    results share their input's memory and are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.largest = 0

    def _free(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or id(tensor) in inputs or tensor._is_view():
                continue
            size = tensor.numel() * tensor.element_size()
            self.live += size
            self.peak = max(self.peak, self.live)
            self.largest = max(self.largest, size)
            weakref.finalize(tensor, self._free, size)
        return out


class FusedAttentionOutput(TorchFunctionMode):
    """scaled_dot_product_attention as a fused kernel runs it: only its output is allocated."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            named = dict(zip(("query", "key", "value"), args, strict=False)) | kwargs
            query, value = named["query"], named["value"]
            return query.new_empty(*query.shape[:-1], value.shape[-1])
        return func(*args, **kwargs)


def vae_decode_bytes(components: Path, *, width: int, height: int) -> tuple[int, int]:
    """(fp32 weight bytes of the VAE in ``components``/vae, peak bytes alive while it decodes one image).

    Samples larger than ``SAMPLE_TILE`` decode tile by tile: one tile's decode plus the whole image
    (the tiles, and the blended result)."""
    from diffusers import AutoencoderKL

    from families.training import SAMPLE_TILE

    whole_image = 2 * 3 * width * height * 4
    width, height = min(width, SAMPLE_TILE), min(height, SAMPLE_TILE)

    config = AutoencoderKL.load_config(Path(components) / "vae")
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config).float()
    weights = sum(p.numel() for p in vae.parameters()) * 4
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    latents = torch.empty(1, config["latent_channels"], height // factor, width // factor, device="meta")
    counter = LiveBytes()
    with torch.no_grad(), FusedAttentionOutput(), counter:
        vae.decode(latents)
    # Devices add a working copy of a convolution's input (layout reorders, workspaces): about one
    # more of the largest tensor, as measured on the CPU against a full-size 1024² VAE.
    return weights, counter.peak + counter.largest + whole_image
