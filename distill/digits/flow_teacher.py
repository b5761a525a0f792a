"""Train the embedded flow-matching digits teacher: `python -m distill.digits.flow_teacher [--out DIR]`.

The second embedded teacher, of another family than the diffusers UNet one: a hand-written class-conditional
network (distill/assets/digits_flow_teacher/flow_net.py) trained with the rectified-flow objective
(x_t = (1 - t) x0 + t eps, the network predicts v = eps - x0, t uniform in (0, 1), fed as 1000 t), with label
dropout for classifier-free guidance and an EMA of the weights. The result is a factory teacher folder:
`fewstep_factory.json` + the network's .py file + `model.safetensors`, the layout a user's own network has
(docs/teachers.md). Re-running the same command resumes.
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
from distill.digits import FLOW_TEACHER_DIR, NULL_CLASS
from distill.digits.data import IMAGE_SIZE, NUM_CLASSES, augment, load_digits_split
from distill.errors import UserError, cli_main

NET_FILE = "flow_net.py"
TIME_SCALE = 1000.0  # the network sees 1000 t


@dataclass
class FlowTeacherConfig:
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    guidance_scale: float = 1.5  # the default CFG written into the spec
    channels: int = 32
    seed: int = 0
    checkpoint_every: int = 250


SAMPLING_ONLY = {"guidance_scale"}


def lr_at(step: int, cfg: FlowTeacherConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def factory_spec(cfg: FlowTeacherConfig, info: dict) -> dict:
    """The teacher's fewstep_factory.json: everything fewstep needs to know about the network."""
    return {
        "factory": f"{NET_FILE}:build",
        "kwargs": {"channels": cfg.channels, "num_classes": NUM_CLASSES + 1},
        "weights": "model.safetensors",
        "parameterization": "flow",
        "prediction_type": "flow",
        "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0},
        "time_scale": TIME_SCALE,
        "x_shape": [1, IMAGE_SIZE, IMAGE_SIZE],
        "num_classes": NUM_CLASSES,
        "null_class": NULL_CLASS,
        "guidance_scale": cfg.guidance_scale,
        "class_arg": "class_labels",
        "gan_tap": "mid",
        "time_embedding": "time_mlp",
        "data": "scikit-learn digits, train split, upsampled to 16x16",
        "training": {**asdict(cfg), **info},
    }


def write_teacher_dir(out: Path, net, cfg: FlowTeacherConfig, info: dict) -> None:
    """The factory folder, written atomically (temp folder, then rename)."""
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy(FLOW_TEACHER_DIR / NET_FILE, tmp / NET_FILE)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / "model.safetensors"))
    (tmp / "fewstep_factory.json").write_text(json.dumps(factory_spec(cfg, info), indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def build_net(cfg: FlowTeacherConfig):
    from distill.teachers.factory import import_factory

    return import_factory(f"{NET_FILE}:build", FLOW_TEACHER_DIR)(channels=cfg.channels, num_classes=NUM_CLASSES + 1)


def train_flow_teacher(cfg: FlowTeacherConfig, work_dir: Path, out_dir: Path) -> Path:
    torch.manual_seed(cfg.seed)
    x_train, y_train = load_digits_split("train")
    net = build_net(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    gen = torch.Generator().manual_seed(cfg.seed)
    step, elapsed = 0, 0.0
    state_path = work_dir / "state.safetensors"
    if state_path.exists():
        state = load_state(state_path)
        changed = [k for k, v in asdict(cfg).items() if k not in SAMPLING_ONLY and state["config"].get(k) != v]
        if changed:
            raise UserError(f"{state_path} was written with a different config ({', '.join(changed)}); "
                            "use another --work folder")
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        ema = state["ema"]
        gen.set_state(state["gen"])
        set_rng_state(state["rng"])
        step, elapsed = state["step"], state["elapsed"]
        print(f"resuming from step {step} ({state_path})")

    def checkpoint():
        save_state(state_path, {"config": asdict(cfg), "net": net.state_dict(), "opt": opt.state_dict(),
                                "ema": ema, "gen": gen.get_state(), "rng": rng_state(),
                                "step": step, "elapsed": elapsed})

    work_dir.mkdir(parents=True, exist_ok=True)
    truncate_log(work_dir / "metrics.jsonl", step)
    log = open(work_dir / "metrics.jsonl", "a")
    bar = tqdm(total=cfg.steps, initial=step, desc="flow teacher", unit="step")
    while step < cfg.steps:
        t0 = time.perf_counter()
        idx = torch.randint(0, len(x_train), (cfg.batch_size,), generator=gen)
        x0 = augment(x_train[idx], gen)  # (B, 1, 16, 16)
        labels = y_train[idx].clone()
        labels[torch.rand(cfg.batch_size, generator=gen) < cfg.label_dropout] = NULL_CLASS
        t = torch.rand(cfg.batch_size, generator=gen)  # (B,) flow time in [0, 1)
        eps = torch.randn(x0.shape, generator=gen)
        tt = t.reshape(-1, 1, 1, 1)
        x_t = (1 - tt) * x0 + tt * eps  # rectified flow: a straight line from the data to the noise
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = F.mse_loss(net(x_t, TIME_SCALE * t, class_labels=labels), eps - x0)  # velocity target
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in net.state_dict().items():
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
    net.load_state_dict(ema)
    write_teacher_dir(out_dir, net, cfg, {"train_seconds": round(elapsed, 1), "threads": torch.get_num_threads()})
    print(f"flow teacher written to {out_dir} ({elapsed / 60:.1f} min of training)")
    return out_dir


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m distill.digits.flow_teacher", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/digits_flow_teacher/teacher"),
                   help=f"where the factory folder goes (the committed one is {FLOW_TEACHER_DIR})")
    p.add_argument("--work", type=Path, default=None, help="training state and logs (default: OUT/../)")
    for f, v in asdict(FlowTeacherConfig()).items():
        p.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    args = p.parse_args(argv)
    cfg = FlowTeacherConfig(**{f: getattr(args, f) for f in asdict(FlowTeacherConfig())})
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise UserError("--steps and --batch-size must be positive")
    print(json.dumps(asdict(cfg), indent=2))
    train_flow_teacher(cfg, args.work or args.out.parent, args.out)


if __name__ == "__main__":
    main()
