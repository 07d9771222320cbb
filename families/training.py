"""The training hooks every model family shares: loading, freezing, LoRA adapters, caches, saving.

A family subclass supplies the parts that differ: how text and images are encoded, how
noise is added and what the model must predict, and which pipeline renders samples.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from families.adapter_configs import is_adapter_parameter
from families.base import ModelFamily

if TYPE_CHECKING:
    from core.model_files import ModelEntry
    from modules.lora_training.data import SampleRandom, TrainItem

SAMPLE_TILE = 512  # pixels: larger samples are decoded in overlapping tiles of this size


class TrainingFamily(ModelFamily):
    attention_targets: tuple[str, ...] = ()
    feedforward_targets: tuple[str, ...] = ()
    default_targets = "attention"  # what lora_targets "auto" means
    excluded_modules: str | None = None  # modules a target name also matches but must not get LoRA (full match)
    text_encoder_targets = ("q_proj", "k_proj", "v_proj", "out_proj")
    adapted_text_encoders: tuple[str, ...] | None = None  # the text encoders train_text_encoder adapts; None: all
    # Options of TrainConfig this family has no use for: named in the run log when set.
    unused_options: tuple[str, ...] = ()

    def __init__(
        self,
        entry: ModelEntry,
        *,
        models_dir: Path,
        device: str,
        weight_dtype: torch.dtype,
        base_quantization: str = "none",
    ) -> None:
        from families import load_pipeline
        from modules.lora_training.quantize import quantize_block_linears

        self.entry = entry
        self.device = torch.device(device)
        self.weight_dtype = weight_dtype
        self.pipe = load_pipeline(entry, models_dir=models_dir, dtype=weight_dtype)
        self.lora_config = None
        self.text_lora_config = None
        for module in self.all_modules():
            module.requires_grad_(False)
            module.eval()
        # VAEs overflow in fp16: encode and decode in fp32.
        self.pipe.vae.to(dtype=torch.float32)
        self.quantized_layers, self.quantized_share = quantize_block_linears(
            self.denoiser, mode=base_quantization, compute_dtype=weight_dtype, blocks=self.quantized_blocks
        )

    def place_denoiser(self) -> None:
        """Move the denoiser to the training device, quantizing its block layers on the way when asked.

        The trainer does this once the caches are filled, so that the VAE encodes in fp32
        without the denoiser's weights beside it on the GPU.
        """
        self.denoiser.to(self.device)

    # ----- components -----------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_attr)

    @property
    def vae(self):
        return self.pipe.vae

    def text_encoders(self) -> list[torch.nn.Module]:
        return [getattr(self.pipe, attr) for attr in self.text_encoder_attrs]

    def all_modules(self) -> list[torch.nn.Module]:
        return [self.denoiser, self.vae, *self.text_encoders()]

    def model_key(self) -> str:
        """Identifies the base model in cache file names."""
        stat = self.entry.path.stat()
        return hashlib.sha1(f"{self.entry.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]

    def text_cache_key(self) -> str:
        """Identifies the text encoding in cache file names."""
        return self.model_key()

    def place_encoders(self, device: str | torch.device) -> None:
        """Move the VAE and text encoders (e.g. off the GPU once their outputs are cached)."""
        self.vae.to(device)
        for encoder in self.text_encoders():
            encoder.to(device)

    def configure(self, config) -> list[str]:
        """Apply the run's family-specific options; returns ``name=value`` for set options this family ignores."""
        import dataclasses

        defaults = {f.name: f.default for f in dataclasses.fields(config)}
        return [
            f"{name}={getattr(config, name)!r}"
            for name in self.unused_options
            if getattr(config, name) != defaults[name]
        ]

    # ----- LoRA -----------------------------------------------------------------
    @classmethod
    def resolve_targets(cls, lora_targets: str) -> str:
        return cls.default_targets if lora_targets == "auto" else lora_targets

    @classmethod
    def target_modules(cls, lora_targets: str) -> tuple[str, ...]:
        if cls.resolve_targets(lora_targets) == "attention+feedforward":
            return cls.attention_targets + cls.feedforward_targets
        return cls.attention_targets

    @classmethod
    def denoiser_lora_config(
        cls, *, rank: int, alpha: float, lora_targets: str, network: str = "lora", factor: int = -1
    ):
        """peft's config for the denoiser: ``LoraConfig`` (``use_dora`` for DoRA), ``LoKrConfig`` or ``LoHaConfig``."""
        from families.adapter_configs import adapter_config

        targets = cls.target_modules(lora_targets)
        exclude = cls.excluded_modules if cls.excluded_modules in targets else None
        return adapter_config(network, rank=rank, alpha=alpha, targets=list(targets), exclude=exclude, factor=factor)

    def add_lora(
        self,
        *,
        rank: int,
        alpha: float,
        targets: str,
        train_text_encoder: bool,
        network: str = "lora",
        factor: int = -1,
    ) -> None:
        """peft adapters on the denoiser (and the text encoders); ``network`` is lora, dora, lokr or loha."""
        from families.adapter_configs import adapter_config

        self.lora_config = self.denoiser_lora_config(
            rank=rank, alpha=alpha, lora_targets=targets, network=network, factor=factor
        )
        self.denoiser.add_adapter(self.lora_config)
        if train_text_encoder:
            self.text_lora_config = adapter_config(
                network, rank=rank, alpha=alpha, targets=list(self.text_encoder_targets), factor=factor
            )
            for encoder in self.text_encoders_with_lora():
                encoder.add_adapter(self.text_lora_config)
        # Trainable parameters stay fp32 even when the frozen weights are fp16/bf16.
        for param in self.lora_parameters():
            param.data = param.data.float()

    def text_encoders_with_lora(self) -> list[torch.nn.Module]:
        """Text encoders that get LoRA when ``train_text_encoder`` is on."""
        return [getattr(self.pipe, attr) for attr in self.text_encoder_attrs_with_lora()]

    @classmethod
    def text_encoder_attrs_with_lora(cls) -> tuple[str, ...]:
        return cls.adapted_text_encoders or cls.text_encoder_attrs

    def lora_modules(self) -> dict[str, torch.nn.Module]:
        modules = {"denoiser": self.denoiser}
        if self.text_lora_config is not None:
            for index, encoder in enumerate(self.text_encoders_with_lora()):
                modules[f"text_encoder_{index}"] = encoder
        return modules

    def lora_parameters(self, part: str | None = None) -> list[torch.nn.Parameter]:
        params = []
        for name, module in self.lora_modules().items():
            if part is None or (part == "denoiser") == (name == "denoiser"):
                params += [p for n, p in module.named_parameters() if is_adapter_parameter(n)]
        return params

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        state = {}
        for name, module in self.lora_modules().items():
            for key, value in get_peft_model_state_dict(module).items():
                state[f"{name}/{key}"] = value.detach().float().cpu().contiguous()
        return state

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        for name, module in self.lora_modules().items():
            prefix = f"{name}/"
            part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            result = set_peft_model_state_dict(module, part)
            if getattr(result, "unexpected_keys", None):
                raise RuntimeError(f"checkpoint does not match the LoRA layout of {name}: {result.unexpected_keys[:3]}")

    def save_lora(self, path: Path, *, metadata: dict[str, str]) -> None:
        """The main LoRA file (:mod:`modules.lora_training.main_file`: names diffusers, ComfyUI and Forge
        all apply, diffusers' adapter metadata with ``lora_alpha``) + our header ``metadata``, atomically."""
        from peft.utils import get_peft_model_state_dict

        from modules.lora_training.main_file import write_main_lora

        layers = {self.denoiser_attr: get_peft_model_state_dict(self.denoiser)}
        configs = {self.denoiser_attr: self.lora_config.to_dict()}
        if self.text_lora_config is not None:
            for component in self.text_encoder_attrs:
                encoder = getattr(self.pipe, component)
                if encoder not in self.text_encoders_with_lora():
                    continue
                layers[component] = get_peft_model_state_dict(encoder)
                configs[component] = self.text_lora_config.to_dict()
        write_main_lora(Path(path), layers, configs, metadata=metadata, keys=self.main_file_keys)

    # ----- caching ----------------------------------------------------------------
    @torch.no_grad()
    def encode_image_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE posterior parameters (mean and log-variance) for images in [-1, 1], computed in fp32."""
        pixels = pixels.to(self.vae.device, torch.float32)
        return self.vae.encode(pixels).latent_dist.parameters.float()

    def latents_from_moments(self, moments: torch.Tensor, generator: SampleRandom) -> torch.Tensor:
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        noise = generator.randn(mean.shape, dtype=mean.dtype).to(mean.device)
        return self.scale_latents(mean + std * noise)

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def training_loss(
        self,
        *,
        latents: torch.Tensor,
        text: dict[str, torch.Tensor],
        items: list[TrainItem],
        generator: SampleRandom | None,
        config,
        fixed_t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample loss for one micro-batch, drawing each sample's noise and timestep from ``generator``.
        ``fixed_t`` (fractions of the schedule) and ``noise`` replace the random draws, for evaluation
        at fixed points. ``loss_weights`` (B, 1, H, W) at latent resolution weight each latent pixel's error
        (masked loss, :func:`weighted_mse`)."""
        raise NotImplementedError

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`scale_latents`: what the VAE decodes."""
        raise NotImplementedError

    # ----- samples ----------------------------------------------------------------
    def sample_pipeline(self):
        """A pipeline sharing the trained modules, for sample images."""
        return self.pipe

    def sample_kwargs(self) -> dict:
        """Pipeline arguments for sample images beyond size, steps, seed and the prompt's embeddings."""
        return {}

    def sample_text_kwargs(self, text: dict[str, torch.Tensor]) -> dict:
        """Pipeline arguments carrying a prompt's embeddings (from :meth:`encode_text`, batch of one)."""
        raise NotImplementedError

    def latents_to_image_grid(self, latents: torch.Tensor, *, width: int, height: int) -> torch.Tensor:
        """The pipeline's ``output_type="latent"`` result as (B, C, H, W) latents."""
        return latents

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, *, width: int, height: int):
        """A PIL image, decoded in the VAE's own dtype (the latents may be fp16/bf16 beside an fp32 VAE).

        Above SAMPLE_TILE pixels the decode goes tile by tile: a whole 1024² fp32 decode needs
        ~4 GiB, more than a small GPU has left beside training."""
        vae = self.vae
        weight = next(vae.parameters())
        latents = self.unscale_latents(self.latents_to_image_grid(latents, width=width, height=height))
        latents = latents.to(weight.device, weight.dtype)
        if max(width, height) <= SAMPLE_TILE:
            image = vae.decode(latents, return_dict=False)[0]
        else:
            saved = vae.tile_sample_min_size, vae.tile_latent_min_size
            vae.tile_sample_min_size = SAMPLE_TILE
            vae.tile_latent_min_size = SAMPLE_TILE // (2 ** (len(vae.config.block_out_channels) - 1))
            try:
                image = vae.tiled_decode(latents, return_dict=False)[0]
            finally:
                vae.tile_sample_min_size, vae.tile_latent_min_size = saved
        return self.pipe.image_processor.postprocess(image.float(), output_type="pil")[0]


def metadata_json(data) -> str:
    return json.dumps(data, ensure_ascii=False, sort_keys=True)


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean of the squared error, each element multiplied by its weight first (no renormalisation:
    a weight of 0.1 makes that pixel count a tenth, whatever the rest of the mask)."""
    error = torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="none")
    if weights is not None:
        error = error * weights.to(error.device, error.dtype)
    return error.mean(dim=tuple(range(1, error.dim())))
