"""SFD: simple and fast distillation of a teacher's ODE trajectory into a K-step Euler student
(Zhou et al., "Simple and Fast Distillation of Diffusion Models", NeurIPS 2024; DESIGN.md §4).

A trainable copy of the teacher (the student) walks its own Euler trajectory through a few timestamps; after
each of its steps the state is pulled (L1) towards the teacher's state at the same timestamp, taken from a
fresh DPM-Solver++(3M) trajectory with `teacher_steps` solver steps between consecutive student timestamps.
No training data is needed: every batch is fresh noise. The optimizer steps after every student step, and
the student's next step starts from its own (detached) output. The loop, checkpoints and resume are the
shared ones (training.py); the result is a student bundle (bundle.py) with renoise "none".
"""

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .bundle import base_manifest, write_bundle
from .denoiser import guided
from .errors import UserError
from .nfe_condition import NFEConditioned, NFEEmbedding, time_embed_dim
from .samplers import dpmpp_states
from .schedule import sigmas_karras
from .training import autocast, check_finite, optimizer_step, resolve_precision, run_loop

SFD_NFES = (2, 3, 4, 5)


@dataclass
class SFDConfig:
    nfe: int = 4  # student network calls, 2..5
    nfes: tuple[int, ...] = ()  # SFD-v: one student for all of these (each batch draws one); () = plain SFD
    # The second stage (nfe = 1): an SFD / SFD-v student bundle, sampled at `source_nfe`, is the teacher.
    source: str | None = None
    source_nfe: int = 5
    perceptual_weight: float = 1.0  # the offline perceptual term (perceptual_loss) next to L1
    afs: bool = True  # analytical first step: one more timestamp, no network call for it
    teacher_steps: int = 4  # DPM-Solver++(3M) steps between consecutive student timestamps
    # The student's sigma range. None: SFD's 0.006 (raised from EDM's 0.002) and EDM's 80, clipped to what the
    # teacher's schedule reaches (SD-style schedules stop at ~0.03); values you set must lie inside it.
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float = 7.0
    steps: int = 300  # batches, each a fresh teacher trajectory per sample
    batch_size: int = 64
    lr: float = 5e-5  # the reference's CIFAR-10 setting; 1e-5 for ImageNet-64
    lr_drop_at: float = 0.5  # LR x0.1 from this fraction of `steps` on
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 10.0
    guidance_scale: float | None = None  # the teacher's CFG for its trajectories; None = its default
    prompts: str | None = None  # text-to-image teachers: a file of prompts, one per line (each sample draws one)
    mixed_precision: str | None = None  # None = bf16 on CUDA, fp32 on CPU
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 1


