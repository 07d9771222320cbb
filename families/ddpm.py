"""Training on a U-Net's own DDPM schedule (Stable Diffusion 1.x and SDXL): noise, targets, loss weights.

A subclass says what conditions the U-Net besides the noisy latents and the timestep
(:meth:`DDPMFamily.unet_conditioning`) and how text is encoded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from families.training import TrainingFamily, weighted_mse


class DDPMFamily(TrainingFamily):
    unused_options = ("timestep_sampling", "guidance_scale")

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

    def prediction_type(self, config) -> str:
        if config.prediction_type != "auto":
            return config.prediction_type
        return self.noise_scheduler.config.prediction_type

    def unet_conditioning(self, text: dict[str, torch.Tensor], items, *, device, dtype) -> dict:
        """U-Net keyword arguments for a micro-batch besides the noisy latents and the timesteps."""
        raise NotImplementedError

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

    def training_loss(
        self, *, latents, text, items, generator, config, fixed_t=None, noise=None, loss_weights=None
    ) -> torch.Tensor:
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
        conditioning = self.unet_conditioning(text, items, device=latents.device, dtype=dtype)
        prediction = self.denoiser(noisy.to(dtype), timesteps, **conditioning).sample
        loss = weighted_mse(prediction, target, loss_weights)
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
