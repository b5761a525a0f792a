"""The one denoiser convention: D(x, sigma, cond) -> x0, in sigma space (docs/teachers.md).

`x = x0 + sigma * eps` (VE form). Every network that predicts (teacher, fake score, student) is
wrapped here; the preconditioning lives in the wrapper, never in the backbone. A backbone is any
module called as `net(x_in, t, **cond) -> tensor` (the adapters give diffusers models that form).
"""

import torch
from torch import nn

from distill.errors import UserError
from distill.teachers.schedule import EDMSchedule, FlowSchedule, VPSchedule, vp_scalings

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
    """D(x, sigma, cond) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, t(sigma), cond), fp32 in and out.

    Every family is this one affine form around its backbone F (k-diffusion's and EDM's view); a subclass gives
    its four functions of sigma, and nothing else differs: the methods, export and the runtime use only these.
    - `scale_input(x, sigma)`: c_in x, the network's input;
    - `net_time(sigma)`: the network's own time input (a VP timestep, EDM's ln(sigma) / 4, a flow time x 1000);
    - `scalings(sigma)`: (c_skip, c_out), x0 from the network's output;
    - `schedule`: the sigma range and the teacher's own time (schedule.py).
    """

    schedule: object
    prediction_types: tuple[str, ...] = PREDICTION_TYPES

    def __init__(self, net: nn.Module, schedule, prediction_type: str):
        super().__init__()
        self.net = net
        self.schedule = schedule
        if prediction_type not in self.prediction_types:
            raise UserError(f"unknown prediction type {prediction_type!r} for a {self.parameterization} network; "
                            f"one of {', '.join(self.prediction_types)}")
        self.prediction_type = prediction_type

    parameterization = "?"

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def time_input(self, sigma: torch.Tensor) -> torch.Tensor:
        """(N,) sigmas -> the backbone's time argument: float32, or int64 for index networks (checked there)."""
        return self.schedule.check_t(self.net_time(sigma.to(torch.float64)).to(torch.float32))

    def graph_time(self, t: torch.Tensor) -> torch.Tensor:
        """The exported graph's float `timestep` input as the backbone takes it (an index network: int64; the engine
        manifest lists only the schedule's own integer timesteps)."""
        return t if self.schedule.continuous else t.round().long()

    def loss_weighting(self, sigma: torch.Tensor) -> torch.Tensor:
        """(N,) weights of the x0 error equal to the MSE on the network's own output: 1 / c_out^2 (eps, v and flow
        targets all give this; EDM's lambda(sigma) is the same expression)."""
        _, c_out = self.scalings(sigma.to(torch.float64))
        return (1 / c_out**2).to(sigma.dtype)

    def spec(self) -> dict:
        """What a student manifest records to rebuild this wrapper (denoiser_from_spec)."""
        return {"parameterization": self.parameterization, "prediction_type": self.prediction_type}

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        s = _bcast(sigma, x).to(torch.float64)  # scalars in float64, images in x's dtype (fp32)
        out = self.net(self.scale_input(x, s), self.time_input(s.flatten()), **(cond or {})).to(x.dtype)
        c_skip, c_out = self.scalings(s)
        return c_skip.to(x.dtype) * x + c_out.to(x.dtype) * out


class VPDenoiser(Denoiser):
    """A discrete-time (DDPM-family) backbone: x_vp = x / sqrt(1 + sigma^2), t = t(sigma)."""

    parameterization = "vp"

    def __init__(self, net: nn.Module, schedule: VPSchedule, prediction_type: str):
        super().__init__(net, schedule, prediction_type)

    def scale_input(self, x, sigma):
        return x / torch.sqrt(1 + sigma * sigma).to(x.dtype)

    def net_time(self, sigma):
        return self.schedule.sigma_to_t(sigma)

    def scalings(self, sigma):
        # the closed forms of vp_output_to_x0, written on the VE x (no division by a tiny alpha at high noise)
        alpha, sigma_vp = vp_scalings(sigma)
        if self.prediction_type == "epsilon":  # x = x0 + sigma eps
            return torch.ones_like(sigma), -sigma
        if self.prediction_type == "v_prediction":  # x0 = alpha x_vp - sigma_vp v = alpha^2 x - sigma_vp v
            return alpha**2, -sigma_vp
        return torch.zeros_like(sigma), torch.ones_like(sigma)


