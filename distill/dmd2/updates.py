"""The two updates of the two time-scale rule: the generator's (DM loss + GAN loss, every `dfake_gen_update_ratio`-th
step) and the fake score's (denoising loss on the generator's detached samples + the GAN head's loss on real data,
every step). Each is one function; the loop in train.py only alternates them."""

import contextlib
from dataclasses import dataclass

import torch

from distill.dmd2.backward_simulation import Batch, _per_sample, cat_cond, take, trained_rows
from distill.dmd2.config import DMD2Config
from distill.dmd2.fake_score import FakeScore
from distill.dmd2.losses import anchor_loss, denoising_loss, dm_loss, gan_d_loss, gan_g_loss, regression_loss
from distill.teachers.denoiser import Denoiser, guided
from distill.training import autocast, check_finite, optimizer_step


@dataclass
class Nets:
    """The networks of one DMD2 run (plain holder, no behaviour).

    `generator_train` / `fake_train` are what `accelerate` prepared (DDP wrappers when distributed); they
    are called once per update, by the forward whose loss trains them. Every other call (no-grad
    simulation, the frozen fake score inside the generator's losses) goes to the plain modules, so a DDP
    reducer never sees a second forward before its backward.
    """

    real: Denoiser  # frozen teacher
    generator: Denoiser
    fake: FakeScore  # fake score + GAN head
    generator_train: torch.nn.Module
    fake_train: torch.nn.Module
    guidance_scale: float
    uncond: object  # n -> the teacher's null condition (or None)
    weighting: object  # the fake score's denoising weighting (the teacher's own objective: Denoiser.loss_weighting)
    sigma0: float  # the student's first (top) noise level