def student_sigmas(nfe: int, afs: bool, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """The student's timestamps (float64, decreasing, ending at sigma_min): a polynomial (rho) grid with nfe
    intervals, one more with AFS. E.g. NFE 2 with AFS: 80, 10.93, 0.670, 0.006 (DESIGN.md §4)."""
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


def perceptual_loss(x: torch.Tensor, y: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """An offline stand-in for LPIPS (whose VGG/AlexNet weights cannot be fetched here): L1 between image
    gradients (edges) and between 2x, 4x... average-pooled copies (coarse structure). It deliberately does not
    use the digits classifier, whose features are the evaluation metric's."""
    loss = x.new_zeros(())
    for level in range(levels):
        if level:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
            loss = loss + F.l1_loss(x, y)
        if min(x.shape[-2:]) < 2:
            break
        loss = loss + F.l1_loss(x.diff(dim=-1), y.diff(dim=-1)) + F.l1_loss(x.diff(dim=-2), y.diff(dim=-2))
    return loss


def sfd_grids(schedule, nfe: int, cfg: SFDConfig, sigma_min: float, sigma_max: float, device):
    """(student timestamps, teacher grid) for one NFE. A network that takes integer timesteps is asked only at the
    schedule's own points: both grids are moved to the nearest of them (schedule.snap), and must stay distinct."""
    coarse = schedule.snap(student_sigmas(nfe, cfg.afs, sigma_min, sigma_max, cfg.rho))
    fine = schedule.snap(teacher_sigmas(nfe, cfg.afs, cfg.teacher_steps, sigma_min, sigma_max, cfg.rho))
    if bool((fine[1:] >= fine[:-1]).any()):
        raise UserError(f"NFE {nfe} with teacher_steps {cfg.teacher_steps}: on this network's integer timesteps two "
                        "grid points coincide; lower teacher_steps or raise sigma_min")
    return coarse, fine.to(device)


def check_setup(cfg: SFDConfig, teacher) -> None:
    """Fail before any work on settings that cannot run, naming what is allowed."""
    if cfg.nfe == 1 and not cfg.nfes:
        raise UserError("--nfe 1 is SFD's second stage: it distils an SFD or SFD-v student (sampled at NFE "
                        f"{cfg.source_nfe}) into one step; give that student with --source DIR (train_sfd_one_step)")
    if not isinstance(cfg.nfes, (list, tuple)):
        raise UserError(f"nfes must be a list of NFEs, e.g. [2, 3, 4, 5]; got {cfg.nfes!r}")
    for nfe in cfg.nfes or (cfg.nfe,):
        if nfe not in SFD_NFES:
            raise UserError(f"SFD trains students for NFE {', '.join(map(str, SFD_NFES))} (and 1 through the "
                            f"one-step second stage); got --nfe {nfe}")
    schedule = teacher.denoiser.schedule
    lo, hi = schedule.sigma_min, schedule.sigma_max
    sigma_min, sigma_max = sigma_range(cfg, teacher)
    if not lo <= sigma_min < sigma_max <= hi:
        raise UserError(f"the teacher's schedule reaches sigma {lo:.4g} .. {hi:.4g}; sigma_min and sigma_max must "
                        f"lie inside it (got {sigma_min:g} .. {sigma_max:g}): set them with --set, or leave them out")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.teacher_steps < 1:
        raise UserError("steps, batch_size and teacher_steps must be positive")
    if teacher.conditioning == "text":
        read_prompts(cfg.prompts)
    elif cfg.prompts:
        raise UserError(f"prompts are for text-to-image teachers; this one is conditioned on {teacher.conditioning}")


def read_prompts(path: str | None) -> list[str]:
    """The prompts of a text teacher's trajectories: one per non-empty line of `path`."""
    if not path:
        raise UserError("SFD on a text-to-image teacher draws its trajectories' prompts from a file: give --prompts "
                        "FILE (one prompt per line)")
    try:
        prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise UserError(f"cannot read the prompts file {path}: {e.strerror}") from None
    if not prompts:
        raise UserError(f"the prompts file {path} has no prompt (one per line)")
    return prompts


def draw_condition(teacher, n: int, gen: torch.Generator, prompts: list[str] | None = None
                   ) -> tuple[dict, dict | None]:
    """A random condition for the student and the teacher's null condition (for CFG), or ({}, None): class labels,
    or (text teachers) prompts drawn from `prompts`."""
    if teacher.conditioning == "class":
        labels = torch.randint(0, teacher.num_classes, (n,), generator=gen)
        return teacher.cond(labels=labels), teacher.uncond(n)
    if teacher.conditioning == "text":
        chosen = [prompts[i] for i in torch.randint(0, len(prompts), (n,), generator=gen).tolist()]
        with torch.no_grad():
            return teacher.cond(prompts=chosen), teacher.uncond(n)
    return teacher.cond(), None


def train_sfd(cfg: SFDConfig, teacher, out_dir: str | Path, progress: bool = True, accelerator=None) -> Path:
    """Distil `teacher` into an SFD student for `cfg.nfe` calls; returns out_dir/student. Re-running resumes."""
    from accelerate import Accelerator

    out_dir = Path(out_dir)
    check_setup(cfg, teacher)
    if accelerator is None:
        accelerator = Accelerator(cpu=teacher.device.type == "cpu")
    device = accelerator.device
    teacher.to(device)
    precision = resolve_precision(cfg.mixed_precision, device)
    torch.manual_seed(cfg.seed)
    sigma_min, sigma_max = sigma_range(cfg, teacher)
    variable = bool(cfg.nfes)  # SFD-v
    nfes = tuple(cfg.nfes) if variable else (cfg.nfe,)
    grids = {n: sfd_grids(teacher.denoiser.schedule, n, cfg, sigma_min, sigma_max, device) for n in nfes}
    real = teacher.denoiser.eval().requires_grad_(False)
    student = copy.deepcopy(real).train().requires_grad_(True)
    embedding = None
    if variable:  # the step count as an extra condition, zero at the start (student == teacher)
        embedding = NFEEmbedding(time_embed_dim(student.net)).to(device)
        student.net = NFEConditioned(student.net, embedding)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    student_train, opt = accelerator.prepare(student, opt)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    scale = teacher.guidance_scale if cfg.guidance_scale is None else cfg.guidance_scale
    gen = torch.Generator().manual_seed(cfg.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
    params = list(student.parameters())
    prompts = read_prompts(cfg.prompts) if teacher.conditioning == "text" else None

    def get_state() -> dict:
        return {"student": student.net.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict(),
                "gen": gen.get_state()}

    def set_state(state: dict) -> None:
        student.net.load_state_dict(state["student"])
        opt.load_state_dict(state["opt"])
        scaler.load_state_dict(state["scaler"])
        gen.set_state(state["gen"])

    def train_step(step: int) -> dict:
        lr = cfg.lr * (0.1 if step >= cfg.lr_drop_at * cfg.steps else 1.0)
        for g in opt.param_groups:
            g["lr"] = lr
        # The global batch from one stream; every process keeps its slice (see dmd2.draw_batch).
        noise = torch.randn((cfg.batch_size * world, *teacher.x_shape), generator=gen)[mine].to(device)
        cond, uncond = draw_condition(teacher, cfg.batch_size * world, gen, prompts)
        cond = {k: v[mine] for k, v in cond.items()}
        uncond = None if uncond is None else {k: v[mine] for k, v in uncond.items()}
        nfe = nfes[int(torch.randint(0, len(nfes), (), generator=gen))] if variable else cfg.nfe
        coarse, fine = grids[nfe]
        student_cond = cond | ({"nfe": torch.full((len(noise),), nfe, device=device)} if variable else {})
        x = noise * coarse[0].item()
        D_teacher = real if uncond is None else guided(real, scale, uncond)
        with autocast(device, precision):
            target = teacher_trajectory(D_teacher, x, fine, cfg.teacher_steps, cond)
        logs = {}
        for i in range(len(coarse) - 1):
            s, s_next = coarse[i].item(), coarse[i + 1].item()
            if i == 0 and cfg.afs:
                x = afs_step(x, s, s_next)
                continue
            with autocast(device, precision):
                x_next = euler_step(student_train, x.detach(), s, s_next, student_cond)
            loss = F.l1_loss(x_next, target[i + 1])
            check_finite({f"step{i}": loss}, step, accelerator)
            optimizer_step(loss, opt, scaler, params, cfg.grad_clip, accelerator)
            logs[f"loss_step{i}"] = loss.item()
            x = x_next.detach()
        return logs | {"loss_l1": sum(logs.values()) / len(logs), "nfe": nfe, "lr": lr}

    step, elapsed = run_loop(out_dir=out_dir, config=asdict(cfg), defaults=asdict(SFDConfig()),
                             steps=cfg.steps, checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every,
                             accelerator=accelerator, train_step=train_step, get_state=get_state,
                             set_state=set_state, progress=progress,
                             desc=f"sfd-v nfe={','.join(map(str, nfes))}" if variable else f"sfd nfe={cfg.nfe}",
                             resumable=("checkpoint_every", "log_every"))  # the LR drop depends on `steps`
    entries = {str(n): {"sigmas": [float(s) for s in grids[n][0]], "afs": cfg.afs,
                        "timesteps": [float(t) for t in teacher.denoiser.schedule.sigma_to_t(grids[n][0])]}
               for n in nfes}
    manifest = base_manifest(teacher, "sfd-v" if variable else "sfd", entries, "none", asdict(cfg))
    manifest["training"] |= {"train_seconds": round(elapsed, 1), "steps_done": step,
                             "processes": accelerator.num_processes}
    extra = {}
    if variable:
        manifest["nfe_condition"] = embedding.spec()
        extra[embedding.spec()["weights"]] = embedding.state_dict()
    bundle = out_dir / "student"
    if accelerator.is_main_process:
        write_bundle(bundle, student.net, manifest, extra)
    accelerator.wait_for_everyone()
    return bundle


def train_sfd_one_step(cfg: SFDConfig, out_dir: str | Path, progress: bool = True, accelerator=None) -> Path:
    """SFD's second stage: fine-tune a copy of an SFD / SFD-v student into a one-call student whose output matches
    the source's own `source_nfe`-step output for the same noise (L1 + w * perceptual_loss). The one call is an
    Euler step from the analytical first step's output (with `afs`), down the source's sigma range."""
    from accelerate import Accelerator

    from .bundle import load_bundle

    out_dir = Path(out_dir)
    if cfg.source is None:
        raise UserError("the one-step stage needs the SFD or SFD-v student to distil: --source DIR")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise UserError("steps and batch_size must be positive")
    source = load_bundle(cfg.source)
    if source.manifest["method"] not in ("sfd", "sfd-v"):
        raise UserError(f"{cfg.source} is a {source.manifest['method']} student; SFD's one-step stage starts from an "
                        "SFD or SFD-v student")
    if cfg.source_nfe not in source.nfes:
        raise UserError(f"{cfg.source} serves NFE {', '.join(map(str, source.nfes))}; set source_nfe to one of them "
                        f"(got {cfg.source_nfe})")
    if accelerator is None:
        accelerator = Accelerator()
    device = accelerator.device
    source.to(device)
    precision = resolve_precision(cfg.mixed_precision, device)
    torch.manual_seed(cfg.seed)
    source_sigmas = source.sigmas(cfg.source_nfe)
    sigmas = student_sigmas(1, cfg.afs, float(source_sigmas[-1]), float(source_sigmas[0]), cfg.rho)
    variable = "nfe_condition" in source.manifest
    source.denoiser.requires_grad_(False)
    student = copy.deepcopy(source.denoiser).train().requires_grad_(True)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    student_train, opt = accelerator.prepare(student, opt)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    gen = torch.Generator().manual_seed(cfg.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
    params = list(student.parameters())

    def get_state() -> dict:
        return {"student": student.net.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict(),
                "gen": gen.get_state()}

    def set_state(state: dict) -> None:
        student.net.load_state_dict(state["student"])
        opt.load_state_dict(state["opt"])
        scaler.load_state_dict(state["scaler"])
        gen.set_state(state["gen"])

    def train_step(step: int) -> dict:
        lr = cfg.lr * (0.1 if step >= cfg.lr_drop_at * cfg.steps else 1.0)
        for g in opt.param_groups:
            g["lr"] = lr
        n = cfg.batch_size * world
        noise = torch.randn((n, *source.x_shape), generator=gen)[mine].to(device)
        labels = None
        if source.num_classes is not None:
            labels = torch.randint(0, source.num_classes, (n,), generator=gen)[mine]
        cond = source.cond(labels)
        with torch.no_grad(), autocast(device, precision):
            target = source.generate(noise, cond, cfg.source_nfe).float()
        x = noise * sigmas[0].item()
        if cfg.afs:
            x = afs_step(x, sigmas[0].item(), sigmas[1].item())
        student_cond = cond | ({"nfe": torch.ones(len(noise), dtype=torch.long, device=device)} if variable else {})
        with autocast(device, precision):
            out = euler_step(student_train, x, sigmas[-2].item(), sigmas[-1].item(), student_cond)
        losses = {"l1": F.l1_loss(out, target), "perceptual": perceptual_loss(out, target)}
        check_finite(losses, step, accelerator)
        optimizer_step(losses["l1"] + cfg.perceptual_weight * losses["perceptual"], opt, scaler, params,
                       cfg.grad_clip, accelerator)
        return {f"loss_{k}": v.item() for k, v in losses.items()} | {"lr": lr}

    step, elapsed = run_loop(out_dir=out_dir, config=asdict(cfg), defaults=asdict(SFDConfig()),
                             steps=cfg.steps, checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every,
                             accelerator=accelerator, train_step=train_step, get_state=get_state,
                             set_state=set_state, progress=progress, desc="sfd one-step",
                             resumable=("checkpoint_every", "log_every"))
    manifest = copy.deepcopy(source.manifest)
    manifest["method"] = "sfd-1"
    manifest["nfe"] = {"1": {"sigmas": [float(s) for s in sigmas], "afs": cfg.afs,
                             "timesteps": [float(t) for t in source.denoiser.schedule.sigma_to_t(sigmas)]}}
    manifest["metrics"] = {}
    manifest["training"] = asdict(cfg) | {"train_seconds": round(elapsed, 1), "steps_done": step,
                                          "processes": accelerator.num_processes,
                                          "source_training": source.manifest["training"]}
    extra = {}
    if variable:
        extra[manifest["nfe_condition"]["weights"]] = student.net.embedding.state_dict()
    bundle = out_dir / "student"
    if accelerator.is_main_process:
        write_bundle(bundle, student.net, manifest, extra)
    accelerator.wait_for_everyone()
    return bundle
