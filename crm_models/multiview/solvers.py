"""The samplers of the multi-view stages: official DDIM and two few-step solvers, on the official grid.

The official models predict noise (eps) under a zero-terminal-SNR schedule (alpha_bar[T-1] = 0) and are
sampled by DDIM on the timesteps 981, 961, ..., 1 (`ddim_timesteps(50)`). Two multistep ODE solvers from
diffusers reach similar quality in far fewer network calls:

* ``"dpmpp"``: DPM-Solver++(2M) (`DPMSolverMultistepScheduler`, data prediction, second order);
* ``"unipc"``: UniPC (`UniPCMultistepScheduler`, bh2 predictor with the UniC corrector, order 2).

Both are configured the same way here:

* **timesteps from the official grid** (`solver_timesteps`): S of the 50 grid timesteps, evenly spaced
  over the grid and always including its ends 981 and 1. t = 999 is never used: there alpha_bar is 0, so
  an eps model's data prediction divides by zero (the official sampler never evaluates it either);
* **the official alpha_bar buffer**: the sigmas at those timesteps are computed in float64 from the
  model's own `alphas_cumprod` (not from diffusers' float32 re-derivation of the schedule);
* ``final_sigmas_type="zero"``: the last step returns the data prediction (sigma 0), and it is first
  order (``lower_order_final``), as is the step before it for short schedules (diffusers' rule);
* float32 in ``step()``: the sampler passes float32 latents and eps whatever the network dtype.

`make_stage_scheduler` returns a `StageScheduler`, one object with the same ``step`` for the three
samplers. A scheduler is stateful (multistep history): build one per sampling call.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .schedule import ScheduleConfig, ddim_timesteps, make_ddim_scheduler, schedule_buffers

__all__ = [
    "OFFICIAL_GRID_STEPS",
    "SAMPLERS",
    "StageScheduler",
    "check_sampler",
    "make_stage_scheduler",
    "official_grid",
    "solver_timesteps",
]

#: Sampler names: the official DDIM, DPM-Solver++(2M), UniPC (bh2, order 2).
SAMPLERS: tuple[str, ...] = ("ddim", "dpmpp", "unipc")

#: Points of the official timestep grid (the 50-step DDIM discretisation) the solvers choose from.
OFFICIAL_GRID_STEPS = 50


def check_sampler(name: str, num_steps: int) -> None:
    """Raise ValueError when `name` is unknown or `num_steps` is out of its range.

    DDIM takes 1..T steps (the official uniform discretisation); the solvers take 1..50 (grid points).
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: expected one of {', '.join(SAMPLERS)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise ValueError(f"num_steps must be an integer, got {num_steps!r}")
    if name != "ddim" and not 1 <= num_steps <= OFFICIAL_GRID_STEPS:
        raise ValueError(
            f"sampler {name!r} takes 1..{OFFICIAL_GRID_STEPS} steps (points of the official timestep grid), "
            f"got {num_steps}"
        )


def official_grid(num_train_timesteps: int = 1000) -> torch.Tensor:
    """The official timestep grid, descending int64: [981, 961, ..., 1] for T = 1000."""
    return ddim_timesteps(OFFICIAL_GRID_STEPS, num_train_timesteps)


def solver_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """(S,) descending int64 timesteps of a few-step solver: S grid points evenly spread over the grid.

    Both ends are always included (S >= 2): the solver starts where the official sampler starts (981)
    and its last network call is at t = 1. S = 1 is the single grid point 981. Examples (T = 1000):
    S = 10 -> [981, 881, 761, 661, 541, 441, 321, 221, 101, 1]; S = 50 -> the whole grid.
    """
    check_sampler("dpmpp", num_steps)
    grid = official_grid(num_train_timesteps)
    idx = np.round(np.linspace(0, len(grid) - 1, int(num_steps))).astype(np.int64)
    return grid[torch.from_numpy(idx)]


@dataclass
class StageScheduler:
    """One sampling run's scheduler with a common interface for every sampler.

    Attributes:
        name: ``"ddim"``, ``"dpmpp"`` or ``"unipc"``.
        timesteps: (S,) descending int64 timesteps at which the network is called.
        scheduler: the diffusers scheduler (DDIMScheduler, DPMSolverMultistepScheduler or
            UniPCMultistepScheduler), set to `timesteps`.
        alphas_cumprod: (T,) float64 official alpha_bar (for the data prediction of the trajectory).
    """

    name: str
    timesteps: torch.Tensor
    scheduler: Any
    alphas_cumprod: torch.Tensor

    def step(
        self,
        eps: torch.Tensor,
        t: int,
        x: torch.Tensor,
        *,
        eta: float = 0.0,
        variance_noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step from timestep `t`: ``(x_prev, pred_x0)``, both shaped like `x` (N, 4, h, w), float32.

        `eps` is the (guided) noise prediction at (x, t). `eta` / `variance_noise` are DDIM's (the
        solvers are deterministic and reject eta > 0).
        """
        eps, x = eps.float(), x.float()
        if self.name == "ddim":
            out = self.scheduler.step(eps, t, x, eta=eta, variance_noise=variance_noise)
            return out.prev_sample, out.pred_original_sample
        if eta > 0:
            raise ValueError(f"eta > 0 is a DDIM option; sampler {self.name!r} is deterministic")
        ab = float(self.alphas_cumprod[int(t)])
        pred_x0 = (x - (1.0 - ab) ** 0.5 * eps) / ab**0.5
        return self.scheduler.step(eps, t, x).prev_sample, pred_x0


def _solver(name: str, cfg: ScheduleConfig):
    """A diffusers multistep solver configured as the module docstring says (timesteps set later)."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    common = dict(
        num_train_timesteps=cfg.timesteps,
        beta_start=cfg.linear_start,
        beta_end=cfg.linear_end,
        beta_schedule="scaled_linear",
        rescale_betas_zero_snr=cfg.zero_snr,
        prediction_type="epsilon",
        solver_order=2,
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    if name == "dpmpp":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_type="midpoint", **common)
    return UniPCMultistepScheduler(predict_x0=True, solver_type="bh2", **common)


