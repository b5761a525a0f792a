"""DMD2's settings: the paper's reference settings and the recipe knobs the presets use (distill/run.py), with what
each one does; and the small rules read off them (the learning-rate schedule, the student's steps)."""

import math
from dataclasses import dataclass


@dataclass
class DMD2Config:
    # --- The paper's settings (Yin et al. 2024; docs/design.md §3): the defaults are its ImageNet-64 run's ---
    steps: int = 20000
    batch_size: int = 32
    lr_generator: float = 2e-6  # the reference's ImageNet-64 setting; 1e-5 for SD 1.5
    lr_fake: float = 2e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    warmup: int = 500  # linear LR warm-up steps, then `lr_schedule`
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
    lora_rank: int | None = None  # LoRA (peft) on the generator only (the reference's SDXL run: 64)
    mixed_precision: str | None = None  # "no" | "bf16" | "fp16"; None = bf16 on CUDA (the reference's), no on CPU

    # --- What a user sets besides ---
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    ema_decay: float | None = None  # the reference uses none
    # A student bundle of this teacher (e.g. a 1-step one) whose network the generator starts from instead of
    # the teacher's: a multi-step student then starts with a first step that already makes samples.
    init_generator: str | None = None
    # Shard the generator and the fake score (weights, gradients, optimizer state) across the launched processes
    # with FSDP2 (distill/sharding.py); the frozen teacher is replicated, or sharded too with fsdp_shard_teacher.
    # Each process builds its shards of the two copies directly (no full copy before sharding).
    fsdp: bool = False
    fsdp_shard_teacher: bool = False
    # The frozen teacher's weights: "fp32", or "bf16" (half the memory; its calls run under bf16 autocast, as they
    # do anyway with mixed_precision=bf16). fp16 is refused: the reference diverged in it. Replicated or sharded.
    teacher_dtype: str = "fp32"
    # The optimizers' implementation (distill/optimizers.py): "default" (PyTorch's), "fused" (PyTorch's fused
    # kernel: less peak memory at the step), "8bit" (torchao: 8-bit moments, 2 instead of 8 bytes per parameter)
    optimizer: str = "default"
    # Recompute the generator's and the fake score's activations in the backward instead of keeping them (less
    # memory, about a third more compute); the frozen teacher never keeps activations.
    gradient_checkpointing: bool = False

    # --- The digits recipe (the digits-* presets in distill/run.py; off by default, so the paper's run is unchanged)
    lr_schedule: str = "constant"  # "constant" (the reference's) or "cosine": down to lr_min_ratio x lr at `steps`
    lr_min_ratio: float = 0.1
    # Checkpoint selection: every N steps (and at the last) the caller's `score` rates the generator (lower is
    # better; for the digits teacher, FD against the held-out split on noise the evaluation never uses) and the
    # bundle ships the best-rated weights rather than the last. 0 ships the last step.
    select_every: int = 0
    # Student steps whose sigma is at most this (e.g. a 4-step student's last one) learn the frozen teacher's own
    # x0 on their backward-simulated inputs (MSE, weight `anchor_weight`) instead of DM + GAN, and their outputs
    # stay out of the fake score's training. At low noise the teacher's one call is already near the data, and
    # distribution matching (which pins only the mixture of all steps' outputs) drifts it (benchmarks.steps_probe).
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

    # --- Ablation (the digits-regression preset): the original DMD's regression loss on teacher pairs; 0 in DMD2
    regression_weight: float = 0.0


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
