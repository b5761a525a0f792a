"""SFD's second stage: one network call, distilled from an SFD / SFD-v student sampled at `source_nfe`
(L1 + an offline perceptual term)."""

import copy
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from distill.bundle import write_bundle
from distill.errors import UserError
from distill.optimizers import check_optimizer, make_optimizer
from distill.sfd.config import SFDConfig
from distill.sfd.trajectory import afs_step, euler_step, student_sigmas
from distill.training import autocast, check_finite, optimizer_step, resolve_precision, run_loop


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


def train_sfd_one_step(cfg: SFDConfig, out_dir: str | Path, progress: bool = True, accelerator=None) -> Path:
    """SFD's second stage: fine-tune a copy of an SFD / SFD-v student into a one-call student whose output matches
    the source's own `source_nfe`-step output for the same noise (L1 + w * perceptual_loss). The one call is an
    Euler step from the analytical first step's output (with `afs`), down the source's sigma range."""
    from accelerate import Accelerator

    from distill.bundle import load_bundle

    out_dir = Path(out_dir)
    if cfg.source is None:
        raise UserError("the one-step stage needs the SFD or SFD-v student to distil: --source DIR")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise UserError("steps and batch_size must be positive")
    if cfg.fsdp or cfg.fsdp_shard_teacher or cfg.teacher_dtype != "fp32":
        raise UserError("the one-step stage fine-tunes the SFD student, replicated on every process (DDP): drop fsdp, "
                        "fsdp_shard_teacher and teacher_dtype (they apply to SFD's first stage, from the teacher)")
    check_optimizer(cfg.optimizer, False)
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
    opt = make_optimizer(student.parameters(), cfg.optimizer, decoupled_decay=False, lr=cfg.lr, betas=cfg.betas)
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
