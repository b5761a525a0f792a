"""DMD2 training (Yin et al., "Improved Distribution Matching Distillation", NeurIPS 2024; DESIGN.md §3).

Three networks start from the teacher: the *real score* (the frozen teacher, with CFG), the *fake score*
(a trainable copy that tracks the student's output distribution, with a GAN head on its bottleneck) and
the *generator* (the student, a trainable copy). Each step updates the fake score; every
`dfake_gen_update_ratio`-th step also updates the generator first (the two time-scale update rule).
Multi-step students use fixed timesteps and backward simulation. The result is a student bundle
(bundle.py) in out_dir/student; out_dir/state.safetensors makes re-running the same call resume.
"""

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .bundle import base_manifest, write_bundle
from .denoiser import Denoiser, guided
from .errors import UserError
from .gan_head import BottleneckTap, FakeScore, GANHead
from .losses import anchor_loss, denoising_loss, dm_loss, gan_d_loss, gan_g_loss, regression_loss
from .training import RESUMABLE_CHANGES, autocast, check_finite, optimizer_step, resolve_precision, run_loop


@dataclass
class DMD2Config:
    steps: int = 20000
    batch_size: int = 32
    lr_generator: float = 2e-6  # the reference's ImageNet-64 setting; 1e-5 for SD 1.5
    lr_fake: float = 2e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    warmup: int = 500  # linear LR warm-up steps, then `lr_schedule`
    lr_schedule: str = "constant"  # "constant" (the reference's) or "cosine": down to lr_min_ratio x lr at `steps`
    lr_min_ratio: float = 0.1
    dfake_gen_update_ratio: int = 5  # two time-scale rule: the generator updates every N-th step (10 for SD 1.5)
    guidance_scale: float | None = None  # real-score CFG; None = the teacher's default
    use_gan: bool = True
    gan_g_weight: float = 3e-3
    gan_d_weight: float = 1e-2  # the GAN is off when use_gan is False or both weights are 0
    min_t: float = 0.02  # DM loss noise range, as fractions of the teacher's time range (schedule.sigma_at_fraction)
    max_t: float = 0.98
    # The student's steps in the teacher's own time: DDPM timesteps (999, 749, 499, 249), EDM sigmas (80, 10, 1.5,
    # 0.3), flow times (1.0, 0.75, 0.5, 0.25; shifted by the scheduler's shift). None: one step from the top.
    student_timesteps: tuple[float, ...] | None = None
    backward_simulation: bool = True  # multi-step inputs from the student's own steps (else noised real data)
    regression_weight: float = 0.0  # the original DMD's regression loss (needs regression pairs); off in DMD2
    # Student steps whose sigma is at most this (e.g. a 4-step student's last one) learn the frozen teacher's own
    # x0 on their backward-simulated inputs (MSE, weight `anchor_weight`) instead of DM + GAN, and their outputs
    # stay out of the fake score's training. At low noise the teacher's one call is already near the data, and
    # distribution matching (which pins only the mixture of all steps' outputs) drifts it (distill.steps_probe).
    # 0 trains every step by distribution matching (the reference).
    anchor_sigma: float = 0.0
    anchor_weight: float = 10.0  # on the digits teacher this keeps the anchored step ~0.015 RMS from the teacher
    # The anchored steps also take the GAN loss (w_G), and the GAN head sees their outputs as fakes: the last
    # step's output is what users get, and without it only the teacher (not the real data) shapes that output.
    anchor_gan: bool = False
    # Condition the fake score (and so the GAN head) on the student step: a learned vector per step added to its
    # time embedding, zero at the start. A shared fake score models the *mixture* of all steps' outputs, so each
    # step's DM gradient is measured against the others' outputs too; conditioned, each step is matched to the
    # data on its own. Real images in the GAN head's loss get every step's vector in turn.
    fake_per_step: bool = False
    ema_decay: float | None = None
    # A student bundle of this teacher (e.g. a 1-step one) whose network the generator starts from instead of
    # the teacher's: a multi-step student then starts with a first step that already makes samples.
    init_generator: str | None = None
    lora_rank: int | None = None  # LoRA (peft) on the generator only
    mixed_precision: str | None = None  # "no" | "bf16" | "fp16"; None = bf16 on CUDA, no on CPU
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    # Checkpoint selection: every N steps (and at the last) the caller's `score` rates the generator (lower is
    # better; for the digits teacher, FD against the held-out split on noise the evaluation never uses) and the
    # bundle ships the best-rated weights rather than the last. 0 ships the last step.
    select_every: int = 0


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


