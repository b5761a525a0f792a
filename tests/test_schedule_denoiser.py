"""The sigma-space convention against closed forms (docs/design.md §2)."""

import pytest
import torch
from diffusers import DDPMScheduler, EDMEulerScheduler

from distill.teachers.denoiser import EDMDenoiser, VPDenoiser, guided, vp_output_to_x0, vp_target
from distill.teachers.schedule import EDMSchedule, VPSchedule, make_sigmas, sigmas_karras, vp_scalings

from .conftest import scheduler_config


@pytest.fixture
def schedule():
    return VPSchedule.from_scheduler_config(scheduler_config())


def test_vp_sigmas_closed_form(schedule):
    a = DDPMScheduler(**scheduler_config()).alphas_cumprod.double()
    assert torch.allclose(schedule.sigmas, ((1 - a) / a).sqrt())
    t = torch.tensor([0.0, 1.0, 250.0, 999.0])
    assert torch.allclose(schedule.t_to_sigma(t), ((1 - a[t.long()]) / a[t.long()]).sqrt())


def test_sigma_t_round_trip(schedule):
    t = torch.tensor([0.0, 0.25, 17.5, 500.0, 998.9, 999.0], dtype=torch.float64)
    assert torch.allclose(schedule.sigma_to_t(schedule.t_to_sigma(t)), t, atol=1e-9)
    # outside the schedule's range, sigma clamps to its ends
    assert schedule.sigma_to_t(torch.tensor([1e-6, 1e6])).tolist() == [0.0, 999.0]


def test_discrete_timesteps_trailing(schedule):
    assert schedule.discrete_timesteps(4).tolist() == [999, 749, 499, 249]
    sig = make_sigmas("discrete", 4, schedule)
    assert sig[-1] == 0 and torch.allclose(sig[:-1], schedule.sigmas[[999, 749, 499, 249]])


def test_karras_grid_endpoints():
    s = sigmas_karras(5, 0.002, 80.0, rho=7)
    assert len(s) == 6 and s[-1] == 0
    assert s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002)
    assert (s[:-1].diff() < 0).all()
    # rho = 1 is uniform in sigma
    assert torch.allclose(sigmas_karras(3, 1.0, 3.0, rho=1)[:-1], torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_conversions_round_trip(prediction_type):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 1, 3, 3, generator=g), torch.randn(4, 1, 3, 3, generator=g)
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0]).reshape(-1, 1, 1, 1)
    alpha, sigma_vp = vp_scalings(sigma)
    assert torch.allclose(alpha**2 + sigma_vp**2, torch.ones_like(sigma))
    x_vp = alpha * (x0 + sigma * eps)  # DDPM forward process: sqrt(a) x0 + sqrt(1 - a) eps
    assert torch.allclose(x_vp, alpha * x0 + sigma_vp * eps, atol=1e-6)
    out = vp_target(x0, eps, sigma, prediction_type)
    if prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022)
        assert torch.allclose(out, alpha * eps - sigma_vp * x0)
    assert torch.allclose(vp_output_to_x0(out, x_vp / alpha, sigma, prediction_type), x0, atol=1e-5)


class OracleEps(torch.nn.Module):
    """Knows x0; returns the exact eps for the (x_vp, t) it is given, using a_t at integer t."""

    def __init__(self, x0, alphas_cumprod):
        super().__init__()
        self.x0, self.a = x0, alphas_cumprod

    def forward(self, x_vp, t):
        a = self.a[t.round().long()].reshape(-1, 1, 1, 1).float()
        return (x_vp - a.sqrt() * self.x0) / (1 - a).sqrt()


def test_vp_denoiser_maps_sigma_to_the_models_timestep(schedule):
    x0 = torch.randn(3, 1, 4, 4)
    D = VPDenoiser(OracleEps(x0, schedule.alphas_cumprod), schedule, "epsilon")
    sigma = schedule.sigmas[[10, 400, 990]].float()
    x = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn_like(x0)
    assert torch.allclose(D(x, sigma), x0, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_edm_preconditioning_matches_diffusers(prediction_type):
    class Net(torch.nn.Module):
        def forward(self, x, c_noise):
            self.seen = (x, c_noise)
            return torch.tanh(x) + c_noise.reshape(-1, 1, 1, 1)

    net = Net()
    D = EDMDenoiser(net, EDMSchedule(0.002, 80.0), prediction_type, sigma_data=0.5)
    ref = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, prediction_type=prediction_type)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.3, 12.0], dtype=torch.float64)
    x0 = D(x, sigma)
    s4 = sigma.reshape(-1, 1, 1, 1)
    assert torch.allclose(net.seen[0].double(), ref.precondition_inputs(x, s4))
    assert torch.allclose(net.seen[1].double(), ref.precondition_noise(sigma), atol=1e-6)
    model_out = torch.tanh(net.seen[0].double()) + net.seen[1].double().reshape(-1, 1, 1, 1)
    assert torch.allclose(x0, ref.precondition_outputs(x, model_out, s4), atol=1e-6)


def test_guided_is_the_cfg_formula():
    def D(x, sigma, cond):
        return x * cond["class_labels"].reshape(-1, 1, 1, 1).float() + sigma.reshape(-1, 1, 1, 1)

    x = torch.randn(2, 1, 2, 2)
    sigma = torch.tensor([1.0, 2.0])
    cond = {"class_labels": torch.tensor([1, 2])}
    uncond = {"class_labels": torch.tensor([5, 5])}
    out = guided(D, 3.0, uncond)(x, sigma, cond)
    expected = D(x, sigma, uncond) + 3.0 * (D(x, sigma, cond) - D(x, sigma, uncond))
    assert torch.allclose(out, expected)
    assert guided(D, 1.0, uncond) is D