def make_stage_scheduler(
    name: str,
    alphas_cumprod: torch.Tensor | None = None,
    cfg: ScheduleConfig | None = None,
    num_steps: int = 50,
    *,
    timesteps: torch.Tensor | list[int] | None = None,
) -> StageScheduler:
    """The scheduler of one sampling run.

    Args:
        name: ``"ddim"`` (official: `make_ddim_scheduler`, uniform discretisation, any step count),
            ``"dpmpp"`` or ``"unipc"`` (on `solver_timesteps(num_steps)`).
        alphas_cumprod: (T,) the model's official alpha_bar buffer (default: computed from `cfg`).
        cfg: the schedule (default: the official one).
        num_steps: network calls S.
        timesteps: solvers only: explicit descending timesteps in [0, T-1) instead of the grid points
            (for studies and tests, e.g. finer grids); every value must have alpha_bar > 0.
    """
    cfg = cfg or ScheduleConfig()
    if alphas_cumprod is None:
        alphas_cumprod = schedule_buffers(cfg)["alphas_cumprod"]
    ab = alphas_cumprod.detach().to("cpu", torch.float64).clone()
    if ab.shape != (cfg.timesteps,):
        raise ValueError(f"alphas_cumprod must have shape ({cfg.timesteps},), got {tuple(ab.shape)}")
    if name == "ddim":
        if timesteps is not None:
            raise ValueError(
                "DDIM runs on the official uniform discretisation; explicit timesteps are for solvers"
            )
        check_sampler(name, num_steps)
        sched = make_ddim_scheduler(alphas_cumprod, cfg, num_steps)
        return StageScheduler(name, sched.timesteps.clone(), sched, ab)

    if timesteps is None:
        check_sampler(name, num_steps)
        ts = solver_timesteps(num_steps, cfg.timesteps)
    else:
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}: expected one of {', '.join(SAMPLERS)}")
        ts = torch.as_tensor(timesteps, dtype=torch.int64).flatten()
        if len(ts) == 0 or bool((ts[1:] >= ts[:-1]).any()):
            raise ValueError(f"timesteps must be a non-empty strictly descending sequence, got {ts.tolist()}")
        if int(ts.min()) < 0 or int(ts.max()) >= cfg.timesteps:
            raise ValueError(f"timesteps must lie in [0, {cfg.timesteps}), got {ts.tolist()}")
    ab_t = ab[ts]
    if not bool((ab_t > 0).all()):
        raise ValueError(
            f"timesteps {ts[ab_t <= 0].tolist()} have alpha_bar = 0 (zero terminal SNR): "
            "an eps model cannot be evaluated there"
        )
    sched = _solver(name, cfg)
    with warnings.catch_warnings():  # diffusers converts its own float32 schedule with numpy (unused here)
        warnings.simplefilter("ignore", DeprecationWarning)
        sched.set_timesteps(num_inference_steps=len(ts))  # resets the multistep history; replaced below
    sigmas = torch.sqrt((1.0 - ab_t) / ab_t)
    sched.timesteps = ts.clone()
    sched.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)  # final sigma: zero
    sched.num_inference_steps = len(ts)
    # diffusers keeps a float32 re-derivation; the official buffer (last value kept finite, unused)
    official = ab.to(torch.float32).clone()
    official[-1] = official[-1].clamp(min=2.0**-24)
    sched.alphas_cumprod = official
    return StageScheduler(name, ts.clone(), sched, ab)