@contextlib.contextmanager
def frozen(*modules):
    """Parameters of `modules` need no gradient inside (gradients still flow through them to inputs)."""
    flags = [(p, p.requires_grad) for m in modules if m is not None for p in m.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def generator_step(nets: Nets, opt, scaler, batch: Batch, x_in: torch.Tensor, sigma_in: torch.Tensor,
                   cfg: DMD2Config, step: int, accelerator, precision: str) -> tuple[dict, torch.Tensor]:
    """One generator update: DM loss (+ w_G * GAN loss, + regression) on the distribution-matched rows, the
    teacher anchor on the rows at sigma <= anchor_sigma. Returns logs and the detached output of the
    distribution-matched rows (what the fake score trains on)."""
    params = [p for p in nets.generator.parameters() if p.requires_grad]
    n, device = x_in.shape[0], x_in.device
    inputs, sigmas, cond = x_in, sigma_in, batch.cond
    if batch.pairs is not None:  # the regression pairs ride in the same forward (one DDP forward per update)
        p_noise, p_cond, p_target = batch.pairs
        inputs = torch.cat([x_in, p_noise * nets.sigma0])
        sigmas = torch.cat([sigma_in, sigma_in.new_full((len(p_noise),), nets.sigma0)])
        cond = cat_cond(batch.cond, p_cond)
    with autocast(device, precision):
        out = nets.generator_train(inputs, sigmas, cond)
    x_all = out[:n].float()  # (N, C, H, W) the student's x0, with grad
    matched, gan_rows = trained_rows(sigma_in, cfg)
    x, mb = x_all[matched], take(batch, matched)
    m = x.shape[0]
    # DM loss (DMD2 eq. 2 / DESIGN §3): real (CFG) and fake x0 at a noised copy of x.
    x_t = (x + _per_sample(mb.sigma_dm, x) * mb.eps_dm).detach()
    with torch.no_grad(), autocast(device, precision):
        real_x0 = guided(nets.real, nets.guidance_scale, nets.uncond(m))(x_t, mb.sigma_dm, mb.cond)
        fake_x0, _ = nets.fake(x_t, mb.sigma_dm, mb.cond, logits=False, step=mb.k)
    losses = {"dm": dm_loss(x, real_x0, fake_x0)}
    total = losses["dm"]
    if nets.fake.head is not None and cfg.gan_g_weight > 0:
        # Non-saturating GAN loss through the frozen fake score and head, back to x.
        xg, gb = x_all[gan_rows], take(batch, gan_rows)
        # Frozen so the backward skips the fake score's weight gradients; not under gradient checkpointing, whose
        # recomputation in the backward (after `frozen` has ended) must see the same requires_grad as the forward.
        # The fake score's stray gradients are then dropped by its own update's zero_grad.
        keep = contextlib.nullcontext() if cfg.gradient_checkpointing else frozen(nets.fake)
        with keep, autocast(device, precision):
            _, logits = nets.fake(xg + _per_sample(gb.sigma_gan_g, xg) * gb.eps_gan_g, gb.sigma_gan_g, gb.cond,
                                  step=gb.k)
        losses["gan_g"] = gan_g_loss(logits)
        total = total + cfg.gan_g_weight * losses["gan_g"]
    if not bool(matched.all()):
        # The low-noise steps keep to the teacher's own (unguided) x0 on the same inputs.
        anchored = ~matched
        with torch.no_grad(), autocast(device, precision):
            target = nets.real(x_in[anchored], sigma_in[anchored], {k: v[anchored] for k, v in batch.cond.items()})
        losses["anchor"] = anchor_loss(x_all[anchored], target)
        total = total + cfg.anchor_weight * losses["anchor"]
    if batch.pairs is not None:
        # The original DMD's regression: G(noise at the top sigma) against the teacher's ODE output.
        losses["regression"] = regression_loss(out[n:], p_target)
        total = total + cfg.regression_weight * losses["regression"]
    check_finite(losses, step, accelerator)
    grad_norm = optimizer_step(total, opt, scaler, params, cfg.grad_clip, accelerator)
    return {f"loss_{k}": v.item() for k, v in losses.items()} | {"grad_norm_generator": grad_norm}, x_all.detach()


def fake_step(nets: Nets, opt, scaler, batch: Batch, x_gen: torch.Tensor, cfg: DMD2Config, step: int,
              accelerator, precision: str, tracked: torch.Tensor | None = None) -> dict:
    """One fake-score update: denoising loss on detached generator samples (+ w_D * GAN head loss on real data).

    Generated and real images go through the fake score in one forward: its x0 on the generated half
    feeds the denoising loss, the head's logits on both halves the discriminator loss. `tracked` (a bool
    mask over the generated rows; None = all): the rows the denoising loss uses; the others are fakes to the
    GAN head only (anchor_gan).
    """
    params = [p for group in opt.param_groups for p in group["params"]]
    n = x_gen.shape[0]
    x_gen = x_gen.detach().float()
    inputs = x_gen + _per_sample(batch.sigma_fake, x_gen) * batch.eps_fake
    sigmas, cond, k = batch.sigma_fake, batch.cond, batch.k
    if nets.fake.head is not None:
        inputs = torch.cat([inputs, batch.real + _per_sample(batch.sigma_real, batch.real) * batch.eps_real])
        sigmas = torch.cat([sigmas, batch.sigma_real])
        cond = cat_cond(batch.cond, batch.real_cond)
        k = torch.cat([k, batch.real_k])
    with autocast(x_gen.device, precision):
        x0, logits = nets.fake_train(inputs, sigmas, cond, step=k)
    rows = slice(None) if tracked is None else tracked
    losses = {"fake": denoising_loss(x0[:n][rows], x_gen[rows], batch.sigma_fake[rows], nets.weighting)}
    total = losses["fake"]
    if logits is not None:
        losses["gan_d"] = gan_d_loss(logits[n:], logits[:n])
        total = total + cfg.gan_d_weight * losses["gan_d"]
    check_finite(losses, step, accelerator)
    grad_norm = optimizer_step(total, opt, scaler, params, cfg.grad_clip, accelerator)
    return {f"loss_{k}": v.item() for k, v in losses.items()} | {"grad_norm_fake": grad_norm}
