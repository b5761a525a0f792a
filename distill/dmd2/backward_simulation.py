"""One training step's randomness and inputs, and backward simulation (DMD2 §4.5): a multi-step student is trained
on the inputs its own loop really feeds it. For each row, draw the student step k, run the generator k steps from
pure noise without gradient (re-noising each x0 with fresh noise), and train only the last call."""

import dataclasses
from dataclasses import dataclass

import torch

from distill.dmd2.config import DMD2Config


@dataclass
class Batch:
    """Everything random about one step, drawn up front from the run's generator (so resuming is exact)."""

    cond: dict  # the student's (and fake score's) condition
    k: torch.Tensor  # (N,) which student step each sample trains: every step, in equal shares
    noise: torch.Tensor  # (N, C, H, W) the student's starting noise
    renoise: torch.Tensor  # (K-1, N, C, H, W) fresh noise for backward simulation (K student steps)
    sigma_dm: torch.Tensor  # (N,) DM-loss noise level, t in [min_t, max_t]
    eps_dm: torch.Tensor
    sigma_gan_g: torch.Tensor  # (N,) noise level of generated images in the generator's GAN loss
    eps_gan_g: torch.Tensor
    sigma_fake: torch.Tensor  # (N,) fake-score denoising (and GAN fake) noise level, full range
    eps_fake: torch.Tensor
    real: torch.Tensor | None  # (N, C, H, W) real data in the denoiser's space
    real_cond: dict
    sigma_real: torch.Tensor | None
    eps_real: torch.Tensor | None
    real_k: torch.Tensor | None  # (N,) the student step the fake score is told for each real image (fake_per_step)
    pairs: tuple | None  # (noise, cond, teacher x0) for the regression loss


def take(batch: Batch, rows: torch.Tensor) -> Batch:
    """The batch restricted to the student samples in `rows` (a bool mask over N); the real data stays whole."""
    return dataclasses.replace(
        batch, cond={name: v[rows] for name, v in batch.cond.items()}, k=batch.k[rows], noise=batch.noise[rows],
        renoise=batch.renoise[:, rows], sigma_dm=batch.sigma_dm[rows], eps_dm=batch.eps_dm[rows],
        sigma_gan_g=batch.sigma_gan_g[rows], eps_gan_g=batch.eps_gan_g[rows], sigma_fake=batch.sigma_fake[rows],
        eps_fake=batch.eps_fake[rows])


