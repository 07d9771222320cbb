"""SDXL: DDPM noise from the checkpoint's own schedule, two CLIP encoders, size conditioning.

Single files use the original (LDM / "webui") layout (:mod:`families.sdxl_layout`), kohya LoRAs the
original U-Net block names (:mod:`families.sdxl_lora_names`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from families.sdxl_files import SDXLFiles
from families.training import TrainingFamily


class SDXLFamily(SDXLFiles, TrainingFamily):
    name = "sdxl"
    display_name = "SDXL"
    pipeline_marker = "StableDiffusionXL"
    denoiser_attr = "unet"
    text_encoder_attrs = ("text_encoder", "text_encoder_2")
    attention_targets = ("to_k", "to_q", "to_v", "to_out.0")
    feedforward_targets = ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
    unused_options = ("timestep_sampling", "guidance_scale")
    size_multiple = 8
    uses_negative_prompt = True
    auto_precision_on_gpu = "fp16"
    activation_gib = (1.6, 8.0)
    lora_key_markers = (
        "unet.",
        "lora_unet_",
        "lora_te1_",
        "lora_te2_",
        "text_encoder_2.",
        "input_blocks",
        "down_blocks",
    )
    demo_name = "demo-tiny-sdxl-RANDOM-WEIGHTS"
    demo_architecture = "stable-diffusion-xl-v1-base"
    default_guidance = 5.0
    smallest_preset = "sdxl-8gb"

    def __init__(self, *args, **kwargs) -> None:
        from diffusers import DDPMScheduler

        super().__init__(*args, **kwargs)
        # Train on the DDPM schedule the checkpoint was trained with, not the inference sampler.
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(torch.float32)

    def configure(self, config) -> list[str]:
        """The noise schedule of the run: the model's prediction type unless overridden, and zero terminal
        SNR when asked or when the model was trained so; samples use the same."""
        from diffusers import DDPMScheduler

        ignored = super().configure(config)
        base = self.pipe.scheduler.config
        prediction = self.prediction_type(config)
        zero_snr = config.zero_terminal_snr or bool(base.get("rescale_betas_zero_snr"))
        self.noise_scheduler = DDPMScheduler.from_config(
            base, prediction_type=prediction, rescale_betas_zero_snr=zero_snr
        )
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(torch.float32)
        changes = {"prediction_type": prediction}
        if zero_snr:
            changes.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        self.pipe.scheduler = type(self.pipe.scheduler).from_config(base, **changes)
        self.zero_terminal_snr = zero_snr
        return ignored

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * self.vae.config.scaling_factor

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.vae.config.scaling_factor

    def sample_text_kwargs(self, text: dict[str, torch.Tensor]) -> dict:
        # The negative prompt is empty: zeros, as SDXL base's pipeline does for an empty prompt.
        dtype = self.weight_dtype
        embeds, pooled = text["prompt_embeds"].to(dtype), text["pooled"].to(dtype)
        return {
            "prompt_embeds": embeds,
            "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": torch.zeros_like(embeds),
            "negative_pooled_prompt_embeds": torch.zeros_like(pooled),
        }

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        hidden = []
        for tokenizer, encoder in zip((self.pipe.tokenizer, self.pipe.tokenizer_2), self.text_encoders(), strict=True):
            ids = tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(encoder.device)
            output = encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
        # The pooled embedding comes from the second encoder, the one with a projection.
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled": output.text_embeds}

    def prediction_type(self, config) -> str:
        if config.prediction_type != "auto":
            return config.prediction_type
        return self.noise_scheduler.config.prediction_type

    def _noise(self, latents: torch.Tensor, generator, config) -> torch.Tensor:
        shape = latents.shape
        noise = generator.randn(shape).to(latents.device, latents.dtype)
        if config.noise_offset:
            offset = generator.randn((shape[0], shape[1], 1, 1)).to(latents.device, latents.dtype)
            noise = noise + config.noise_offset * offset
        for level in range(1, config.multires_noise_iterations + 1):
            scale = 2**level
            height, width = max(1, shape[2] // scale), max(1, shape[3] // scale)
            coarse = generator.randn((shape[0], shape[1], height, width))
            coarse = F.interpolate(coarse, size=shape[2:], mode="bilinear", align_corners=False)
            noise = noise + coarse.to(latents.device, latents.dtype) * config.multires_noise_discount**level
        if config.multires_noise_iterations:
            noise = noise / noise.std(dim=(1, 2, 3), keepdim=True)
        return noise

    def time_ids(self, items) -> torch.Tensor:
        rows = []
        for item in items:
            width, height = item.original_size
            top, left = item.crop_top_left
            bucket_w, bucket_h = item.bucket
            if item.flipped:  # the crop's left edge, seen in the mirrored image
                left = item.resized_size[0] - bucket_w - left
            rows.append([height, width, top, left, bucket_h, bucket_w])
        return torch.tensor(rows, dtype=torch.float32)

    def training_loss(self, *, latents, text, items, generator, config, fixed_t=None, noise=None) -> torch.Tensor:
        batch = latents.shape[0]
        steps = self.noise_scheduler.config.num_train_timesteps
        if noise is None:
            noise = self._noise(latents, generator, config)
        if fixed_t is None:
            timesteps = generator.randint(steps, (batch,))
        else:
            timesteps = (fixed_t * steps).long().clamp(0, steps - 1)
        timesteps = timesteps.to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.prediction_type(config)
        if prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        dtype = self.weight_dtype
        prediction = self.denoiser(
            noisy.to(dtype),
            timesteps,
            encoder_hidden_states=text["prompt_embeds"].to(latents.device, dtype),
            added_cond_kwargs={
                "text_embeds": text["pooled"].to(latents.device, dtype),
                "time_ids": self.time_ids(items).to(latents.device, dtype),
            },
        ).sample
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if config.min_snr_gamma:
            loss = loss * self._min_snr_weights(timesteps.cpu(), config.min_snr_gamma, prediction_type).to(loss.device)
        return loss

    def _min_snr_weights(self, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
        alpha_bar = self.alphas_cumprod[timesteps]
        snr = alpha_bar / (1 - alpha_bar)
        if prediction_type == "v_prediction":
            return torch.clamp(snr, max=gamma) / (snr + 1)
        # With zero terminal SNR the last timestep has snr 0, where min(snr, γ)/snr tends to 1.
        return torch.where(snr > 0, torch.clamp(snr, max=gamma) / snr.clamp(min=1e-12), torch.ones_like(snr))

    def sample_kwargs(self) -> dict:
        return {"guidance_scale": self.default_guidance}
