"""Flux: flow matching on packed latents, T5 + CLIP conditioning, guidance embedding."""

from __future__ import annotations

import math

import torch

from families.flux_files import FluxFiles
from families.training import TrainingFamily, weighted_mse


def _pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2 · W/2, 4C): 2×2 patches as tokens, the layout the transformer reads."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def _unpack(packed: torch.Tensor, *, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`_pack` for latents of ``height`` x ``width``."""
    batch, _, features = packed.shape
    channels = features // 4
    patches = packed.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, channels, height, width)


def _image_ids(height: int, width: int) -> torch.Tensor:
    """Positions (0, row, column) of each packed token for the rotary embedding."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)


class FluxFamily(FluxFiles, TrainingFamily):
    name = "flux"
    display_name = "Flux"
    pipeline_marker = "Flux"
    size_multiple = 16
    uses_negative_prompt = False
    activation_gib = (3.0, 16.0)
    lora_key_markers = (
        "transformer.",
        "double_blocks",
        "single_blocks",
        "lora_transformer_",
        "single_transformer_blocks",
    )
    demo_name = "demo-tiny-flux-RANDOM-WEIGHTS"
    demo_architecture = "Flux.1-dev"
    default_guidance = 3.5
    smallest_preset = "flux-12gb"
    full_size_quantization = "nf4"
    denoiser_attr = "transformer"
    text_encoder_attrs = ("text_encoder", "text_encoder_2")
    adapted_text_encoders = ("text_encoder",)  # diffusers' Flux LoRA format carries the CLIP encoder only
    attention_targets = ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out")
    # The single blocks' proj_out is their attention output and MLP output at once.
    feedforward_targets = (
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
        "proj_mlp",
        "proj_out",
    )
    excluded_modules = "proj_out"  # the transformer's own final projection (a full match), not the blocks'
    default_targets = "attention+feedforward"  # as diffusers' Flux LoRA example trains
    unused_options = ("prediction_type", "zero_terminal_snr", "min_snr_gamma", "multires_noise_iterations")
    auto_precision_on_gpu = "bf16"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scheduler_config = dict(self.pipe.scheduler.config)

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        return (latents - (config.shift_factor or 0.0)) * config.scaling_factor

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        return latents / config.scaling_factor + (config.shift_factor or 0.0)

    def latents_to_image_grid(self, latents: torch.Tensor, *, width: int, height: int) -> torch.Tensor:
        factor = self.pipe.vae_scale_factor
        return _unpack(latents, height=2 * (height // (factor * 2)), width=2 * (width // (factor * 2)))

    def text_cache_key(self) -> str:
        return f"{self.model_key()}-t5x{self.max_sequence_length()}"

    def prediction_type(self, config) -> str:
        return "flow"

    def max_sequence_length(self) -> int:
        """T5 tokens: 512 for dev, 256 for schnell (no guidance embedding), as their references use."""
        length = 512 if self.denoiser.config.guidance_embeds else 256
        return min(length, self.pipe.tokenizer_2.model_max_length)

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        clip, t5 = self.text_encoders()
        clip_ids = self.pipe.tokenizer(
            captions,
            padding="max_length",
            max_length=self.pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(clip.device)
        pooled = clip(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = self.pipe.tokenizer_2(
            captions, padding="max_length", max_length=self.max_sequence_length(), truncation=True, return_tensors="pt"
        ).input_ids.to(t5.device)
        return {"prompt_embeds": t5(t5_ids, output_hidden_states=False)[0], "pooled": pooled}

    def _shift(self, sigmas: torch.Tensor, image_tokens: int) -> torch.Tensor:
        config = self.scheduler_config
        if config.get("use_dynamic_shifting"):
            base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
            base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
            mu = base_shift + (max_shift - base_shift) * (image_tokens - base_len) / (max_len - base_len)
            return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        shift = config.get("shift", 1.0)
        return shift * sigmas / (1 + (shift - 1) * sigmas)

    def _sigmas(self, batch: int, image_tokens: int, generator, sampling: str) -> torch.Tensor:
        if sampling == "uniform":
            return generator.rand((batch,)).clamp(1e-4, 1 - 1e-4)
        sigmas = torch.sigmoid(generator.randn((batch,)))
        if sampling == "shift":
            sigmas = self._shift(sigmas, image_tokens)
        return sigmas

    def training_loss(
        self, *, latents, text, items, generator, config, fixed_t=None, noise=None, loss_weights=None
    ) -> torch.Tensor:
        batch, _, height, width = latents.shape
        image_tokens = (height // 2) * (width // 2)
        if noise is None:
            noise = generator.randn(latents.shape).to(latents.device, latents.dtype)
            if config.noise_offset:
                offset = generator.randn((batch, latents.shape[1], 1, 1))
                noise = noise + config.noise_offset * offset.to(latents.device, latents.dtype)
        sigmas = (
            fixed_t if fixed_t is not None else self._sigmas(batch, image_tokens, generator, config.timestep_sampling)
        )
        sigmas = sigmas.to(latents.device, torch.float32)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1.0 - s) * latents + s * noise
        target = _pack(noise - latents)  # flow matching: the velocity from data to noise
        dtype = self.weight_dtype
        transformer = self.denoiser
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((batch,), config.guidance_scale, device=latents.device, dtype=torch.float32)
        prompt_embeds = text["prompt_embeds"].to(latents.device, dtype)
        prediction = transformer(
            hidden_states=_pack(noisy).to(dtype),
            timestep=sigmas.to(dtype),
            guidance=guidance,
            pooled_projections=text["pooled"].to(latents.device, dtype),
            encoder_hidden_states=prompt_embeds,
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=latents.device, dtype=dtype),
            img_ids=_image_ids(height, width).to(latents.device, dtype),
            return_dict=False,
        )[0]
        if loss_weights is not None:  # each latent pixel's weight on its channels, packed as the latents are
            loss_weights = _pack(loss_weights.expand(-1, latents.shape[1], -1, -1).contiguous())
        return weighted_mse(prediction, target, loss_weights)

    def sample_kwargs(self) -> dict:
        return {"guidance_scale": self.default_guidance, "max_sequence_length": self.max_sequence_length()}

    def sample_text_kwargs(self, text: dict[str, torch.Tensor]) -> dict:
        dtype = self.weight_dtype
        return {"prompt_embeds": text["prompt_embeds"].to(dtype), "pooled_prompt_embeds": text["pooled"].to(dtype)}
