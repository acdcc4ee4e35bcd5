"""Zero-terminal-SNR noise schedule and the DDIM timestep tables of the multi-view stages.

`schedule_buffers` computes, in float64, the 12 persistent schedule buffers the official model
carries in its state dict (stored as float32). `make_ddim_scheduler` builds the equivalent
diffusers `DDIMScheduler` and replaces its float32 alphas_cumprod by the official buffer (the
float32 rescale inside diffusers differs by up to 5e-7). `ddim_timesteps` gives the official
"uniform" DDIM discretisation, which for step counts that do not divide 1000 has one more step
than diffusers' "leading" spacing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: Names (and order) of the schedule buffers in the official state dict.
SCHEDULE_BUFFER_NAMES: tuple[str, ...] = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


@dataclass
class ScheduleConfig:
    """Diffusion schedule of both stages (official `LatentDiffusionInterface` parameters)."""

    linear_start: float = 0.00085
    """beta at t=0 (the "linear" schedule is linear in sqrt(beta))."""
    linear_end: float = 0.012
    """beta at t=T-1 before the zero-SNR rescale."""
    timesteps: int = 1000
    """Number of training timesteps T."""
    zero_snr: bool = True
    """Rescale to zero terminal SNR (alpha_bar[T-1] = 0 exactly)."""
    scale_factor: float = 0.18215
    """VAE latent scale: latent = scale_factor * posterior sample."""
    parameterization: str = "eps"
    """What the UNet predicts; only "eps" is supported."""

    @classmethod
    def from_fixture_config(cls, cfg: dict) -> ScheduleConfig:
        """From an official config dict: `{"model": {"params": ...}}`, or the `params` dict itself."""
        params = cfg.get("model", cfg).get("params", cfg.get("model", cfg))
        out = cls(
            linear_start=float(params.get("linear_start", cls.linear_start)),
            linear_end=float(params.get("linear_end", cls.linear_end)),
            timesteps=int(params.get("timesteps", cls.timesteps)),
            zero_snr=bool(params.get("zero_snr", cls.zero_snr)),
            scale_factor=float(params.get("scale_factor", cls.scale_factor)),
            parameterization=str(params.get("parameterization", cls.parameterization)),
        )
        if out.parameterization != "eps":
            raise ValueError(f"only eps parameterization is supported, got {out.parameterization!r}")
        return out


def schedule_betas(cfg: ScheduleConfig) -> np.ndarray:
    """Betas (T,) float64: sqrt-linear ("scaled_linear"), optionally rescaled to zero terminal SNR."""
    betas = np.linspace(cfg.linear_start**0.5, cfg.linear_end**0.5, cfg.timesteps, dtype=np.float64) ** 2
    if not cfg.zero_snr:
        return betas
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def schedule_buffers(cfg: ScheduleConfig | None = None) -> dict[str, torch.Tensor]:
    """The 12 official schedule buffers (each (T,) float32), keyed by their state-dict names."""
    cfg = cfg or ScheduleConfig()
    betas = schedule_betas(cfg)
    alphas = 1.0 - betas
    ab = np.cumprod(alphas)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
    with np.errstate(divide="ignore"):
        values = {
            "betas": betas,
            "alphas_cumprod": ab,
            "alphas_cumprod_prev": ab_prev,
            "sqrt_alphas_cumprod": np.sqrt(ab),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ab),
            "log_one_minus_alphas_cumprod": np.log(1.0 - ab),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / (ab + 1e-8)),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / (ab + 1e-8) - 1.0),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(ab_prev) / (1.0 - ab),
            "posterior_mean_coef2": (1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab),
        }
    return {k: torch.tensor(values[k], dtype=torch.float32) for k in SCHEDULE_BUFFER_NAMES}


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Official "uniform" DDIM timesteps, in sampling (descending) order, int64.

    `c = T // S`; timesteps are `arange(0, T, c) + 1`. For S = 50: [981, 961, ..., 1]. When S does
    not divide T the count can exceed S (S = 30 gives 31 steps), as in the official sampler.
    A timestep equal to T (e.g. S = 3) is dropped.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in 1..{num_train_timesteps}, got {num_steps}")
    stride = num_train_timesteps // num_steps
    steps = torch.arange(0, num_train_timesteps, stride, dtype=torch.int64) + 1
    # When the stride divides T-1 (S = 3, 27, 37, 111, ...) the last value is T, which the official
    # sampler cannot index (it fails there); it is dropped, leaving the S steps diffusers would take.
    steps = steps[steps < num_train_timesteps]
    return torch.flip(steps, dims=[0])


def make_ddim_scheduler(
    alphas_cumprod: torch.Tensor | None = None, cfg: ScheduleConfig | None = None, num_steps: int = 50
):
    """A diffusers `DDIMScheduler` equivalent to the official sampler, set to `num_steps`.

    `alphas_cumprod` (T,): the official buffer (loaded from a checkpoint or `schedule_buffers`),
    copied into the scheduler. Its `timesteps` are replaced by `ddim_timesteps(num_steps)` (the
    step rule `prev = t - T // num_steps` then matches the official `a_prev` for every step).
    """
    from diffusers import DDIMScheduler

    cfg = cfg or ScheduleConfig()
    sched = DDIMScheduler(
        num_train_timesteps=cfg.timesteps,
        beta_start=cfg.linear_start,
        beta_end=cfg.linear_end,
        beta_schedule="scaled_linear",
        rescale_betas_zero_snr=cfg.zero_snr,
        timestep_spacing="leading",
        steps_offset=1,
        set_alpha_to_one=False,
        clip_sample=False,
        prediction_type="epsilon",
    )
    if alphas_cumprod is None:
        alphas_cumprod = schedule_buffers(cfg)["alphas_cumprod"]
    ab = alphas_cumprod.detach().to("cpu", torch.float32).clone()
    if ab.shape != (cfg.timesteps,):
        raise ValueError(f"alphas_cumprod must have shape ({cfg.timesteps},), got {tuple(ab.shape)}")
    sched.alphas_cumprod = ab
    sched.final_alpha_cumprod = ab[0]
    sched.set_timesteps(num_steps)
    sched.timesteps = ddim_timesteps(num_steps, cfg.timesteps)
    return sched
