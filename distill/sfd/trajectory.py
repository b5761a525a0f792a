"""The timestamps and trajectories SFD matches: the student's polynomial (rho) grid with the analytical first step,
the teacher's finer grid on the same polynomial and its DPM-Solver++(3M) trajectory, and the student's Euler step."""


import torch

from distill.errors import UserError
from distill.sfd.config import SFDConfig
from distill.teachers.samplers import dpmpp_states
from distill.teachers.schedule import sigmas_karras


def student_sigmas(nfe: int, afs: bool, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """The student's timestamps (float64, decreasing, ending at sigma_min): a polynomial (rho) grid with nfe
    intervals, one more with AFS. E.g. NFE 2 with AFS: 80, 10.93, 0.670, 0.006 (docs/design.md §4)."""
    return sigmas_karras(nfe + int(afs) + 1, sigma_min, sigma_max, rho)[:-1]


def teacher_sigmas(nfe: int, afs: bool, teacher_steps: int, sigma_min: float, sigma_max: float,
                   rho: float = 7.0) -> torch.Tensor:
    """The teacher's finer grid on the same polynomial: every `teacher_steps`-th point is a student timestamp
    (the grid is linear in sigma^(1/rho), so refining it keeps the coarse points)."""
    return sigmas_karras((nfe + int(afs)) * teacher_steps + 1, sigma_min, sigma_max, rho)[:-1]


def afs_step(x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """The analytical first step: an Euler step whose direction (x - D) / sigma, i.e. the noise, is taken as
    x / sqrt(1 + sigma^2) (x = x0 + sigma eps with zero-mean unit-variance data: at sigma_max the scaled input
    is almost all noise), so it needs no network call."""
    return x + (sigma_next - sigma) * x / (1 + sigma**2) ** 0.5


def euler_step(D, x: torch.Tensor, sigma: float, sigma_next: float, cond: dict | None) -> torch.Tensor:
    """One Euler (DDIM) step in sigma space: x + (sigma' - sigma) (x - D(x, sigma)) / sigma."""
    x0 = D(x, x.new_full((x.shape[0],), sigma), cond).float()
    return x + (sigma_next - sigma) * (x - x0) / sigma


@torch.no_grad()
def teacher_trajectory(D, x: torch.Tensor, fine: torch.Tensor, teacher_steps: int, cond: dict | None) -> list:
    """The teacher's states at every `teacher_steps`-th point of `fine` (the student's timestamps), x first,
    from one DPM-Solver++(3M) run over the whole fine grid (the reference's teacher solver)."""
    states = [x]
    for i, state in enumerate(dpmpp_states(D, x, fine, cond, order=3), start=1):
        if i % teacher_steps == 0:
            states.append(state.float())
    return states


def sigma_range(cfg: SFDConfig, teacher) -> tuple[float, float]:
    """(sigma_min, sigma_max) of the student: the config's, or the paper's clipped to the teacher's schedule."""
    schedule = teacher.denoiser.schedule
    sigma_min = max(0.006, schedule.sigma_min) if cfg.sigma_min is None else cfg.sigma_min
    sigma_max = min(80.0, schedule.sigma_max) if cfg.sigma_max is None else cfg.sigma_max
    return float(sigma_min), float(sigma_max)


def sfd_grids(schedule, nfe: int, cfg: SFDConfig, sigma_min: float, sigma_max: float, device):
    """(student timestamps, teacher grid) for one NFE. A network that takes integer timesteps is asked only at the
    schedule's own points: both grids are moved to the nearest of them (schedule.snap), and must stay distinct."""
    coarse = schedule.snap(student_sigmas(nfe, cfg.afs, sigma_min, sigma_max, cfg.rho))
    fine = schedule.snap(teacher_sigmas(nfe, cfg.afs, cfg.teacher_steps, sigma_min, sigma_max, cfg.rho))
    if bool((fine[1:] >= fine[:-1]).any()):
        raise UserError(f"NFE {nfe} with teacher_steps {cfg.teacher_steps}: on this network's integer timesteps two "
                        "grid points coincide; lower teacher_steps or raise sigma_min")
    return coarse, fine.to(device)
