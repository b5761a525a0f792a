"""DMD2's losses as small functions over the denoiser convention (docs/design.md §3); the loop alternates them.

All losses are computed in float32: the denoisers return fp32 even when the backbone runs under autocast.
"""

import torch
import torch.nn.functional as F


def dm_loss(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """Distribution-matching loss (DMD, Yin et al. 2024, eq. 7; DMD2's normalised form).

    `x` is the generator's output (with grad); `real_x0` / `fake_x0` are the real and fake scores'
    x0 predictions at a noised copy of x. The gradient w.r.t. x is g / (N C H W) with
    g = (x0_fake - x0_real) / mean_CHW |x - x0_real| per sample, NaNs/infs zeroed (the reference's
    nan_to_num); the MSE to a detached target x - g is the usual way to feed g to autograd.
    """
    with torch.no_grad():
        real_x0, fake_x0 = real_x0.float(), fake_x0.float()
        norm = (x.detach().float() - real_x0).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)  # (N, 1, 1, 1)
        g = torch.nan_to_num((fake_x0 - real_x0) / norm, nan=0.0, posinf=0.0, neginf=0.0)
    x = x.float()
    return 0.5 * F.mse_loss(x, (x - g).detach())


# Weightings of the x0 error that equal the MSE a VP model of each prediction type is trained with:
# eps = (x - x0) / sigma gives |d eps|^2 = |d x0|^2 / sigma^2; v gives (1 + sigma^2) / sigma^2 (docs/design.md §2).
def weighting_epsilon(sigma: torch.Tensor) -> torch.Tensor:
    return sigma**-2


def weighting_v(sigma: torch.Tensor) -> torch.Tensor:
    return (1 + sigma**2) / sigma**2


def weighting_sample(sigma: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(sigma)


WEIGHTINGS = {"epsilon": weighting_epsilon, "v_prediction": weighting_v, "sample": weighting_sample}


def denoising_loss(pred_x0: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, weighting) -> torch.Tensor:
    """The fake score's loss: ordinary denoising score matching on *detached* samples x0.

    `pred_x0` is the fake score's x0 prediction at x0 + sigma * noise. loss = mean_N( weighting(sigma) *
    mean_CHW (pred_x0 - x0)^2 ), where `weighting` maps (N,) sigmas to (N,) weights (see WEIGHTINGS: the
    teacher's own objective, so the fake score keeps training the way the teacher was trained).
    """
    err = (pred_x0.float() - x0.detach().float()).pow(2).mean(dim=tuple(range(1, x0.ndim)))  # (N,)
    return (weighting(sigma.float().flatten()) * err).mean()


def gan_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: softplus(-D(fake)) = -log sigmoid(D(fake))."""
    return F.softplus(-logits_fake.float()).mean()


def gan_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator (GAN head) loss: softplus(D(fake)) + softplus(-D(real)), each averaged."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()


def regression_loss(student_x0: torch.Tensor, teacher_x0: torch.Tensor) -> torch.Tensor:
    """The original DMD's regression loss on (noise, teacher ODE image) pairs.

    DMD (Yin et al., CVPR 2024) uses LPIPS here; LPIPS needs pretrained VGG/AlexNet weights, which cannot
    be fetched offline, so this is plain MSE. DMD2 drops the loss (the two time-scale rule replaces it).
    """
    return F.mse_loss(student_x0.float(), teacher_x0.detach().float())


def anchor_loss(student_x0: torch.Tensor, teacher_x0: torch.Tensor) -> torch.Tensor:
    """MSE between the student's x0 and the frozen teacher's x0 on the same input (DMD2Config.anchor_sigma)."""
    return F.mse_loss(student_x0.float(), teacher_x0.detach().float())