def _per_sample(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return s.to(x).reshape(-1, *([1] * (x.ndim - 1)))  # (N,) -> (N, 1, 1, 1)


def cat_cond(*conds: dict) -> dict:
    """Batch-first condition dicts joined along the batch (one forward for several inputs)."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def trained_rows(sigma_in: torch.Tensor, cfg: DMD2Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) bool masks: the rows trained by distribution matching (those above anchor_sigma; all by default), and
    the rows the GAN loss sees (those, plus the anchored ones with anchor_gan)."""
    matched = sigma_in > cfg.anchor_sigma
    return matched, (torch.ones_like(matched) if cfg.anchor_gan else matched)


def student_input(generator, sigmas: torch.Tensor, batch: Batch, cfg: DMD2Config) -> torch.Tensor:
    """Each sample's generator input at its timestep k (DMD2 §4.5).

    k = 0: pure noise at the top sigma. Otherwise backward simulation: k student steps from noise without
    grad, each x0 = G(x, sigma_i) re-noised to sigma_{i+1} with fresh noise, so training sees what
    inference feeds the generator; without it, real data noised to sigma_k (DMD2's ablation). Step i runs
    only on the samples that go past it, so a batch costs what one sample per k would, times N / K.
    """
    k = batch.k.to(batch.noise.device)
    x = batch.noise * sigmas[0].item()  # (N, C, H, W)
    if int(k.max()) == 0:
        return x
    if not cfg.backward_simulation:
        noised_real = batch.real + _per_sample(sigmas[k], x) * batch.noise
        return torch.where(_per_sample(k, x) > 0, noised_real, x)
    with torch.no_grad():
        for i in range(int(k.max())):
            go_on = k > i  # the samples whose step lies past i
            x0 = generator(x[go_on], sigmas[i].to(x).expand(int(go_on.sum())),
                           {name: v[go_on] for name, v in batch.cond.items()})
            x[go_on] = x0.float() + sigmas[i + 1].item() * batch.renoise[i][go_on]
    return x


def _condition(teacher, labels) -> dict:
    """The teacher's condition for class ids (class teachers), captions (text teachers) or nothing."""
    if teacher.conditioning == "class":
        return teacher.cond(labels=labels)
    if teacher.conditioning == "text":
        return teacher.cond(prompts=list(labels))
    return teacher.cond()


def draw_batch(cfg: DMD2Config, teacher, real_data, pairs, num_student_steps: int, gen: torch.Generator,
               device, rank: int = 0, world: int = 1) -> Batch:
    """All the randomness of one step, from the run's generator, in a fixed order.

    Every process draws the global batch (world * batch_size) from the same generator and keeps its own
    slice: one random stream, so a resumed or re-sharded run sees the same data.
    """
    n, shape, schedule = cfg.batch_size * world, teacher.x_shape, teacher.denoiser.schedule
    mine = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)

    def randn(*lead):  # (*lead, N, C, H, W) -> this process's rows
        return torch.randn((*lead, n, *shape), generator=gen)[..., mine, :, :, :].to(device)

    def sigmas(lo=0.0, hi=1.0):
        return schedule.sigma_at_fraction(lo + (hi - lo) * torch.rand(n, generator=gen))[mine].to(device)

    images, labels = real_data if real_data is not None else (None, None)
    if teacher.conditioning == "class":
        cond_labels = torch.randint(0, teacher.num_classes, (n,), generator=gen)[mine]
    elif teacher.conditioning == "text":  # prompts are the real data's captions
        cond_labels = [labels[i] for i in torch.randint(0, len(labels), (n,), generator=gen)[mine].tolist()]
    else:
        cond_labels = None
    cond = _condition(teacher, cond_labels)
    # Every update trains every student step, on equal shares of the batch. The reference draws one k per GPU,
    # so its global batch (64-128 GPUs) mixes all steps too; one k per batch here would give each step a
    # quarter of the updates, and leave Adam's moments alternating between the steps' gradients.
    k = (torch.arange(n) % num_student_steps)[mine].to(device)
    noise = randn()
    renoise = randn(num_student_steps - 1) if cfg.backward_simulation else randn(0)
    sigma_dm, eps_dm = sigmas(cfg.min_t, cfg.max_t), randn()
    sigma_gan_g, eps_gan_g = sigmas(), randn()
    sigma_fake, eps_fake = sigmas(), randn()
    real, real_cond, sigma_real, eps_real, real_k = None, {}, None, None, None
    if images is not None:
        idx = torch.randint(0, len(images), (n,), generator=gen)[mine]
        real = images[idx].to(device)
        if tuple(real.shape[1:]) != tuple(shape):  # images of a latent teacher: encode to its space
            with torch.no_grad():
                real = teacher.encode(real).float()
        real_labels = None if labels is None else (labels[idx] if torch.is_tensor(labels)
                                                   else [labels[i] for i in idx.tolist()])
        real_cond = _condition(teacher, real_labels)
        sigma_real, eps_real = sigmas(), randn()
        real_k = k.clone()
        if num_student_steps > 1 and not cfg.backward_simulation:  # inputs are these real images, noised:
            cond = real_cond  # their condition (for k = 0 too, whose input is pure noise)
    batch_pairs = None
    if pairs is not None:
        idx = torch.randint(0, len(pairs[0]), (n,), generator=gen)[mine]
        p_noise, p_labels, p_x0 = pairs
        p_cond = _condition(teacher, p_labels[idx] if p_labels is not None else None)
        batch_pairs = (p_noise[idx].to(device), p_cond, p_x0[idx].to(device))
    return Batch(cond, k, noise, renoise, sigma_dm, eps_dm, sigma_gan_g, eps_gan_g, sigma_fake, eps_fake,
                 real, real_cond, sigma_real, eps_real, real_k, batch_pairs)