def gan_enabled(cfg: DMD2Config) -> bool:
    return cfg.use_gan and (cfg.gan_g_weight > 0 or cfg.gan_d_weight > 0)


def lr_at(step: int, lr: float, cfg: DMD2Config) -> float:
    """Linear warm-up over `warmup` steps, then constant (the reference's schedule) or a cosine down to
    lr_min_ratio x lr at the last step (a decaying rate lets the adversarial game settle instead of wandering)."""
    if step < cfg.warmup:
        return lr * min(1.0, (step + 1) / cfg.warmup)  # this form, bit for bit the schedule earlier runs used
    if cfg.lr_schedule == "constant":
        return lr
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - 1 - cfg.warmup))
    return lr * (cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def student_times(cfg: DMD2Config, schedule) -> list[float]:
    """The student's steps in the teacher's own time (the config's, or one step from the top); integers stay ints."""
    times = [schedule.top_time()] if cfg.student_timesteps is None else list(cfg.student_timesteps)
    return [int(t) if float(t).is_integer() and schedule.kind == "vp" else float(t) for t in times]


def served_nfes(timesteps) -> dict[int, list]:
    """NFE -> timesteps the student serves: all of its steps, and the first alone (always pure noise in)."""
    timesteps = list(timesteps)
    return {1: timesteps[:1], len(timesteps): timesteps}


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
        with frozen(nets.fake), autocast(device, precision):
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


@torch.no_grad()
def make_regression_pairs(teacher, n: int, nfe: int = 25, seed: int = 0, guidance: float | None = None,
                          batch_size: int = 64) -> tuple:
    """The original DMD's (noise, labels, teacher ODE output) pairs, from DPM-Solver++(2M) at `nfe` calls."""
    from .sample import noise_for
    from .samplers import sample

    labels = torch.arange(n) % teacher.num_classes if teacher.conditioning == "class" else None
    scale = teacher.guidance_scale if guidance is None else guidance
    noises, outs = [], []
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        noise = noise_for(seed, start, count, teacher.x_shape, teacher.device)
        cond = teacher.cond(labels=labels[start:start + count]) if labels is not None else teacher.cond()
        D = guided(teacher.denoiser, scale, teacher.uncond(count))
        outs.append(sample(D, noise, teacher.denoiser.schedule, "dpmpp-2m", nfe, cond).cpu())
        noises.append(noise.cpu())
    return torch.cat(noises), labels, torch.cat(outs)


def check_setup(cfg: DMD2Config, teacher, real_data, pairs, score=None) -> None:
    """Fail before any work on settings that cannot run."""
    schedule = teacher.denoiser.schedule
    ts = student_times(cfg, schedule)
    student_sigmas = schedule.student_sigmas(ts)  # checks them against the teacher's own time
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.dfake_gen_update_ratio < 1:
        raise UserError("steps, batch_size and dfake_gen_update_ratio must be positive")
    if not 0 <= cfg.min_t < cfg.max_t <= 1:
        raise UserError(f"need 0 <= min_t < max_t <= 1, got {cfg.min_t}, {cfg.max_t}")
    if gan_enabled(cfg) and real_data is None:
        raise UserError("the GAN loss needs real data; pass real_data or set use_gan=False")
    if len(ts) > 1 and not cfg.backward_simulation and real_data is None:
        raise UserError("a multi-step student without backward simulation is trained on noised real data; pass it")
    if teacher.conditioning == "text" and real_data is None:
        raise UserError("a text-to-image teacher needs (images, captions) as real_data: captions are the prompts")
    if cfg.regression_weight > 0 and pairs is None:
        raise UserError("regression_weight > 0 needs regression pairs (see make_regression_pairs)")
    if cfg.lr_schedule not in ("constant", "cosine") or not 0 <= cfg.lr_min_ratio <= 1:
        raise UserError(f"lr_schedule must be constant or cosine and lr_min_ratio in [0, 1]; got {cfg.lr_schedule!r}, "
                        f"{cfg.lr_min_ratio}")
    if cfg.anchor_sigma < 0 or cfg.anchor_weight < 0:
        raise UserError(f"anchor_sigma and anchor_weight must be >= 0; got {cfg.anchor_sigma}, {cfg.anchor_weight}")
    if cfg.anchor_gan and (cfg.anchor_sigma <= 0 or not gan_enabled(cfg)):
        raise UserError("anchor_gan gives the GAN loss to the anchored steps: it needs anchor_sigma > 0 and the GAN "
                        f"(use_gan with a weight > 0); got anchor_sigma {cfg.anchor_sigma}, use_gan {cfg.use_gan}")
    if cfg.fake_per_step and len(ts) < 2:
        raise UserError("fake_per_step conditions the fake score on the student step: it needs a multi-step student "
                        "(student_timesteps with two or more steps)")
    if cfg.anchor_sigma > 0:
        first_sigma = float(student_sigmas[0])
        if cfg.anchor_sigma >= first_sigma:
            raise UserError(f"anchor_sigma {cfg.anchor_sigma} would anchor the first student step (sigma "
                            f"{first_sigma:.4g}) too, leaving nothing to distribution matching: set it below that")
        if cfg.batch_size < len(ts):
            raise UserError(f"anchor_sigma needs every student step in every process's batch: batch_size "
                            f"{cfg.batch_size} < {len(ts)} steps")
    if cfg.select_every < 0:
        raise UserError(f"select_every must be 0 (ship the last step) or a number of steps; got {cfg.select_every}")
    if cfg.select_every and score is None:
        raise UserError("select_every needs a way to rate checkpoints, which fewstep has for the digits teacher only "
                        "(FD against its held-out split); leave select_every at 0 for other teachers")
    if cfg.select_every and cfg.ema_decay is not None:
        raise UserError("select_every and ema_decay both choose the weights to ship; set one of them")
    if real_data is not None:
        images, labels = real_data
        if labels is not None and len(labels) != len(images):
            raise UserError(f"real data has {len(images)} images but {len(labels)} labels")
        if teacher.conditioning == "class" and labels is None:
            raise UserError("a class-conditional teacher needs the real images' labels")


def add_lora(backbone, rank: int) -> None:
    """Wrap the backbone's network in a peft LoRA model (rank r, alpha r) on the modules its adapter names; only
    the LoRA weights train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("lora_rank needs peft: pip install 'fewstep[lora]'") from None
    names = {name for name, _ in backbone.network.named_modules()}
    wanted = [t for t in backbone.lora_targets if any(n == t or n.endswith("." + t) for n in names)]
    if not wanted:
        raise UserError(f"lora_rank: none of the LoRA target modules ({', '.join(backbone.lora_targets) or 'none'}) "
                        f"is in {type(backbone.network).__name__}; declare lora_targets in the teacher's spec")
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=wanted, init_lora_weights="gaussian")
    backbone.set_network(get_peft_model(backbone.network, config))


def start_from_student(generator, bundle_dir: str) -> None:
    """Load a student bundle's network into the generator, strictly: same architecture and prediction type."""
    from .bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    if bundle.denoiser.prediction_type != generator.prediction_type:
        raise UserError(f"init_generator {bundle_dir} predicts {bundle.denoiser.prediction_type}, this teacher "
                        f"{generator.prediction_type}: start from a student of this teacher")
    try:
        generator.net.network.load_state_dict(bundle.denoiser.net.network.state_dict(), strict=True)
    except RuntimeError as e:
        raise UserError(f"init_generator {bundle_dir} is not a student of this teacher (its network differs: "
                        f"{str(e).splitlines()[0]})") from None


def student_backbone(generator, weights: dict | None):
    """The backbone to ship: `weights` (EMA or selected) if given, LoRA merged in."""
    net = copy.deepcopy(generator.net)
    if weights is not None:
        net.load_state_dict(weights)
    if hasattr(net.network, "merge_and_unload"):  # a peft model
        net.set_network(net.network.merge_and_unload())
    return net


def student_manifest(cfg: DMD2Config, teacher) -> dict:
    """The bundle manifest (bundle.py) for a DMD2 student of this teacher."""
    schedule = teacher.denoiser.schedule
    nfe = {str(n): {"timesteps": ts, "sigmas": [float(s) for s in schedule.student_sigmas(ts)]}
           for n, ts in served_nfes(student_times(cfg, schedule)).items()}
    return base_manifest(teacher, "dmd2", nfe, "fresh_noise", asdict(cfg))


def train_dmd2(cfg: DMD2Config, teacher, real_data: tuple | None, out_dir: str | Path,
               regression_pairs: tuple | None = None, progress: bool = True, accelerator=None,
               score: Callable | None = None) -> Path:
    """Distil `teacher` with DMD2; returns out_dir/student (a bundle). Re-running the same call resumes.

    real_data: (images (M, C, H, W) in [-1, 1] (or already in the denoiser's space), labels (M,) or captions)
    for the GAN loss (and for multi-step training without backward simulation). regression_pairs: see
    make_regression_pairs (only with regression_weight > 0). `accelerator`: an accelerate.Accelerator
    (`accelerate launch` gives DDP / FSDP); by default a single-process one on the teacher's device.
    score(generator, sigmas) -> float, lower is better: rates the generator for `select_every`.
    """
    from accelerate import Accelerator

    out_dir = Path(out_dir)
    check_setup(cfg, teacher, real_data, regression_pairs, score)
    if accelerator is None:
        accelerator = Accelerator(cpu=teacher.device.type == "cpu")
    device = accelerator.device
    teacher.to(device)
    precision = resolve_precision(cfg.mixed_precision, device)
    torch.manual_seed(cfg.seed)
    schedule = teacher.denoiser.schedule

    student_sigmas = schedule.student_sigmas(student_times(cfg, schedule)).to(device)  # (K,) float64

    # The three networks: the teacher stays frozen; fake score and generator are trainable copies.
    real = teacher.denoiser.eval().requires_grad_(False)
    fake_denoiser = copy.deepcopy(real).train().requires_grad_(True)
    generator = copy.deepcopy(real).train().requires_grad_(True)
    if cfg.init_generator:
        start_from_student(generator, cfg.init_generator)
    if cfg.lora_rank:
        add_lora(generator.net, cfg.lora_rank)
    head = None
    if gan_enabled(cfg):
        tap = BottleneckTap(fake_denoiser.net)
        with torch.no_grad():  # one probe forward gives the bottleneck's shape
            probe = torch.zeros(1, *teacher.x_shape, device=device)
            fake_denoiser(probe, student_sigmas[:1].float(), _probe_cond(teacher, real_data))
        head = GANHead.for_features(tap.pop()).to(device)
        tap.remove()
    fake = FakeScore(fake_denoiser, head, len(student_sigmas) if cfg.fake_per_step else None)

    adamw = dict(betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    opt_g = torch.optim.AdamW([p for p in generator.parameters() if p.requires_grad], lr=cfg.lr_generator, **adamw)
    opt_f = torch.optim.AdamW(fake.parameters(), lr=cfg.lr_fake, **adamw)  # head and fake backbone: one optimizer
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"):
        # The loop calls the unwrapped modules for no-grad and frozen forwards, which is right for DDP only:
        # under FSDP / DeepSpeed their parameters are shards. Fail clearly rather than train on shards.
        raise UserError(f"accelerate's {accelerator.distributed_type.name} mode is not supported by fewstep's DMD2 "
                        "loop yet; use plain multi-GPU (DDP) — with --set lora_rank=64 for SDXL-size teachers")
    generator_train, fake_train, opt_g, opt_f = accelerator.prepare(generator, fake, opt_g, opt_f)
    scale = teacher.guidance_scale if cfg.guidance_scale is None else cfg.guidance_scale
    nets = Nets(real, generator, fake, generator_train, fake_train, scale, teacher.uncond,
                real.loss_weighting, float(student_sigmas[0]))
    scaler_g = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    scaler_f = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ema = ({k: v.detach().clone() for k, v in generator.net.state_dict().items()}
           if cfg.ema_decay is not None else None)
    gen = torch.Generator().manual_seed(cfg.seed)
    counts = {"generator_updates": 0, "fake_updates": 0}
    # select_every: the best-rated generator so far, and the seconds ratings took (they count in train_seconds)
    best = {"score": math.inf, "step": -1, "weights": None, "seconds": 0.0}

    def get_state() -> dict:
        return {"generator": generator.net.state_dict(), "fake": fake.state_dict(), "opt_generator": opt_g.state_dict(),
                "opt_fake": opt_f.state_dict(), "scaler_generator": scaler_g.state_dict(),
                "scaler_fake": scaler_f.state_dict(), "ema": ema, "gen": gen.get_state(), "counts": dict(counts),
                "best": best if cfg.select_every else None}

    def set_state(state: dict) -> None:
        nonlocal ema
        generator.net.load_state_dict(state["generator"])
        fake.load_state_dict(state["fake"])
        opt_g.load_state_dict(state["opt_generator"])
        opt_f.load_state_dict(state["opt_fake"])
        scaler_g.load_state_dict(state["scaler_generator"])
        scaler_f.load_state_dict(state["scaler_fake"])
        ema = state["ema"] if ema is None else {k: v.to(device) for k, v in state["ema"].items()}
        gen.set_state(state["gen"])
        counts.update(state["counts"])
        if cfg.select_every:
            weights = state["best"]["weights"]  # None when no rating happened before the checkpoint
            best.update(state["best"], weights=weights and {k: v.to(device) for k, v in weights.items()})

    def train_step(step: int) -> dict:
        for g in opt_g.param_groups:
            g["lr"] = lr_at(step, cfg.lr_generator, cfg)
        for g in opt_f.param_groups:
            g["lr"] = lr_at(step, cfg.lr_fake, cfg)
        pairs = regression_pairs if cfg.regression_weight > 0 else None
        batch = draw_batch(cfg, teacher, real_data, pairs, len(student_sigmas), gen, device,
                           accelerator.process_index, accelerator.num_processes)
        with autocast(device, precision):
            x_in = student_input(generator, student_sigmas, batch, cfg).float()
        sigma_in = student_sigmas[batch.k].float()  # (N,)
        logs = {}
        matched, seen = trained_rows(sigma_in, cfg)  # seen: the GAN's rows (matched ones included), what the fake
        # score's forward sees; its denoising loss keeps to the matched ones
        if step % cfg.dfake_gen_update_ratio == 0:  # two time-scale rule
            g_logs, x_gen = generator_step(nets, opt_g, scaler_g, batch, x_in, sigma_in, cfg, step, accelerator,
                                           precision)
            logs |= g_logs
            x_gen = x_gen[seen]
            counts["generator_updates"] += 1
            if ema is not None:
                with torch.no_grad():
                    for k, v in generator.net.state_dict().items():
                        ema[k].lerp_(v, 1 - cfg.ema_decay) if v.is_floating_point() else ema[k].copy_(v)
        else:
            with torch.no_grad(), autocast(device, precision):
                x_gen = generator(x_in[seen], sigma_in[seen], {k: v[seen] for k, v in batch.cond.items()})
        logs |= fake_step(nets, opt_f, scaler_f, take(batch, seen), x_gen, cfg, step, accelerator, precision,
                          tracked=matched[seen])
        counts["fake_updates"] += 1
        if cfg.select_every and ((step + 1) % cfg.select_every == 0 or step + 1 == cfg.steps):
            logs |= select(step + 1)
        return logs | counts | {"lr_generator": lr_at(step, cfg.lr_generator, cfg),
                                "lr_fake": lr_at(step, cfg.lr_fake, cfg)}

    def select(step: int) -> dict:
        """Rate the generator after `step` steps; keep its weights when they are the best so far (main process:
        it alone writes the bundle). The score draws from its own generator, so training's randomness is
        unchanged."""
        if not accelerator.is_main_process:
            return {}
        t0 = time.perf_counter()
        generator.eval()
        with torch.no_grad(), autocast(device, precision):
            value = float(score(generator, student_sigmas))
        generator.train()
        if math.isfinite(value) and value < best["score"]:  # a NaN rating never wins
            best.update(score=value, step=step,
                        weights={k: v.detach().clone() for k, v in generator.net.state_dict().items()})
        best["seconds"] += time.perf_counter() - t0
        # the record's "step" is the 0-based index of the step just run; selection_best_step counts steps done
        return {"selection_score": value, "selection_best_step": best["step"], "log": True}

    try:
        step, elapsed = run_loop(out_dir=out_dir, config=asdict(cfg), defaults=asdict(DMD2Config()), steps=cfg.steps,
                                 checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every,
                                 accelerator=accelerator, train_step=train_step, get_state=get_state,
                                 set_state=set_state, progress=progress, desc="dmd2",
                                 # a cosine LR is a function of `steps`: a resumed run must keep it
                                 resumable=tuple(k for k in RESUMABLE_CHANGES
                                                 if k != "steps" or cfg.lr_schedule == "constant"))
    finally:
        if fake.tap is not None:
            fake.tap.remove()
        if fake.steps is not None:
            fake.steps.handle.remove()

    manifest = student_manifest(cfg, teacher)
    manifest["training"] |= {"train_seconds": round(elapsed, 1), "steps_done": step, **counts,
                             "processes": accelerator.num_processes}
    selected = cfg.select_every and best["weights"] is not None  # else no finite rating: the last step ships
    if cfg.select_every:
        manifest["training"] |= {"selected_step": best["step"] if selected else None,
                                 "selection_score": best["score"] if selected else None,
                                 "selection_seconds": round(best["seconds"], 1)}
    bundle = out_dir / "student"
    if accelerator.is_main_process:
        write_bundle(bundle, student_backbone(generator, best["weights"] if selected else ema), manifest)
    accelerator.wait_for_everyone()
    return bundle


def _probe_cond(teacher, real_data) -> dict:
    if teacher.conditioning == "class":
        return teacher.cond(labels=[0])
    if teacher.conditioning == "text":
        return teacher.cond(prompts=[str(real_data[1][0])])
    return teacher.cond()
