"""DMD2 training (Yin et al., "Improved Distribution Matching Distillation", NeurIPS 2024; docs/design.md §3).

Three networks start from the teacher: the *real score* (the frozen teacher, with CFG), the *fake score*
(a trainable copy that tracks the student's output distribution, with a GAN head on its bottleneck) and
the *generator* (the student, a trainable copy). Each step updates the fake score; every
`dfake_gen_update_ratio`-th step also updates the generator first (the two time-scale update rule).
Multi-step students use fixed timesteps and backward simulation. The result is a student bundle
(bundle.py) in out_dir/student; out_dir/state.safetensors makes re-running the same call resume.
"""

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from distill import sharding
from distill.bundle import base_manifest, write_bundle
from distill.dmd2.backward_simulation import draw_batch, student_input, take, trained_rows
from distill.dmd2.config import DMD2Config, gan_enabled, lr_at, served_nfes, student_times
from distill.dmd2.fake_score import BottleneckTap, FakeScore, GANHead
from distill.dmd2.updates import Nets, fake_step, generator_step
from distill.errors import UserError
from distill.optimizers import check_optimizer, make_optimizer
from distill.teachers.denoiser import guided
from distill.training import (
    RESUMABLE_CHANGES,
    TEACHER_DTYPES,
    LowPrecisionTeacher,
    autocast,
    check_teacher_dtype,
    resolve_precision,
    run_loop,
)


@torch.no_grad()
def make_regression_pairs(teacher, n: int, nfe: int = 25, seed: int = 0, guidance: float | None = None,
                          batch_size: int = 64) -> tuple:
    """The original DMD's (noise, labels, teacher ODE output) pairs, from DPM-Solver++(2M) at `nfe` calls."""
    from distill.sample import noise_for
    from distill.teachers.samplers import sample

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
    check_teacher_dtype(cfg.teacher_dtype)
    check_optimizer(cfg.optimizer, cfg.fsdp)
    if cfg.fsdp_shard_teacher and not cfg.fsdp:
        raise UserError("fsdp_shard_teacher shards the frozen teacher with the trained copies: add fsdp=true (and "
                        "launch several processes), or drop it")
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


