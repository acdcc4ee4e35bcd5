"""Few-step solvers of the multi-view stages (crm_models.multiview.solvers) on an analytic diffusion.

Data x0 ~ N(mu, diag(s^2)) (per coordinate) under the official zero-terminal-SNR schedule: the exact
noise prediction is eps*(x, t) = sigma_t (x - a_t mu) / (a_t^2 s^2 + sigma_t^2), and the
probability-flow ODE keeps z = (x_t - a_t mu) / sqrt(a_t^2 s^2 + sigma_t^2) constant, so every
sampler's result can be compared with the exact solution and its order of convergence measured.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from crm_models.multiview.schedule import ddim_timesteps, schedule_buffers
from crm_models.multiview.solvers import (
    OFFICIAL_GRID_STEPS,
    SAMPLERS,
    check_sampler,
    make_stage_scheduler,
    official_grid,
    solver_timesteps,
)

AB = schedule_buffers()["alphas_cumprod"].double()  # the official buffer (float32 values), in float64


class GaussianData:
    """Exact quantities of the diffusion of N(mu, diag(s^2)) data under the official schedule."""

    def __init__(self, n: int = 4096, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(n, generator=g, dtype=torch.float64) * 0.5
        self.s = torch.rand(n, generator=g, dtype=torch.float64) * 0.8 + 0.2
        self.z = torch.randn(n, generator=g, dtype=torch.float64)  # the ODE invariant of one trajectory
        self.shape = (64, n // 64)  # (batch, channels): the multistep solvers expect a batch axis

    def _coef(self, t: int):
        a, sig = AB[t].sqrt(), (1.0 - AB[t]).sqrt()
        return a, sig, a * a * self.s * self.s + sig * sig

    def x(self, t: int) -> torch.Tensor:
        """The exact ODE trajectory through `z` at timestep t."""
        a, _, var = self._coef(t)
        return a * self.mu + var.sqrt() * self.z

    def eps(self, x: torch.Tensor, t: int) -> torch.Tensor:
        a, sig, var = self._coef(t)
        return sig * (x - a * self.mu) / var

    def denoised(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """E[x0 | x_t = x]: what a step to sigma 0 returns from an exact x_t."""
        a, _, var = self._coef(t)
        return self.mu + a * self.s * self.s * (x - a * self.mu) / var

    def solve(self, sched) -> torch.Tensor:
        """Run `sched` from the exact x at its first timestep with the exact eps (float32 state)."""
        ts = sched.timesteps.tolist()
        x = self.x(ts[0]).float().reshape(self.shape)
        for t in ts:
            eps = self.eps(x.double().flatten(), t).float().reshape(self.shape)
            x, _ = sched.step(eps, t, x)
        return x.double().flatten()


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def observed_order(steps: list[int], errors: list[float]) -> float:
    """Least-squares slope of log(error) against log(1 / steps)."""
    return float(-np.polyfit(np.log(steps), np.log(errors), 1)[0])


@pytest.fixture(scope="module")
def data() -> GaussianData:
    return GaussianData()


# ---------------------------------------------------------------------------- timesteps
def test_solver_timesteps_are_official_grid_points_with_both_ends():
    grid = official_grid()
    assert len(grid) == OFFICIAL_GRID_STEPS and torch.equal(grid, ddim_timesteps(50))
    grid_set = set(grid.tolist())
    for s in range(1, OFFICIAL_GRID_STEPS + 1):
        ts = solver_timesteps(s).tolist()
        assert len(ts) == s and set(ts) <= grid_set, s
        assert all(a > b for a, b in zip(ts, ts[1:])), s
        assert ts[0] == int(grid[0]) and (s == 1 or ts[-1] == int(grid[-1])), s
        assert 999 not in ts
    assert torch.equal(solver_timesteps(OFFICIAL_GRID_STEPS), grid)
    gaps = -np.diff(solver_timesteps(10).numpy())  # evenly spread: gaps differ by at most one grid step
    assert gaps.max() - gaps.min() <= int(grid[0] - grid[1])


@pytest.mark.parametrize(
    "name,steps,match",
    [
        ("euler", 10, "unknown sampler"),
        ("dpmpp", 0, "1..50"),
        ("unipc", 51, "1..50"),
        ("dpmpp", 2.5, "integer"),
    ],
)
def test_bad_sampler_or_step_count_is_named(name, steps, match):
    with pytest.raises(ValueError, match=match):
        check_sampler(name, steps)


def test_zero_snr_timestep_and_bad_timesteps_are_rejected():
    with pytest.raises(ValueError, match="alpha_bar = 0"):
        make_stage_scheduler("dpmpp", timesteps=[999, 500, 1])
    with pytest.raises(ValueError, match="descending"):
        make_stage_scheduler("unipc", timesteps=[1, 500])
    with pytest.raises(ValueError, match="explicit timesteps"):
        make_stage_scheduler("ddim", timesteps=[981, 1])


@pytest.mark.parametrize("name", ["dpmpp", "unipc"])
def test_solver_sigmas_come_from_the_official_buffer(name):
    sched = make_stage_scheduler(name, AB.float(), num_steps=10)
    ts = sched.timesteps
    assert torch.equal(ts, solver_timesteps(10)) and torch.equal(sched.scheduler.timesteps, ts)
    want = torch.sqrt((1.0 - AB[ts]) / AB[ts]).float()
    assert torch.equal(sched.scheduler.sigmas[:-1], want)
    assert float(sched.scheduler.sigmas[-1]) == 0.0  # final_sigmas_type="zero"
    assert sched.scheduler.config.final_sigmas_type == "zero" and sched.scheduler.config.lower_order_final


# ---------------------------------------------------------------------------- analytic convergence
# Orders are measured where the log-SNR is smooth in t (981 -> 181): near t = 0 the schedule has a
# log singularity (lambda ~ -log(t) / 2), so integer timesteps cannot resolve it and every sampler's
# error there falls slowly whatever its order. The final step to sigma 0 is exact given its input, so
# the reference is E[x0 | exact x at the last timestep].
@pytest.mark.parametrize("name,low,high", [("dpmpp", 1.8, 2.3), ("unipc", 2.4, 3.3)])
def test_solver_converges_at_its_order(data, name, low, high):
    start, end = 981, 181
    steps = [10, 20, 40, 80]
    errors = []
    for s in steps:
        ts = torch.arange(start, end - 1, -((start - end) // s))
        assert len(ts) == s + 1 and int(ts[-1]) == end
        sched = make_stage_scheduler(name, AB.float(), timesteps=ts)
        errors.append(rms(data.solve(sched), data.denoised(data.x(end), end)))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    order = observed_order(steps[1:], errors[1:])
    assert low <= order <= high, (errors, order)


def test_ddim_converges_at_first_order(data):
    """DDIM on its official discretisation, to the exact x at t = 0 (where its last step lands)."""
    steps = [10, 20, 40, 100, 200]
    errors = [
        rms(data.solve(make_stage_scheduler("ddim", AB.float(), num_steps=s)), data.x(0)) for s in steps
    ]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    order = observed_order(steps, errors)
    assert 0.8 <= order <= 1.2, (errors, order)


@pytest.mark.parametrize("name", ["dpmpp", "unipc"])
def test_error_on_the_official_grid_falls_with_steps(data, name):
    """The production timesteps (`solver_timesteps`): 10 -> 15 -> 20 -> 50 grid points, each closer to
    the exact endpoint of the last step (E[x0 | exact x_1])."""
    ref = data.denoised(data.x(1), 1)
    errors = [
        rms(data.solve(make_stage_scheduler(name, AB.float(), num_steps=s)), ref) for s in (10, 15, 20, 50)
    ]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.25 * errors[0], errors


@pytest.mark.parametrize("name", SAMPLERS)
def test_step_returns_the_data_prediction(name, data):
    sched = make_stage_scheduler(name, AB.float(), num_steps=5)
    t = int(sched.timesteps[0])
    x = data.x(t).float().reshape(data.shape)
    eps = data.eps(x.double().flatten(), t).float().reshape(data.shape)
    _, pred_x0 = sched.step(eps, t, x)
    want = data.denoised(x.double().flatten(), t)
    assert math.isclose(rms(pred_x0.double().flatten(), want), 0.0, abs_tol=5e-3 * float(want.abs().max()))


def test_unipc_differs_from_dpmpp_from_three_steps(data):
    """With a final sigma of zero UniPC's last correction is void: at 2 steps both solvers return the same
    data prediction; from 3 steps on the earlier corrections change the result."""
    two = [data.solve(make_stage_scheduler(n, AB.float(), num_steps=2)) for n in ("dpmpp", "unipc")]
    assert torch.equal(two[0], two[1])
    three = [data.solve(make_stage_scheduler(n, AB.float(), num_steps=3)) for n in ("dpmpp", "unipc")]
    assert rms(three[0], three[1]) > 1e-3
