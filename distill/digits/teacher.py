"""Train the embedded digits teacher: `python -m distill.digits.teacher [--out DIR]`.

A class-conditional diffusers UNet2DModel trained with the ordinary DDPM objective (v-prediction,
uniform t) on the training split, with label dropout so classifier-free guidance works, an EMA of
the weights, and a resumable state: re-running the same command continues where it stopped.
The result is a diffusers pipeline folder (unet/ + scheduler/ + model_index.json) plus
`fewstep_teacher.json`, the same layout as the committed teacher in distill/assets/digits_teacher.
"""

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from distill.checkpoint import load_state, rng_state, save_state, set_rng_state, truncate_log
from distill.digits import NULL_CLASS, TEACHER_DIR, teacher_scheduler_config, teacher_unet_config
from distill.digits.data import IMAGE_SIZE, NUM_CLASSES, augment, load_digits_split
from distill.errors import UserError, cli_main
from distill.teachers.denoiser import vp_target


@dataclass
class TeacherConfig:
    steps: int = 4000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    label_dropout: float = 0.1  # fraction of labels replaced by the null class (for CFG)
    guidance_scale: float = 1.5  # the default CFG scale written next to the teacher (best FD in a sweep, README)
    seed: int = 0
    checkpoint_every: int = 250


SAMPLING_ONLY = {"guidance_scale"}  # config fields that do not affect training (may change on resume)


def lr_at(step: int, cfg: TeacherConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def write_teacher_dir(out: Path, unet, cfg: TeacherConfig, info: dict) -> None:
    """Write a diffusers pipeline folder atomically (temp folder, then rename)."""
    from diffusers import DDPMScheduler

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    DDPMScheduler(**teacher_scheduler_config()).save_pretrained(tmp / "scheduler")
    (tmp / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDPMScheduler"]}, indent=2))
    (tmp / "fewstep_teacher.json").write_text(json.dumps({
        "num_classes": NUM_CLASSES,
        "null_class": NULL_CLASS,
        "guidance_scale": cfg.guidance_scale,
        "image_size": IMAGE_SIZE,
        "value_range": [-1, 1],
        "data": "scikit-learn digits, train split, upsampled to 16x16",
        "training": {**asdict(cfg), **info},
    }, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def train_teacher(cfg: TeacherConfig, work_dir: Path, out_dir: Path) -> Path:
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(cfg.seed)
    x_train, y_train = load_digits_split("train")
    alphas_cumprod = DDPMScheduler(**teacher_scheduler_config()).alphas_cumprod
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()  # (T,) VE sigma of each timestep

    unet = UNet2DModel(**teacher_unet_config())
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    gen = torch.Generator().manual_seed(cfg.seed)
    step, elapsed = 0, 0.0

    state_path = work_dir / "state.safetensors"
    if state_path.exists():
        state = load_state(state_path)
        changed = [k for k, v in asdict(cfg).items() if k not in SAMPLING_ONLY and state["config"].get(k) != v]
        if changed:
            raise UserError(f"{state_path} was written with a different config ({', '.join(changed)}); "
                            "use another --work folder")
        unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["opt"])
        ema = state["ema"]
        gen.set_state(state["gen"])
        set_rng_state(state["rng"])
        step, elapsed = state["step"], state["elapsed"]
        print(f"resuming from step {step} ({state_path})")

    def checkpoint():
        save_state(state_path, {"config": asdict(cfg), "unet": unet.state_dict(), "opt": opt.state_dict(),
                                "ema": ema, "gen": gen.get_state(), "rng": rng_state(),
                                "step": step, "elapsed": elapsed})

    work_dir.mkdir(parents=True, exist_ok=True)
    truncate_log(work_dir / "metrics.jsonl", step)  # lines past the checkpoint came from the run that stopped
    log = open(work_dir / "metrics.jsonl", "a")
    bar = tqdm(total=cfg.steps, initial=step, desc="teacher", unit="step")
    while step < cfg.steps:
        t0 = time.perf_counter()
        idx = torch.randint(0, len(x_train), (cfg.batch_size,), generator=gen)
        x0 = augment(x_train[idx], gen)  # (B, 1, 16, 16)
        labels = y_train[idx].clone()
        labels[torch.rand(cfg.batch_size, generator=gen) < cfg.label_dropout] = NULL_CLASS
        t = torch.randint(0, len(sigmas), (cfg.batch_size,), generator=gen)
        sigma = sigmas[t].reshape(-1, 1, 1, 1)
        eps = torch.randn(x0.shape, generator=gen)
        alpha = 1 / (1 + sigma**2).sqrt()
        x_vp = (alpha * (x0 + sigma * eps)).float()  # the DDPM forward process, written in sigma space
        target = vp_target(x0, eps, sigma, "v_prediction").float()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = F.mse_loss(unet(x_vp, t, class_labels=labels).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema[k].lerp_(v, 1 - decay) if v.is_floating_point() else ema[k].copy_(v)
        step += 1
        elapsed += time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        log.write(json.dumps({"step": step - 1, "loss": loss.item(), "grad_norm": float(grad_norm),
                              "lr": lr_at(step - 1, cfg)}) + "\n")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            log.flush()
            checkpoint()
    bar.close()
    log.close()

    unet.load_state_dict(ema)
    write_teacher_dir(out_dir, unet, cfg, {"train_seconds": round(elapsed, 1),
                                           "threads": torch.get_num_threads()})
    print(f"teacher written to {out_dir} ({elapsed / 60:.1f} min of training)")
    return out_dir


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m distill.digits.teacher", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/digits_teacher/teacher"),
                   help=f"where the diffusers folder goes (the committed one is {TEACHER_DIR})")
    p.add_argument("--work", type=Path, default=None, help="training state and logs (default: OUT/../)")
    for f, v in asdict(TeacherConfig()).items():
        p.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    args = p.parse_args(argv)
    cfg = TeacherConfig(**{f: getattr(args, f) for f in asdict(TeacherConfig())})
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise UserError("--steps and --batch-size must be positive")
    work = args.work or args.out.parent
    print(json.dumps(asdict(cfg), indent=2))
    train_teacher(cfg, work, args.out)


if __name__ == "__main__":
    main()
