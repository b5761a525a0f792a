"""The one denoiser convention: D(x, sigma, cond) -> x0, in sigma space (DESIGN.md §2).

`x = x0 + sigma * eps` (VE form). Every network that predicts (teacher, fake score, student) is
wrapped here; the preconditioning lives in the wrapper, never in the backbone. A backbone is any
module called as `net(x_in, t, **cond) -> tensor` (the adapters give diffusers models that form).
"""

import torch
from torch import nn

from .schedule import EDMSchedule, VPSchedule, vp_scalings

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction_type!r}; one of {', '.join(PREDICTION_TYPES)}")
    return prediction_type


def vp_output_to_x0(out, x, sigma, prediction_type):
    """x0 from a VP model's output at x_vp = alpha * x, with x the VE input (closed forms).

    Written on the VE x: eps-pred (x_vp - sigma_vp eps) / alpha = x - sigma eps, which avoids
    dividing by a tiny alpha at high noise (float32 loses ~1e-3 there otherwise).
    """
    alpha, sigma_vp = vp_scalings(sigma)
    if prediction_type == "epsilon":  # x_vp = alpha x0 + sigma_vp eps  <=>  x = x0 + sigma eps
        return x - sigma * out
    if prediction_type == "v_prediction":  # v = alpha eps - sigma_vp x0  =>  x0 = alpha x_vp - sigma_vp v
        return alpha**2 * x - sigma_vp * out
    if prediction_type == "sample":
        return out
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def vp_target(x0, eps, sigma, prediction_type):
    """What a VP model with this prediction type should output for x0 noised with eps at sigma."""
    alpha, sigma_vp = vp_scalings(sigma)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma_vp * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def _bcast(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample sigma of shape (N,) (or a scalar) -> (N, 1, 1, 1) in x's dtype."""
    sigma = torch.as_tensor(sigma, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


class Denoiser(nn.Module):
    """Base class: `forward(x, sigma, cond) -> x0` with fp32 in and out; `schedule` gives sigma range."""

    schedule: VPSchedule | EDMSchedule

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max


class VPDenoiser(Denoiser):
    """A discrete-time (DDPM-family) backbone: x_vp = x / sqrt(1 + sigma^2), t = t(sigma)."""

    def __init__(self, net: nn.Module, schedule: VPSchedule, prediction_type: str):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.prediction_type = check_prediction_type(prediction_type)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        s = _bcast(sigma, x).to(torch.float64)  # scalars in float64, images in x's dtype (fp32)
        alpha, _ = vp_scalings(s)
        x_vp = x * alpha.to(x.dtype)  # (N, C, H, W)
        t = self.schedule.sigma_to_t(s.flatten()).to(torch.float32)  # (N,)
        out = self.net(x_vp, t, **(cond or {})).to(x.dtype)
        return vp_output_to_x0(out, x, s.to(x.dtype), self.prediction_type)


class EDMDenoiser(Denoiser):
    """A continuous-sigma backbone with EDM preconditioning (Karras et al. 2022, Table 1).

    x0 = c_skip x + c_out F(c_in x, c_noise), c_noise = ln(sigma) / 4. `prediction_type` follows
    diffusers' EDM schedulers: "epsilon" -> c_out = sigma sd / sqrt(sigma^2 + sd^2), "v_prediction"
    the same with a minus sign, "sample" -> the network already returns x0 (c_skip 0, c_out 1).
    """

    def __init__(self, net: nn.Module, schedule: EDMSchedule, prediction_type: str = "epsilon",
                 sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.prediction_type = check_prediction_type(prediction_type)
        self.sigma_data = float(sigma_data)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        s = _bcast(sigma, x).to(torch.float64)  # scalars in float64, images in x's dtype (fp32)
        sd = self.sigma_data
        c_in = 1 / (s**2 + sd**2).sqrt()
        c_noise = (s.flatten().log() / 4).to(torch.float32)
        out = self.net(x * c_in.to(x.dtype), c_noise, **(cond or {})).to(x.dtype)
        if self.prediction_type == "sample":
            return out
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        if self.prediction_type == "v_prediction":
            c_out = -c_out
        return c_skip.to(x.dtype) * x + c_out.to(x.dtype) * out


def guided(denoiser, scale: float, uncond: dict | None):
    """Classifier-free guidance: D_uncond + scale * (D_cond - D_uncond), both in one batch.

    Returns a function with the denoiser's signature; `uncond` must have the batch size of x.
    scale == 1 (or no uncond) is the plain conditional model and costs one call.
    """
    if uncond is None or scale == 1.0:
        return denoiser

    def d(x, sigma, cond):
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma2 = sigma.expand(n).repeat(2) if sigma.ndim == 0 else sigma.repeat(2)
        both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
        x0_c, x0_u = denoiser(torch.cat([x, x]), sigma2, both).split(n)
        return x0_u + scale * (x0_c - x0_u)

    return d