class EDMDenoiser(Denoiser):
    """A continuous-sigma backbone with EDM preconditioning (Karras et al. 2022, Table 1).

    x0 = c_skip x + c_out F(c_in x, c_noise), c_noise = ln(sigma) / 4. `prediction_type` follows
    diffusers' EDM schedulers: "epsilon" -> c_out = sigma sd / sqrt(sigma^2 + sd^2), "v_prediction"
    the same with a minus sign, "sample" -> the network already returns x0 (c_skip 0, c_out 1).
    """

    parameterization = "edm"

    def __init__(self, net: nn.Module, schedule: EDMSchedule, prediction_type: str = "epsilon",
                 sigma_data: float = 0.5):
        super().__init__(net, schedule, prediction_type)
        self.sigma_data = float(sigma_data)

    def spec(self) -> dict:
        return super().spec() | {"sigma_data": self.sigma_data}

    def scale_input(self, x, sigma):
        return x / torch.sqrt(sigma * sigma + self.sigma_data**2).to(x.dtype)

    def net_time(self, sigma):
        return sigma.log() / 4

    def scalings(self, sigma):
        sd = self.sigma_data
        if self.prediction_type == "sample":
            return torch.zeros_like(sigma), torch.ones_like(sigma)
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        return c_skip, (-c_out if self.prediction_type == "v_prediction" else c_out)


class FlowDenoiser(Denoiser):
    """A flow-matching (rectified-flow) backbone: x_t = (1 - t) x0 + t eps = x / (1 + sigma), t = sigma / (1 + sigma).

    "flow": the network predicts the velocity v = eps - x0, so x0 = x_t - t v (SD3, FLUX, SANA); "epsilon" and
    "sample" as usual. The network is fed `time_scale` * t (1000 t for SD3's transformer, 1 for FLUX's)."""

    parameterization = "flow"
    prediction_types = ("flow", "epsilon", "sample")

    def __init__(self, net: nn.Module, schedule: FlowSchedule, prediction_type: str = "flow",
                 time_scale: float = 1000.0):
        super().__init__(net, schedule, prediction_type)
        self.time_scale = float(time_scale)

    def spec(self) -> dict:
        return super().spec() | {"time_scale": self.time_scale}

    def scale_input(self, x, sigma):
        return x / (1 + sigma).to(x.dtype)

    def net_time(self, sigma):
        return self.time_scale * sigma / (1 + sigma)

    def scalings(self, sigma):
        if self.prediction_type == "flow":  # x0 = x / (1 + sigma) - t v
            return 1 / (1 + sigma), -sigma / (1 + sigma)
        if self.prediction_type == "epsilon":  # x0 = (x_t - t eps) / (1 - t) = x - sigma eps
            return torch.ones_like(sigma), -sigma
        return torch.zeros_like(sigma), torch.ones_like(sigma)


DENOISERS = {cls.parameterization: cls for cls in (VPDenoiser, EDMDenoiser, FlowDenoiser)}


def denoiser_from_spec(spec: dict, net: nn.Module, schedule) -> Denoiser:
    """The wrapper a manifest's `denoiser` entry describes, around `net`."""
    cls = DENOISERS.get(spec.get("parameterization"))
    if cls is None:
        raise UserError(f"unknown parameterization {spec.get('parameterization')!r}; one of {', '.join(DENOISERS)}")
    extra = {k: spec[k] for k in ("sigma_data", "time_scale") if k in spec}
    return cls(net, schedule, spec["prediction_type"], **extra)


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
