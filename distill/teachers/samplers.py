"""Samplers: small stateless functions over the denoiser convention D(x, sigma, cond) -> x0.

Each takes the initial noisy x (already scaled: x = noise * sigmas[0]), a decreasing sigma grid that
ends in 0 (see schedule.make_sigmas) and the condition, and returns the final x0 estimate. In sigma
space DDIM (eta = 0) *is* the Euler method (Karras et al. 2022, §3), so `ddim` and `euler` share one
update and differ only in their default grid.
"""

import math

import torch
from tqdm import tqdm

from distill.teachers.schedule import make_sigmas


def _progress(n: int, show: bool, desc: str):
    return tqdm(range(n), desc=desc, leave=False, disable=not show)


def _sigma(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return s.to(device=x.device, dtype=x.dtype).expand(x.shape[0])  # (N,)


@torch.no_grad()
def sample_euler(D, x, sigmas, cond=None, progress=False):
    """Euler / DDIM: x <- x + (sigma' - sigma) (x - D(x, sigma)) / sigma (Karras et al. 2022, Alg. 1)."""
    for i in _progress(len(sigmas) - 1, progress, "euler"):
        x0 = D(x, _sigma(sigmas[i], x), cond)
        d = (x - x0) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i]).item()
    return x


@torch.no_grad()
def sample_heun(D, x, sigmas, cond=None, progress=False):
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); the last step to sigma = 0 is Euler."""
    for i in _progress(len(sigmas) - 1, progress, "heun"):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - D(x, _sigma(s, x), cond)) / s
        x_next = x + d * (s_next - s).item()
        if s_next > 0:
            d_next = (x_next - D(x_next, _sigma(s_next, x), cond)) / s_next
            x_next = x + (d + d_next) / 2 * (s_next - s).item()
        x = x_next
    return x


def dpmpp_states(D, x, sigmas, cond=None, order=2, progress=False):
    """DPM-Solver++ multistep, order 2 (2M) or 3 (3M) (Lu et al. 2022, Alg. 2), data prediction: yields x
    after every step (at sigmas[1], sigmas[2], ...).

    In sigma space lambda = -log sigma and the first-order step is x' = (sigma'/sigma) x - expm1(-h) x0.
    As in diffusers' `lower_order_final`, short runs (< 15 steps) drop to lower order on the last two
    steps, which keeps few-step sampling stable; a step to sigma = 0 gives x0.
    """
    n = len(sigmas) - 1
    lower_final = n < 15
    x0s, hs = [], []  # history of denoised estimates and step sizes (newest last)
    for i in _progress(n, progress, f"dpm++{order}m"):
        s, s_next = sigmas[i].item(), sigmas[i + 1].item()
        x0 = D(x, _sigma(sigmas[i], x), cond)
        if s_next == 0:
            yield x0
            return
        h = math.log(s / s_next)
        # The order: limited by the history, and lowered on the last steps of short runs.
        k = min(order, len(x0s) + 1)
        if lower_final and i >= n - 2:
            k = min(k, 1 + (i == n - 2))
        if k == 1:
            x = (s_next / s) * x - math.expm1(-h) * x0
        elif k == 2:
            r0 = hs[-1] / h
            d1 = (x0 - x0s[-1]) / r0
            x = (s_next / s) * x - math.expm1(-h) * (x0 + 0.5 * d1)
        else:
            r0, r1 = hs[-1] / h, hs[-2] / h
            d1_0 = (x0 - x0s[-1]) / r0
            d1_1 = (x0s[-1] - x0s[-2]) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi1 = math.expm1(-h)  # e^{-h} - 1
            phi2 = phi1 / h + 1
            phi3 = phi2 / h - 0.5
            x = (s_next / s) * x - phi1 * x0 + phi2 * d1 - phi3 * d2
        x0s.append(x0)
        hs.append(h)
        yield x


@torch.no_grad()
def sample_dpmpp(D, x, sigmas, cond=None, order=2, progress=False):
    """DPM-Solver++(2M/3M) to the end of the grid (see dpmpp_states); returns the last state."""
    *_, last = dpmpp_states(D, x, sigmas, cond, order, progress)
    return last


def sample_dpmpp_2m(D, x, sigmas, cond=None, progress=False):
    return sample_dpmpp(D, x, sigmas, cond, order=2, progress=progress)


def sample_dpmpp_3m(D, x, sigmas, cond=None, progress=False):
    return sample_dpmpp(D, x, sigmas, cond, order=3, progress=progress)


# name -> (function, default sigma grid, network calls for n steps)
SAMPLERS = {
    "ddim": (sample_euler, "discrete", lambda n: n),
    "euler": (sample_euler, "karras", lambda n: n),
    "heun": (sample_heun, "karras", lambda n: 2 * n - 1),
    "dpmpp-2m": (sample_dpmpp_2m, "karras", lambda n: n),
    "dpmpp-3m": (sample_dpmpp_3m, "karras", lambda n: n),
}


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """How many steps give exactly `nfe` network calls (Heun: 2n - 1, so it needs an odd NFE)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if nfe < 1:
        raise ValueError(f"NFE must be at least 1, got {nfe}")
    if sampler == "heun":
        if nfe % 2 == 0:
            raise ValueError(f"heun makes 2n-1 network calls for n steps, so its NFE must be odd; got {nfe}")
        return (nfe + 1) // 2
    return nfe


def sample(D, noise, schedule, sampler: str, nfe: int, cond=None, grid: str | None = None,
           rho: float = 7.0, progress: bool = False):
    """Run a named sampler for `nfe` network calls from unit-variance `noise`; returns x0."""
    steps = steps_for_nfe(sampler, nfe)  # validates the name and the NFE first
    fn, default_grid, _ = SAMPLERS[sampler]
    # the sampler's usual grid where the teacher allows it (an index network: its own timesteps; flow: shifted times)
    sigmas = make_sigmas(grid or schedule.preferred_grid(default_grid), steps, schedule, rho)
    x = noise * sigmas[0].item()
    return fn(D, x, sigmas, cond, progress=progress)
