"""Noise schedules in sigma space (VE form: x = x0 + sigma * eps).

A schedule maps the model's own time variable `t` to a noise level `sigma` and back. Samplers and
losses only ever see sigma; the adapters use `sigma_to_t` to feed the backbone what it was trained on.
"""

import torch


class VPSchedule:
    """A discrete-time DDPM-style schedule (`alphas_cumprod` over t = 0..T-1) seen in sigma space.

    sigma_t = sqrt((1 - a_t) / a_t) (DESIGN.md §2). Fractional t interpolates log-sigma linearly
    between neighbouring integer timesteps, so any sigma in [sigma_min, sigma_max] has a t.
    """

    kind = "vp"

    def __init__(self, alphas_cumprod: torch.Tensor):
        a = alphas_cumprod.to(torch.float64)
        if a.ndim != 1 or len(a) < 2 or not bool(((a > 0) & (a < 1)).all()):
            raise ValueError("alphas_cumprod must be a 1-D tensor with values strictly inside (0, 1)")
        self.alphas_cumprod = a
        self.sigmas = ((1 - a) / a).sqrt()
        if not bool((self.sigmas[1:] > self.sigmas[:-1]).all()):
            raise ValueError("the noise schedule must increase strictly with t")
        self.log_sigmas = self.sigmas.log()
        self.num_train_timesteps = len(a)

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "VPSchedule":
        """Build from any diffusers DDPM-family scheduler config (betas, beta_schedule, trained_betas)."""
        from diffusers import DDPMScheduler

        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        kwargs = {k: config[k] for k in keys if config.get(k) is not None}
        return cls(DDPMScheduler(**kwargs).alphas_cumprod)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    @property
    def t_max(self) -> float:
        return float(self.num_train_timesteps - 1)

    def _log_sigmas_on(self, device) -> torch.Tensor:
        # A copy per device, so GPU sampling never round-trips sigmas through the CPU.
        if self.log_sigmas.device != torch.device(device):
            self._on_device = getattr(self, "_on_device", {})
            key = str(device)
            if key not in self._on_device:
                self._on_device[key] = self.log_sigmas.to(device)
            return self._on_device[key]
        return self.log_sigmas

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.t_max)
        log_sigmas = self._log_sigmas_on(t.device)
        lo = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = t - lo
        log_sigma = (1 - w) * log_sigmas[lo] + w * log_sigmas[lo + 1]
        return log_sigma.exp()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Inverse of `t_to_sigma` (float64, on sigma's device). Sigmas outside the schedule clamp to its ends."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log()
        log_sigmas = self._log_sigmas_on(log_sigma.device)
        log_sigma = log_sigma.clamp(log_sigmas[0], log_sigmas[-1])
        hi = torch.searchsorted(log_sigmas, log_sigma.contiguous()).clamp(1, self.num_train_timesteps - 1)
        lo = hi - 1
        w = (log_sigma - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])
        return lo + w

    def discrete_timesteps(self, n: int) -> torch.Tensor:
        """n of the model's own integer timesteps, "trailing" spacing (4 -> 999, 749, 499, 249)."""
        T = self.num_train_timesteps
        return (torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1).clamp(min=0)


class EDMSchedule:
    """A continuous sigma schedule (EDM, Karras et al. 2022): the model's time *is* sigma."""

    kind = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.t_max = self.sigma_max

    def t_to_sigma(self, t):
        return torch.as_tensor(t, dtype=torch.float64)

    def sigma_to_t(self, sigma):
        return torch.as_tensor(sigma, dtype=torch.float64)

    def discrete_timesteps(self, n: int) -> torch.Tensor:
        raise ValueError("a continuous (EDM) schedule has no discrete timesteps; use the karras schedule")


# --- sigma grids for samplers: each returns n decreasing sigmas followed by a final 0 ------------


def sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Polynomial (Karras et al. 2022, eq. 5) grid; rho=7 is EDM's, rho=1 is uniform in sigma."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    if n == 1:
        sigmas = torch.tensor([sigma_max], dtype=torch.float64)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sigmas_discrete(n: int, schedule) -> torch.Tensor:
    """The model's own timesteps (DDIM-style trailing spacing), ending at sigma = 0."""
    t = schedule.discrete_timesteps(n)
    return torch.cat([schedule.t_to_sigma(t), torch.zeros(1, dtype=torch.float64)])


def sigmas_time_uniform(n: int, schedule) -> torch.Tensor:
    """Uniform in the model's continuous time from t_max down to its smallest noise level."""
    t_min = float(schedule.sigma_to_t(torch.tensor(schedule.sigma_min)))
    t = torch.linspace(schedule.t_max, t_min, n, dtype=torch.float64)
    if n == 1:
        t = torch.tensor([schedule.t_max], dtype=torch.float64)
    return torch.cat([schedule.t_to_sigma(t), torch.zeros(1, dtype=torch.float64)])


SCHEDULES = ("discrete", "karras", "time-uniform")


def make_sigmas(kind: str, n: int, schedule, rho: float = 7.0) -> torch.Tensor:
    """n sampling noise levels (+ final 0) of the named kind for a teacher's schedule."""
    if n < 1:
        raise ValueError(f"need at least one step, got {n}")
    if kind == "discrete":
        return sigmas_discrete(n, schedule)
    if kind == "karras":
        return sigmas_karras(n, schedule.sigma_min, schedule.sigma_max, rho)
    if kind == "time-uniform":
        return sigmas_time_uniform(n, schedule)
    raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")


def vp_scalings(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma_vp) = (sqrt(a_t), sqrt(1 - a_t)) for a VE sigma: x_vp = alpha * x_ve."""
    alpha = 1 / (1 + sigma**2).sqrt()
    return alpha, sigma * alpha
