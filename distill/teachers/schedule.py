"""Noise schedules in sigma space (VE form: x = x0 + sigma * eps).

A schedule maps the model's own time variable `t` to a noise level `sigma` and back. Samplers and
losses only ever see sigma; the adapters use `sigma_to_t` to feed the backbone what it was trained on.
"""

import torch

from distill.errors import UserError


class VPSchedule:
    """A discrete-time DDPM-style schedule (`alphas_cumprod` over t = 0..T-1) seen in sigma space.

    sigma_t = sqrt((1 - a_t) / a_t) (docs/design.md §2). Fractional t interpolates log-sigma linearly
    between neighbouring integer timesteps, so any sigma in [sigma_min, sigma_max] has a t.
    """

    kind = "vp"

    def __init__(self, alphas_cumprod: torch.Tensor, index: bool = False):
        # index: the network takes t as an integer index (an nn.Embedding over 0..T-1, as many home-grown DDPMs
        # do); every sigma it is asked at must then be one of the schedule's own points (`snap`, `check_t`).
        self.index = bool(index)
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
    def from_scheduler_config(cls, config: dict, index: bool = False) -> "VPSchedule":
        """Build from any diffusers DDPM-family scheduler config (betas, beta_schedule, trained_betas)."""
        from diffusers import DDPMScheduler

        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        kwargs = {k: config[k] for k in keys if config.get(k) is not None}
        return cls(DDPMScheduler(**kwargs).alphas_cumprod, index=index)

    @property
    def continuous(self) -> bool:
        """Whether the network may be asked at any sigma in range (False: only at the schedule's own points)."""
        return not self.index

    def describe_time(self) -> str:
        return f"integer timesteps 0..{self.num_train_timesteps - 1}" + (" (an index input)" if self.index else "")

    def sigma_at_fraction(self, u: torch.Tensor) -> torch.Tensor:
        """The noise level at t = u * t_max, u in [0, 1] (DMD2's min_t / max_t are such fractions); float32.
        An index network's t is rounded to the schedule's own integer timesteps."""
        t = u.double() * self.t_max
        return self.t_to_sigma(t.round() if self.index else t).float()

    def student_sigmas(self, times) -> torch.Tensor:
        """Student steps declared in this schedule's own time (integer timesteps, decreasing) -> sigmas."""
        times = [float(t) for t in times]
        top = self.num_train_timesteps - 1
        if not times or any(t != int(t) or not 0 <= t <= top for t in times) or \
                any(a <= b for a, b in zip(times, times[1:])):
            raise UserError(f"a DDPM-family (VP) teacher's student steps are its integer timesteps, decreasing within "
                            f"0..{top} (e.g. [{top}] or [{top}, {3 * (top + 1) // 4 - 1}, {(top + 1) // 2 - 1}, "
                            f"{(top + 1) // 4 - 1}]); got {times}")
        return self.t_to_sigma(torch.tensor(times, dtype=torch.float64))

    def top_time(self) -> float:
        return float(self.num_train_timesteps - 1)

    def warp(self, t):
        """Sampling times as the scheduler warps them (only flow schedules do)."""
        return t

    def snap(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Index networks: each sigma moved to the nearest of the schedule's own points (in log sigma); a final
        0 stays 0. Continuous networks: unchanged."""
        if not self.index:
            return sigmas
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        positive = sigmas > 0
        t = self.sigma_to_t(sigmas.clamp(min=self.sigma_min)).round()
        return torch.where(positive, self.t_to_sigma(t), sigmas)

    def check_t(self, t: torch.Tensor) -> torch.Tensor:
        """An index network's input: t as int64, or a UserError when some t falls between the schedule's points."""
        if not self.index:
            return t
        rounded = t.round()
        off = (t - rounded).abs()
        if bool((off > 1e-3).any()):
            bad = float(t.flatten()[off.flatten().argmax()])
            raise UserError(f"this network takes integer timesteps (timestep_input 'index') but was asked at t = "
                            f"{bad:.4f}, between its points: use the schedule's own timesteps (grid 'discrete')")
        return rounded.long()

    def preferred_grid(self, grid: str) -> str:
        return "discrete" if self.index else grid

    def to_manifest(self, scheduler_config: dict) -> dict:
        return {"kind": "vp", "scheduler_config": scheduler_config, "index": self.index}

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
        raise UserError("a continuous (EDM) schedule has no discrete timesteps; use the karras schedule")

    continuous = True
    index = False

    def describe_time(self) -> str:
        return f"sigma in [{self.sigma_min:g}, {self.sigma_max:g}]"

    def sigma_at_fraction(self, u: torch.Tensor, rho: float = 7.0) -> torch.Tensor:
        """The noise level at fraction u of the rho = 7 polynomial ramp from sigma_min (u = 0) to sigma_max (u = 1):
        how the reference DMD2 discretises an EDM teacher's noise levels for its step range; float32."""
        lo, hi = self.sigma_min ** (1 / rho), self.sigma_max ** (1 / rho)
        return ((lo + u.double() * (hi - lo)) ** rho).float()

    def student_sigmas(self, times) -> torch.Tensor:
        """Student steps declared in this schedule's own time, which is sigma (decreasing, within range)."""
        times = [float(t) for t in times]
        if not times or any(not self.sigma_min <= t <= self.sigma_max for t in times) or \
                any(a <= b for a, b in zip(times, times[1:])):
            raise UserError(f"an EDM teacher's student steps are sigmas, decreasing within [{self.sigma_min:g}, "
                            f"{self.sigma_max:g}] (e.g. [{self.sigma_max:g}] or [{self.sigma_max:g}, 10, 1.5, 0.3]); "
                            f"got {times}")
        return torch.tensor(times, dtype=torch.float64)

    def top_time(self) -> float:
        return self.sigma_max

    def warp(self, t):
        return t

    def snap(self, sigmas):
        return sigmas

    def check_t(self, t):
        return t

    def preferred_grid(self, grid: str) -> str:
        return grid

    def to_manifest(self, scheduler_config: dict) -> dict:
        return {"kind": "edm", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "scheduler_config": scheduler_config}


class FlowSchedule:
    """Flow matching / rectified flow (SD3, FLUX, SANA; diffusers FlowMatchEulerDiscreteScheduler) in sigma space.

    x_t = (1 - t) x0 + t eps is x = x0 + sigma eps scaled by 1 / (1 + sigma), with sigma = t / (1 - t). t = 1 (pure
    noise) is sigma = inf, so the schedule stops at t_max = 1 - 1 / num_train_timesteps (sigma 999 for 1000), where
    the network's input is 99.9 % noise; t_min = 1 / num_train_timesteps is diffusers' smallest t. `shift` warps
    sampling times as the scheduler does, t' = shift t / (1 + (shift - 1) t): grids, student steps and the DM-loss
    noise range are drawn in the unshifted time and shifted (DMD2's 4-step SD3 artifacts went with shifting).
    """

    kind = "flow"
    continuous = True
    index = False

    def __init__(self, shift: float = 1.0, num_train_timesteps: int = 1000):
        if not shift > 0:
            raise UserError(f"the flow schedule's shift must be > 0, got {shift}")
        if num_train_timesteps < 2:
            raise UserError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)
        self.t_min = 1.0 / self.num_train_timesteps
        self.t_max = 1.0 - 1.0 / self.num_train_timesteps
        self.sigma_min = self.t_min / (1 - self.t_min)
        self.sigma_max = self.t_max / (1 - self.t_max)

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "FlowSchedule":
        if config.get("use_dynamic_shifting"):
            raise UserError("dynamic (resolution-dependent) shifting is not supported: set use_dynamic_shifting false "
                            "and the shift the teacher samples with in the scheduler config")
        return cls(config.get("shift", 1.0), config.get("num_train_timesteps", 1000))

    def shifted(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return self.shift * t / (1 + (self.shift - 1) * t)

    def t_to_sigma(self, t):
        t = torch.as_tensor(t, dtype=torch.float64).clamp(self.t_min, self.t_max)
        return t / (1 - t)

    def sigma_to_t(self, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return sigma / (1 + sigma)

    def discrete_timesteps(self, n: int) -> torch.Tensor:
        raise UserError("a flow-matching schedule has no discrete timesteps; use the time-uniform grid")

    def describe_time(self) -> str:
        return f"flow time t in (0, 1] (shift {self.shift:g})"

    def sigma_at_fraction(self, u: torch.Tensor) -> torch.Tensor:
        """The noise level at unshifted time u (then shifted), float32."""
        return self.t_to_sigma(self.shifted(u.double())).float()

    def student_sigmas(self, times) -> torch.Tensor:
        """Student steps declared in flow time t (unshifted, decreasing within (0, 1]; 1 = pure noise), shifted by
        the scheduler's shift, -> sigmas."""
        times = [float(t) for t in times]
        if not times or any(not 0 < t <= 1 for t in times) or any(a <= b for a, b in zip(times, times[1:])):
            hint = " (those look like DDPM timesteps)" if times and max(times) > 1 else ""
            raise UserError(f"a flow-matching teacher's student steps are flow times t, decreasing within (0, 1] "
                            f"(e.g. [1.0] or [1.0, 0.75, 0.5, 0.25]); got {times}{hint}")
        return self.t_to_sigma(self.shifted(torch.tensor(times, dtype=torch.float64)))

    def top_time(self) -> float:
        return 1.0

    def warp(self, t):
        return self.shifted(t).clamp(self.t_min, self.t_max)

    def snap(self, sigmas):
        return sigmas

    def check_t(self, t):
        return t

    def preferred_grid(self, grid: str) -> str:
        return "time-uniform" if grid == "discrete" else grid

    def to_manifest(self, scheduler_config: dict) -> dict:
        return {"kind": "flow", "shift": self.shift, "num_train_timesteps": self.num_train_timesteps,
                "scheduler_config": scheduler_config}


def schedule_from_manifest(entry: dict):
    """The schedule a student manifest's `schedule` entry describes (kinds vp, edm, flow)."""
    kind = entry.get("kind")
    if kind == "vp":
        return VPSchedule.from_scheduler_config(entry["scheduler_config"], index=bool(entry.get("index", False)))
    if kind == "edm":
        return EDMSchedule(entry["sigma_min"], entry["sigma_max"])
    if kind == "flow":
        return FlowSchedule(entry.get("shift", 1.0), entry.get("num_train_timesteps", 1000))
    raise UserError(f"unknown schedule kind {kind!r} (known: vp, edm, flow)")


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
    """Uniform in the model's continuous time from t_max down to its smallest noise level (a flow schedule's
    times then shifted, as FlowMatchEulerDiscreteScheduler does)."""
    t_min = float(schedule.sigma_to_t(torch.tensor(schedule.sigma_min)))
    t = torch.linspace(schedule.t_max, t_min, n, dtype=torch.float64)
    if n == 1:
        t = torch.tensor([schedule.t_max], dtype=torch.float64)
    t = schedule.warp(t)
    return torch.cat([schedule.t_to_sigma(t), torch.zeros(1, dtype=torch.float64)])


SCHEDULES = ("discrete", "karras", "time-uniform")


def make_sigmas(kind: str, n: int, schedule, rho: float = 7.0) -> torch.Tensor:
    """n sampling noise levels (+ final 0) of the named kind for a teacher's schedule."""
    if n < 1:
        raise ValueError(f"need at least one step, got {n}")
    if not schedule.continuous and kind != "discrete":
        raise UserError(f"this network takes integer timesteps (timestep_input 'index'): the {kind!r} grid would ask "
                        "it between its points; use the 'discrete' grid (the schedule's own timesteps)")
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
