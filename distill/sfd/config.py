"""SFD's settings: the paper's reference settings (Zhou et al. 2024, §4) and what a user sets."""

from dataclasses import dataclass

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
    # Shard the student (weights, gradients, optimizer state) across the launched processes with FSDP2
    # (distill/sharding.py), each process building only its shards; the frozen teacher is replicated, or sharded
    # too with fsdp_shard_teacher.
    fsdp: bool = False
    fsdp_shard_teacher: bool = False
    teacher_dtype: str = "fp32"  # the frozen teacher's weights: fp32 or bf16 (half the memory); fp16 is refused
    optimizer: str = "default"  # Adam's implementation: default, fused or 8bit (distill/optimizers.py)
    gradient_checkpointing: bool = False  # recompute the student's activations in the backward (less memory)
    log_every: int = 1
