"""SFD: simple and fast distillation of a teacher's ODE trajectory into a K-step Euler student
(Zhou et al., "Simple and Fast Distillation of Diffusion Models", NeurIPS 2024; docs/design.md §4).

A trainable copy of the teacher (the student) walks its own Euler trajectory through a few timestamps; after
each of its steps the state is pulled (L1) towards the teacher's state at the same timestamp, taken from a
fresh DPM-Solver++(3M) trajectory with `teacher_steps` solver steps between consecutive student timestamps.
No training data is needed: every batch is fresh noise. The optimizer steps after every student step, and
the student's next step starts from its own (detached) output. The loop, checkpoints and resume are the
shared ones (training.py); the result is a student bundle (bundle.py) with renoise "none".
"""

import copy
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from distill import sharding
from distill.bundle import base_manifest, write_bundle
from distill.errors import UserError
from distill.optimizers import check_optimizer, make_optimizer
from distill.sfd.config import SFD_NFES, SFDConfig
from distill.sfd.nfe_condition import NFEConditioned, NFEEmbedding, time_embed_dim
from distill.sfd.trajectory import afs_step, euler_step, sfd_grids, sigma_range, teacher_trajectory
from distill.teachers.denoiser import guided
from distill.training import (
    TEACHER_DTYPES,
    LowPrecisionTeacher,
    autocast,
    check_finite,
    check_teacher_dtype,
    optimizer_step,
    resolve_precision,
    run_loop,
)


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
    check_teacher_dtype(cfg.teacher_dtype)
    check_optimizer(cfg.optimizer, cfg.fsdp)
    if cfg.fsdp_shard_teacher and not cfg.fsdp:
        raise UserError("fsdp_shard_teacher shards the frozen teacher with the student: add fsdp=true (and launch "
                        "several processes), or drop it")
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
    # under fsdp each process builds only its shards of the student, from the teacher's weights
    student = (sharding.meta_copy if cfg.fsdp else copy.deepcopy)(real).train().requires_grad_(True)
    if cfg.gradient_checkpointing:
        student.net.enable_checkpointing()
    embedding = None
    if variable:  # the step count as an extra condition, zero at the start (student == teacher)
        embedding = NFEEmbedding(time_embed_dim(student.net)).to(device)
        student.net = NFEConditioned(student.net, embedding)
    template = None  # the bundle's network under fsdp: the teacher's layout, filled with the gathered weights
    if cfg.fsdp:  # in place, before the optimizer sees the parameters
        sharding.check_fsdp(accelerator, None, precision)
        inner = "net.backbone." if variable else "net."  # where the teacher's network sits in the student
        sharding.shard_from(student, {inner + k.removeprefix("net.") if k.startswith("net.") else k: v
                                      for k, v in sharding.tensors(real).items()}, device)
        template = sharding.meta_copy(real.net)
    frozen = real if cfg.teacher_dtype == "fp32" else LowPrecisionTeacher(real, TEACHER_DTYPES[cfg.teacher_dtype])
    if cfg.fsdp and cfg.fsdp_shard_teacher:
        sharding.shard(real)
    opt = make_optimizer(student.parameters(), cfg.optimizer, decoupled_decay=False, lr=cfg.lr, betas=cfg.betas)
    if cfg.fsdp:
        student_train = student
    else:
        student_train, opt = accelerator.prepare(student, opt)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    scale = teacher.guidance_scale if cfg.guidance_scale is None else cfg.guidance_scale
    gen = torch.Generator().manual_seed(cfg.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
    params = list(student.parameters())
    prompts = read_prompts(cfg.prompts) if teacher.conditioning == "text" else None

    def get_state() -> dict:
        if cfg.fsdp:  # full tensors, gathered by every process
            return {"student": sharding.full_state(student.net), "opt": sharding.full_optimizer_state(student, opt),
                    "scaler": scaler.state_dict(), "gen": gen.get_state()}
        return {"student": student.net.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict(),
                "gen": gen.get_state()}

    def set_state(state: dict) -> None:
        if cfg.fsdp:  # read by the main process only, sent to the others tensor by tensor
            sharding.load_full_state(student.net, state["student"], from_main=True)
            sharding.load_full_optimizer_state(student, opt, state["opt"], from_main=True)
        else:
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
        D_teacher = frozen if uncond is None else guided(frozen, scale, uncond)
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
                             resumable=("checkpoint_every", "log_every"),  # the LR drop depends on `steps`
                             collective_state=cfg.fsdp, main_only=("student", "opt") if cfg.fsdp else ())
    entries = {str(n): {"sigmas": [float(s) for s in grids[n][0]], "afs": cfg.afs,
                        "timesteps": [float(t) for t in teacher.denoiser.schedule.sigma_to_t(grids[n][0])]}
               for n in nfes}
    manifest = base_manifest(teacher, "sfd-v" if variable else "sfd", entries, "none", asdict(cfg))
    manifest["training"] |= {"train_seconds": round(elapsed, 1), "steps_done": step,
                             "processes": accelerator.num_processes}
    net = student.net
    if cfg.fsdp:  # the full weights, gathered by every process, into an unsharded network of the same layout
        weights = sharding.full_state(student.net)
        if accelerator.is_main_process:
            inner = "backbone." if variable else ""
            net = sharding.filled(template, {k.removeprefix(inner): v for k, v in weights.items()
                                             if k.startswith(inner)}, real.net)
            if variable:
                embedding = NFEEmbedding(time_embed_dim(net))
                embedding.load_state_dict({k.removeprefix("embedding."): v for k, v in weights.items()
                                           if k.startswith("embedding.")})
                net = NFEConditioned(net, embedding)
    extra = {}
    if variable:
        manifest["nfe_condition"] = embedding.spec()
        extra[embedding.spec()["weights"]] = embedding.state_dict()
    bundle = out_dir / "student"
    if accelerator.is_main_process:
        write_bundle(bundle, net, manifest, extra)
    accelerator.wait_for_everyone()
    return bundle