def student_weights(generator, bundle_dir: str) -> dict:
    """A student bundle's network weights for the generator, named as in the generator, checked strictly against
    its layout (which may be on the meta device): same architecture and prediction type."""
    from distill.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    if bundle.denoiser.prediction_type != generator.prediction_type:
        raise UserError(f"init_generator {bundle_dir} predicts {bundle.denoiser.prediction_type}, this teacher "
                        f"{generator.prediction_type}: start from a student of this teacher")
    theirs = bundle.denoiser.net.network.state_dict()
    ours = generator.net.network.state_dict()
    differ = sorted(k for k in theirs.keys() | ours.keys()
                    if k not in theirs or k not in ours or theirs[k].shape != ours[k].shape)
    if differ:
        raise UserError(f"init_generator {bundle_dir} is not a student of this teacher (its network differs at "
                        f"{', '.join(differ[:3])})")
    prefix = next(name for name, m in generator.named_modules() if m is generator.net.network)
    return {f"{prefix}.{k}": v for k, v in theirs.items()}


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

    # The three networks: the teacher stays frozen; fake score and generator are trainable copies. Under fsdp each
    # process builds its shards of the copies from the teacher's weights, never a whole copy (sharding.shard_from).
    real = teacher.denoiser.eval().requires_grad_(False)
    copy_of = sharding.meta_copy if cfg.fsdp else copy.deepcopy
    fake_denoiser = copy_of(real).train().requires_grad_(True)
    generator = copy_of(real).train().requires_grad_(True)
    start = sharding.tensors(real)  # the generator's first weights, by name
    if cfg.init_generator:
        start = start | student_weights(generator, cfg.init_generator)
        if not cfg.fsdp:
            generator.load_state_dict({k: v for k, v in start.items() if k in generator.state_dict()}, strict=True)
    if cfg.gradient_checkpointing:  # before LoRA wraps the network
        generator.net.enable_checkpointing()
        fake_denoiser.net.enable_checkpointing()
    if cfg.lora_rank:
        add_lora(generator.net, cfg.lora_rank)
    head = None
    if gan_enabled(cfg):
        tap = BottleneckTap(real.net)  # the fake score starts as the teacher: its features have the same shape
        with torch.no_grad():  # one probe forward gives the bottleneck's shape
            probe = torch.zeros(1, *teacher.x_shape, device=device)
            real(probe, student_sigmas[:1].float(), _probe_cond(teacher, real_data))
        head = GANHead.for_features(tap.pop()).to(device)
        tap.remove()
    fake = FakeScore(fake_denoiser, head, len(student_sigmas) if cfg.fake_per_step else None)

    template = None  # the bundle's network under fsdp: the teacher's layout, filled with the gathered weights
    if cfg.fsdp:  # in place: every call of these objects (trained, no-grad, frozen) gathers the shards it needs
        sharding.check_fsdp(accelerator, cfg.lora_rank, precision)
        if cfg.select_every:
            raise UserError("fsdp with select_every is not supported (the rating runs on one process); set "
                            "select_every=0, or drop fsdp")
        sharding.shard_from(generator, start, device)
        sharding.shard_from(fake, {f"denoiser.{k}": v for k, v in sharding.tensors(real).items()}, device)
        template = sharding.meta_copy(real.net)
    del start  # it holds the teacher's full weights, which sharding or a bf16 cast must be able to free
    frozen = real if cfg.teacher_dtype == "fp32" else LowPrecisionTeacher(real, TEACHER_DTYPES[cfg.teacher_dtype])
    if cfg.fsdp and cfg.fsdp_shard_teacher:
        sharding.shard(real)
    adamw = dict(name=cfg.optimizer, decoupled_decay=True, betas=cfg.betas, weight_decay=cfg.weight_decay)
    opt_g = make_optimizer([p for p in generator.parameters() if p.requires_grad], lr=cfg.lr_generator, **adamw)
    opt_f = make_optimizer(fake.parameters(), lr=cfg.lr_fake, **adamw)  # head and fake backbone: one optimizer
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"):
        # The loop calls the same modules for trained, no-grad and frozen forwards: right for DDP (the wrapper
        # sees only the trained one) and for fewstep's FSDP2 (sharded in place), not for accelerate's wrappers.
        raise UserError(f"accelerate's {accelerator.distributed_type.name} mode is not supported by fewstep's DMD2 "
                        "loop; launch plain multi-process (DDP) and add --set fsdp=true to shard (docs/dmd2.md)")
    if cfg.fsdp:
        generator_train, fake_train = generator, fake
    else:
        generator_train, fake_train, opt_g, opt_f = accelerator.prepare(generator, fake, opt_g, opt_f)
    scale = teacher.guidance_scale if cfg.guidance_scale is None else cfg.guidance_scale
    nets = Nets(frozen, generator, fake, generator_train, fake_train, scale, teacher.uncond,
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
        if cfg.fsdp:  # full tensors, gathered by every process
            return {"generator": sharding.full_state(generator.net), "fake": sharding.full_state(fake),
                    "opt_generator": sharding.full_optimizer_state(generator, opt_g),
                    "opt_fake": sharding.full_optimizer_state(fake, opt_f), "scaler_generator": scaler_g.state_dict(),
                    "scaler_fake": scaler_f.state_dict(), "ema": ema and sharding.full_tensors(ema),
                    "gen": gen.get_state(), "counts": dict(counts), "best": None}
        return {"generator": generator.net.state_dict(), "fake": fake.state_dict(),
                "opt_generator": opt_g.state_dict(), "opt_fake": opt_f.state_dict(),
                "scaler_generator": scaler_g.state_dict(), "scaler_fake": scaler_f.state_dict(), "ema": ema,
                "gen": gen.get_state(), "counts": dict(counts),
                "best": best if cfg.select_every else None}

    def set_state(state: dict) -> None:
        nonlocal ema
        if cfg.fsdp:  # read by the main process only, sent to the others tensor by tensor
            sharding.load_full_state(generator.net, state["generator"], from_main=True)
            sharding.load_full_state(fake, state["fake"], from_main=True)
            sharding.load_full_optimizer_state(generator, opt_g, state["opt_generator"], from_main=True)
            sharding.load_full_optimizer_state(fake, opt_f, state["opt_fake"], from_main=True)
        else:
            generator.net.load_state_dict(state["generator"])
            fake.load_state_dict(state["fake"])
            opt_g.load_state_dict(state["opt_generator"])
            opt_f.load_state_dict(state["opt_fake"])
        scaler_g.load_state_dict(state["scaler_generator"])
        scaler_f.load_state_dict(state["scaler_fake"])
        if ema is not None:
            ema = sharding.like(state["ema"], ema) if cfg.fsdp else {k: v.to(device) for k, v in state["ema"].items()}
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
                                                 if k != "steps" or cfg.lr_schedule == "constant"),
                                 collective_state=cfg.fsdp,
                                 main_only=("generator", "fake", "opt_generator", "opt_fake", "ema") if cfg.fsdp
                                 else ())
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
    if cfg.fsdp:  # the full weights, gathered by every process, into an unsharded copy of the teacher's network
        weights = sharding.full_tensors(ema) if ema is not None else sharding.full_state(generator.net)
        if accelerator.is_main_process:
            write_bundle(bundle, sharding.filled(template, weights, real.net), manifest)
    elif accelerator.is_main_process:
        write_bundle(bundle, student_backbone(generator, best["weights"] if selected else ema), manifest)
    accelerator.wait_for_everyone()
    return bundle


def _probe_cond(teacher, real_data) -> dict:
    if teacher.conditioning == "class":
        return teacher.cond(labels=[0])
    if teacher.conditioning == "text":
        return teacher.cond(prompts=[str(real_data[1][0])])
    return teacher.cond()
