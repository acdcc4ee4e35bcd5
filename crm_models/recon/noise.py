"""Inference-time noising of the rolled-out input at a fixed timestep (SPEC §4).

x_t = sqrt(a_t) * x + sqrt(1 - a_t) * noise, noise = eps * 0.5 + 0.5 (eps ~ N(0, 1)), t = 20, with the
cumulative alphas of a diffusers `DDIMScheduler` configured like Stable Diffusion 2.1-base's scheduler
(built locally from `NoiseConfig`, no hub access).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from .config import NoiseConfig


def build_scheduler(cfg: NoiseConfig) -> DDIMScheduler:
    """The DDIM scheduler with SD-2.1-base's values (only `alphas_cumprod` is used here)."""
    return DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        trained_betas=None,
        clip_sample=cfg.clip_sample,
        set_alpha_to_one=cfg.set_alpha_to_one,
        steps_offset=cfg.steps_offset,
        prediction_type=cfg.prediction_type,
    )


class InputNoiser:
    """Adds the fixed-timestep noise to a (B, 12, R, 3R) input.

    Attributes:
        cfg: `NoiseConfig`.
        scheduler: the diffusers `DDIMScheduler` whose `add_noise` is used.
    """

    def __init__(self, cfg: NoiseConfig):
        self.cfg = cfg
        self.scheduler = build_scheduler(cfg)

    @property
    def alpha_cumprod(self) -> float:
        """a_t at the configured timestep (0.98131430 for t = 20)."""
        return float(self.scheduler.alphas_cumprod[self.cfg.timestep])

    def timesteps(self, batch: int, device=None) -> torch.Tensor:
        """(batch,) int64 tensor filled with the timestep."""
        return torch.full((batch,), self.cfg.timestep, dtype=torch.int64, device=device)

    def draw_noise(self, shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """eps * std + mean with eps ~ N(0, 1) (drawn on the generator's device, then moved)."""
        gen_device = generator.device if generator is not None else device
        eps = torch.randn(shape, generator=generator, dtype=torch.float32, device=gen_device)
        return (eps * self.cfg.noise_std + self.cfg.noise_mean).to(device)

    def __call__(
        self,
        x: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Noise `x` (B, 12, R, 3R). `noise` (same shape) is used as given (already eps*std + mean)."""
        if noise is None:
            noise = self.draw_noise(x.shape, generator=generator, device=x.device)
        else:
            if not isinstance(noise, torch.Tensor):
                noise = torch.as_tensor(noise)
            if tuple(noise.shape) != tuple(x.shape):
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(x.shape)}")
            if not torch.is_floating_point(noise):
                raise TypeError(f"noise must be a float tensor, got {noise.dtype}")
            noise = noise.to(device=x.device, dtype=x.dtype)
            if not torch.isfinite(noise).all():
                raise ValueError("noise contains NaN or infinite values")
        t = self.timesteps(x.shape[0], device=x.device)
        return self.scheduler.add_noise(x, noise, t)
