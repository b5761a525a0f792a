"""Distil a teacher into a few-step DMD2 student: `python -m distill.run [--preset NAME] [--out DIR]`.

With no arguments it distils the committed digits teacher into a one-step student. Writes, under the
output folder: student/ (the bundle), samples.png (student next to teacher), metrics.json (student vs
the teacher's baselines), losses.png, metrics.jsonl (training log), config.json (the resolved run) and
state.safetensors (re-running the same command resumes from it). Multi-GPU / multi-node:
`accelerate launch -m distill.run ...` with the same arguments.
"""

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from distill.dmd2 import DMD2Config, train_dmd2
from distill.errors import UserError, cli_main
from distill.sfd import SFD_NFES, SFDConfig, train_sfd, train_sfd_one_step

SD_4STEP = (999, 749, 499, 249)  # DMD2's SD 1.5 / SDXL student timesteps (scaled-linear betas)
FLOW_4STEP = (1.0, 0.75, 0.5, 0.25)  # the same four points in flow time; the teacher's scheduler shift warps them
# The same noise-to-signal ratios on the digits teacher: its linear betas are far noisier at equal t (sigma 16.9 at
# t=749, against data of std 0.64), so the reference's list would spend two of four steps on pure noise. These are
# the t whose sigma / data std equals SD's sigma / latent std (~1) at 749, 499, 249; the first step stays at 999.
DIGITS_4STEP = (999, 451, 267, 133)
# The digits 4-step recipe (docs/dmd2.md, "The 4-step student"). Its last step (sigma 0.444) keeps to the teacher's
# x0 instead of distribution matching: trained by DMD it made the samples worse in all nine unanchored 4-step
# students (benchmarks.steps_probe); anchored, seeds 0 / 1 went from FD 0.134 / 0.086 to 0.062 / 0.064. The GAN on
# that step, a fake score per student step and GAN weight 0.1 then gave, over three seeds x five noise seeds, FD
# 0.066 / 0.060 / 0.063 and held-out FD 0.167 / 0.162 / 0.158, against 0.070 / 0.067 / 0.070 and 0.172 / 0.165 /
# 0.164 with the anchor alone (docs/dmd2_digits_4step_recipe.md).
DIGITS_4STEP_RECIPE = dict(anchor_sigma=0.5, anchor_weight=10.0, anchor_gan=True, fake_per_step=True, gan_g_weight=0.1)


@dataclass
class Preset:
    description: str
    config: DMD2Config | SFDConfig  # the config's type picks the method
    teacher: str | None = None  # None: the committed digits teacher; "required": --teacher must be given
    data: str | None = "digits"  # "digits", "folder" (--data required), or None (no real data)
    eval_samples: int = 1000
    overrides: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        return "sfd" if isinstance(self.config, SFDConfig) else "dmd2"


def _digits(**kw) -> DMD2Config:
    """The digits recipe (tuned on the committed teacher; see docs/dmd2.md)."""
    # CFG 1.25, cosine LR and checkpoint selection: 3 of 3 seeds under the teacher's FD on the CPU, where CFG 1.5
    # with a constant LR gave 0.094-0.188 (README, "DMD2 on the digits teacher")
    base = dict(steps=1200, batch_size=64, lr_generator=1e-4, lr_fake=1e-4, warmup=100, weight_decay=0.0,
                dfake_gen_update_ratio=5, gan_g_weight=3e-2, gan_d_weight=1e-1, checkpoint_every=250,
                guidance_scale=1.25, lr_schedule="cosine", select_every=100)
    return DMD2Config(**(base | kw))


PRESETS: dict[str, Preset] = {
    "digits-1step": Preset("digits teacher -> 1-step student (the default)", _digits()),
    "digits-4step": Preset("digits teacher -> 4-step student (999/451/267/133, backward simulation, last step "
                           "anchored to the teacher, a fake score per step)",
                           _digits(student_timesteps=DIGITS_4STEP, **DIGITS_4STEP_RECIPE)),
    "digits-4step-no-bsim": Preset("ablation: 4-step student trained on noised real data, no backward simulation",
                                   _digits(student_timesteps=DIGITS_4STEP, backward_simulation=False,
                                           **DIGITS_4STEP_RECIPE)),
    "digits-dm-only": Preset("ablation: DM loss only (generator and fake score update every step, no GAN)",
                             _digits(dfake_gen_update_ratio=1, use_gan=False), data=None),
    "digits-ttur": Preset("ablation: DM loss + two time-scale rule, no GAN", _digits(use_gan=False), data=None),
    "digits-regression": Preset("ablation: the original DMD (DM loss + regression on teacher pairs, no TTUR/GAN)",
                                _digits(dfake_gen_update_ratio=1, use_gan=False, regression_weight=1.0), data=None),
    # Digits SFD: 2 teacher steps per student interval instead of the paper's 4 halves the cost; on this teacher
    # DPM-Solver++(3M) over 80 -> 0.006 is already at the 50-step reference's FD with 2 (README, SFD section).
    "digits-sfd": Preset("digits teacher -> SFD Euler student (--nfe 2..5, default 4; no training data)",
                         SFDConfig(nfe=4, steps=100, batch_size=64, lr=1e-4, teacher_steps=2, checkpoint_every=25),
                         data=None),
    "digits-sfd-v": Preset("digits teacher -> SFD-v: one Euler student for NFE 2, 3, 4 and 5 (step count as input)",
                           SFDConfig(nfes=SFD_NFES, steps=200, batch_size=64, lr=1e-4, teacher_steps=2,
                                     checkpoint_every=25), data=None),
    "pixel-sfd": Preset("any pixel-space diffusers teacher -> SFD Euler student (--teacher, --nfe 2..5)",
                        SFDConfig(), teacher="required", data=None, eval_samples=0),
    "pixel": Preset("any pixel-space diffusers teacher -> 1-step student (--teacher, --data: image folder)",
                    DMD2Config(), teacher="required", data="folder", eval_samples=0),
    "sd15": Preset("SD 1.5 layout -> 1-step student (--teacher, --data: captioned images); the reference's "
                   "settings: lr 1e-5, TTUR 10, CFG 1.75",
                   DMD2Config(lr_generator=1e-5, lr_fake=1e-5, dfake_gen_update_ratio=10, guidance_scale=1.75,
                              batch_size=8, steps=20000, gan_g_weight=3e-3, gan_d_weight=1e-2),
                   teacher="required", data="folder", eval_samples=0),
    "sdxl": Preset("SDXL layout -> 4-step LoRA student (--teacher, --data: captioned images); the reference's "
                   "settings: LoRA rank 64, lr 5e-5, CFG 8, GAN 5e-3/1e-2",
                   DMD2Config(lr_generator=5e-5, lr_fake=5e-7, lora_rank=64, guidance_scale=8.0, batch_size=2,
                              steps=20000, gan_g_weight=5e-3, gan_d_weight=1e-2, student_timesteps=SD_4STEP),
                   teacher="required", data="folder", eval_samples=0),
    # Not a reference recipe (the DMD2 paper has no SD3 run): SDXL's LoRA settings on a model of similar size, and
    # four student steps in flow time, shifted by the teacher's own scheduler shift (DMD2's SD3 issue: unshifted
    # few-step times gave artifacts). Real-score CFG: the teacher's default (7.0) unless --set guidance_scale.
    "sd3": Preset("SD3 layout (flow-matching transformer) -> 4-step LoRA student (--teacher, --data: captioned "
                  "images); SDXL's LoRA settings, flow times 1.0/0.75/0.5/0.25 shifted by the scheduler",
                  DMD2Config(lr_generator=5e-5, lr_fake=5e-7, lora_rank=64, batch_size=2, steps=20000,
                             gan_g_weight=5e-3, gan_d_weight=1e-2, student_timesteps=FLOW_4STEP),
                  teacher="required", data="folder", eval_samples=0),
    "text-sfd": Preset("any text-to-image teacher (SD 1.5 / SDXL / SD3 layout) -> SFD Euler student (--teacher, "
                       "--prompts FILE, --nfe 2..5; no images needed)",
                       SFDConfig(lr=1e-5, batch_size=8), teacher="required", data=None, eval_samples=0),
}
# The text-to-image presets and the backbone each is written for
TEXT_PRESETS = {"sd15": "SDUNetBackbone", "sdxl": "SDXLUNetBackbone", "sd3": "SD3TransformerBackbone"}
DEFAULT_PRESET = "digits-1step"
DEFAULT_PRESETS = {"dmd2": "digits-1step", "sfd": "digits-sfd"}  # --method without --preset


def parse_overrides(items: list[str], config_type=DMD2Config) -> dict:
    """`--set key=value` pairs -> typed config fields (values parsed as JSON, else kept as strings)."""
    fields = {f.name: f for f in dataclasses.fields(config_type)}
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise UserError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if isinstance(value, list):
            value = tuple(value)
        out[key] = value
    return out


def resolve(args) -> tuple[Preset, DMD2Config | SFDConfig, Path | None]:
    if args.preset is None:
        args.preset = DEFAULT_PRESETS[args.method or "dmd2"]
    if args.preset not in PRESETS:
        raise UserError(f"unknown preset {args.preset!r}; presets: {', '.join(PRESETS)}")
    preset = PRESETS[args.preset]
    if args.method is not None and args.method != preset.method:
        raise UserError(f"preset {args.preset} is a {preset.method} recipe, not {args.method}; {args.method} presets: "
                        + ", ".join(k for k, p in PRESETS.items() if p.method == args.method))
    overrides = parse_overrides(args.set or [], type(preset.config))
    for name in ("steps", "batch_size", "seed"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.nfe is not None:
        if preset.method == "dmd2":
            raise UserError("a DMD2 student's steps come from its preset (digits-1step: 1, digits-4step: 4) or "
                            "--set student_timesteps=[999,749,499,249]; --nfe is for --method sfd")
        if args.nfe not in (1, *SFD_NFES):
            raise UserError(f"--nfe {args.nfe}: SFD trains students for NFE {', '.join(map(str, SFD_NFES))}, and 1 "
                            "through its second stage (--nfe 1 --source SFD_STUDENT)")
        overrides["nfe"] = args.nfe
    if args.prompts is not None:
        if preset.method != "sfd":
            raise UserError("--prompts is for SFD; DMD2 takes its prompts from the captions of --data")
        overrides["prompts"] = str(args.prompts)
    if args.source is not None:
        if preset.method != "sfd":
            raise UserError("--source is for SFD's second stage: --method sfd --nfe 1 --source DIR")
        overrides["source"] = str(args.source)
    cfg = dataclasses.replace(preset.config, **overrides)
    if preset.method == "sfd":
        check_sfd_choice(args, cfg)
    if preset.teacher == "required" and args.teacher is None:
        raise UserError(f"preset {args.preset} needs --teacher PATH (a local diffusers folder)")
    if preset.data == "folder" and args.data is None and cfg.use_gan:
        raise UserError(f"preset {args.preset} needs --data DIR (real images for the GAN loss)")
    return preset, cfg, args.teacher


def source_teacher(source: str) -> Path | None:
    """The teacher folder an SFD student bundle was distilled from (its manifest's), if it still exists."""
    from distill.bundle import MANIFEST_NAME

    manifest = Path(source) / MANIFEST_NAME
    if not manifest.exists():
        raise UserError(f"--source {source} is not a student bundle (no {MANIFEST_NAME}); give the student/ folder "
                        "of an SFD or SFD-v run")
    teacher = json.loads(manifest.read_text()).get("teacher")
    return Path(teacher) if teacher and Path(teacher).is_dir() else None


def check_sfd_choice(args, cfg: SFDConfig) -> None:
    """The resolved SFD settings must say one thing: plain SFD at nfe, SFD-v over nfes, or the 1-NFE stage."""
    if not isinstance(cfg.nfes, (list, tuple)) or not all(isinstance(k, int) for k in cfg.nfes):
        raise UserError(f"nfes must be a list of NFEs, e.g. --set nfes=[2,3,4,5]; got {cfg.nfes!r}")
    if cfg.nfes and args.nfe is not None:
        raise UserError(f"this run trains SFD-v for NFE {', '.join(map(str, cfg.nfes))}; leave out --nfe "
                        "(or --set nfes=[...] for another set)")
    one_step = cfg.nfe == 1 and not cfg.nfes
    if one_step and cfg.source is None:
        raise UserError("--nfe 1 is SFD's second stage: give the SFD or SFD-v student to distil into one step "
                        "with --source DIR (e.g. runs/digits-sfd-v/student)")
    if cfg.source is not None and not one_step:
        raise UserError("--source is for SFD's second stage only: --method sfd --nfe 1 --source DIR")


def load_real_data(preset: Preset, teacher, data_dir: Path | None):
    """(images, labels or captions) in the teacher's space, or None when the run uses no real data."""
    from distill.digits.data import load_digits_split

    if data_dir is None and preset.data == "digits":
        return load_digits_split("train")
    if data_dir is None:
        return None
    from distill.data import load_captioned_folder, load_class_folder

    if teacher.conditioning == "text":
        images, captions = load_captioned_folder(data_dir, teacher.image_size)
        return encode_images(teacher, images), captions
    c, h, w = teacher.x_shape
    return load_class_folder(data_dir, (h, w), c, teacher.num_classes)


@torch.no_grad()
def encode_images(teacher, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Latent teachers: encode the real images once, up front, instead of every step."""
    from tqdm import tqdm

    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="encoding real images", leave=False):
        out.append(teacher.encode(images[i:i + batch_size].to(teacher.device)).float().cpu())
    return torch.cat(out)


def check_conditioning(preset_name: str, preset: Preset, teacher) -> None:
    if preset.data == "digits" and teacher.conditioning != "class":
        raise UserError(f"preset {preset_name} trains a class-conditional student, but {teacher.source} has no "
                        "class labels (its UNet has no class embedding); use --preset pixel for unconditional "
                        "teachers")
    backbone = type(teacher.denoiser.net).__name__
    if preset_name in TEXT_PRESETS and backbone != TEXT_PRESETS[preset_name]:
        fits = [name for name, b in TEXT_PRESETS.items() if b == backbone]
        hint = f"use --preset {fits[0]}" if fits else "use a preset written for it (python -m distill.run --help)"
        raise UserError(f"preset {preset_name} is written for a {TEXT_PRESETS[preset_name]} teacher; "
                        f"{teacher.source} has a {backbone}: {hint}")


# ---- after training: evaluation and pictures --------------------------------------------------------------


def teacher_baselines(teacher_dir: Path) -> dict | None:
    path = Path(teacher_dir) / "fewstep_baselines.json"
    return json.loads(path.read_text()) if path.exists() else None


def is_digits_teacher(teacher_dir: Path) -> bool:
    """A teacher trained on the embedded digits (its fewstep_teacher.json or fewstep_factory.json says so)."""
    for name in ("fewstep_teacher.json", "fewstep_factory.json"):
        meta = Path(teacher_dir) / name
        if meta.exists() and json.loads(meta.read_text()).get("data", "").startswith("scikit-learn digits"):
            return True
    return False


EVAL_SEED = 1  # the reported metric's noise (and the pictures')
SELECTION_SEED = 7919  # checkpoint selection's noise: it never sees the evaluation's


def digits_selection_score(teacher, n: int = 1000, seed: int = SELECTION_SEED, chunk: int = 250):
    """DMD2's `score` for select_every on the digits teacher: FD of n generated digits (labels cycling, the
    student's whole loop) against the held-out split, in the metric classifier's features. Not the reported
    metric: that is FD against the training split on other noise (evaluate_student)."""
    from distill.bundle import sample_dmd2
    from distill.data import to_uint8
    from distill.eval.metrics import DigitsMetric
    from distill.sample import noise_for, parse_labels

    metric = DigitsMetric(reference="heldout")
    labels = parse_labels("cycle", n, teacher.num_classes)
    fixed = {}  # the same noise at every rating: (N, K, C, H, W)

    def score(generator, sigmas) -> float:
        device = sigmas.device
        if "draws" not in fixed:
            fixed["draws"] = noise_for(seed, 0, n, (len(sigmas), *teacher.x_shape), device)
        images = []
        for start in range(0, n, chunk):  # in chunks: one batch of n would set the run's peak memory
            draws, part = fixed["draws"][start:start + chunk], labels[start:start + chunk].to(device)
            x0 = sample_dmd2(generator, draws[:, 0] * sigmas[0].item(), sigmas, teacher.cond(labels=part),
                             draws[:, 1:].transpose(0, 1))
            images.append(to_uint8(x0.float().cpu()).numpy())
        return metric(np.concatenate(images))["fd"]

    return score


def evaluate_student(bundle_dir: Path, teacher, n: int, seed: int, device) -> dict:
    """Digits FD / accuracy of the student at every NFE it serves, plus images/s (the bundle as shipped)."""
    from distill.bundle import load_bundle
    from distill.eval.metrics import digits_scores
    from distill.sample import parse_labels, sample_student

    bundle = load_bundle(bundle_dir).to(device)
    labels = parse_labels("cycle", n, bundle.num_classes)
    out = {}
    for nfe in bundle.nfes:
        sample_student(bundle, nfe, min(n, 100), labels, seed, progress=False)  # warm-up
        t0 = time.perf_counter()
        images = sample_student(bundle, nfe, n, labels, seed)
        seconds = time.perf_counter() - t0
        out[str(nfe)] = {"nfe": nfe, "n": n, **digits_scores(images, None if labels is None else labels.numpy()),
                         "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1)}
    return out


def comparison_picture(bundle_dir: Path, teacher, out_path: Path, seed: int, device) -> Path:
    """samples.png: the student (each NFE it serves) beside the teacher's 50-step sampler, same noise, 10x10."""
    from PIL import Image, ImageDraw

    from distill.bundle import load_bundle
    from distill.eval.metrics import save_grid
    from distill.sample import parse_labels, sample_student, sample_teacher

    bundle = load_bundle(bundle_dir).to(device)
    n = 100
    labels = parse_labels(None, n, bundle.num_classes)  # cycle for class students, None for unconditional ones
    decode = teacher.decode if bundle.manifest["family"] == "latent" else None
    panels = []
    for nfe in bundle.nfes:
        images = sample_student(bundle, nfe, n, labels, seed, progress=False, decode=decode)
        panels.append((f"student, {nfe} step{'s' * (nfe > 1)}", images))
    panels.append(("teacher, DPM-Solver++(2M) 50 steps", sample_teacher(teacher, "dpmpp-2m", 50, n, labels, seed,
                                                                        progress=False)))
    tiles = []
    for title, images in panels:
        tmp = save_grid(images, out_path.with_suffix(".panel.png"), nrow=10)
        grid = Image.open(tmp).convert("RGB")
        tmp.unlink()
        canvas = Image.new("RGB", (grid.width, grid.height + 18), "white")
        canvas.paste(grid, (0, 18))
        ImageDraw.Draw(canvas).text((4, 3), title, fill="black")
        tiles.append(canvas)
    gap = 12
    out = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), max(t.height for t in tiles)),
                    "white")
    x = 0
    for t in tiles:
        out.paste(t, (x, 0))
        x += t.width + gap
    out.save(out_path)
    return out_path


def loss_plot(log_path: Path, out_path: Path) -> Path | None:
    """losses.png: every loss in metrics.jsonl against the step (moving average over 20 records)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    keys = sorted({k for r in rows for k in r if k.startswith("loss_")})
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = np.array([(r["step"], r[key]) for r in rows if key in r])
        ax.plot(pts[:, 0], pts[:, 1], color="0.8", lw=0.8)
        if len(pts) >= 20:
            smooth = np.convolve(pts[:, 1], np.ones(20) / 20, mode="valid")
            ax.plot(pts[19:, 0], smooth, color="C0")
        ax.set(title=key.removeprefix("loss_"), xlabel="step")
        if pts[:, 1].min() > 0 and pts[:, 1].max() / pts[:, 1].min() > 50:
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def summarize(student: dict, baselines: dict | None) -> dict:
    """The student's rows next to the teacher's baseline table (reference = its 50-step sampler)."""
    result = {"student": student}
    if baselines is not None:
        rows = baselines["rows"]
        reference = rows[0]
        result["teacher_reference"] = reference
        result["teacher_baselines"] = rows
        for row in student.values():
            row["fd_vs_teacher_reference"] = round(row["fd"] / reference["fd"], 3)
            row["speedup_vs_teacher_reference"] = round(row["images_per_s"] / reference["images_per_s"], 1)
    return result


# ---- the command --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    width = max(map(len, PRESETS))
    epilog = "presets:\n" + "\n".join(f"  {k:<{width}}  {p.description}" for k, p in PRESETS.items())
    p = argparse.ArgumentParser(prog="python -m distill.run", description=__doc__.split("\n\n")[0],
                                epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=sorted(DEFAULT_PRESETS),
                   help=f"dmd2 or sfd (default: the preset's; without --preset: {DEFAULT_PRESET} / digits-sfd)")
    p.add_argument("--preset", help=f"recipe (default {DEFAULT_PRESET}; listed below)")
    p.add_argument("--nfe", type=int, help=f"SFD: student network calls ({', '.join(map(str, SFD_NFES))}; 1 = the "
                   "second stage, with --source)")
    p.add_argument("--source", type=Path, help="SFD --nfe 1: the SFD / SFD-v student bundle to distil into one step")
    p.add_argument("--teacher", type=Path, help="teacher folder (default: the committed digits teacher)")
    p.add_argument("--data", type=Path, help="real images for the GAN loss (class folders, or captioned images)")
    p.add_argument("--prompts", type=Path, help="SFD on a text-to-image teacher: the prompts of its trajectories, "
                   "one per line")
    p.add_argument("--out", type=Path, help="output folder (default runs/<preset>)")
    p.add_argument("--steps", type=int, help="training steps (fake-score updates)")
    p.add_argument("--batch-size", type=int, help="per-process batch size")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any setting of the method's config (DMD2Config / SFDConfig), e.g. "
                        "--set gan_g_weight=0.01 --set student_timesteps=[999,499]")
    p.add_argument("--eval-samples", type=int, help="samples per NFE for the final metrics (0: skip)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args) -> Path:
    from accelerate import Accelerator

    from distill.digits import TEACHER_DIR
    from distill.teachers import load_teacher

    started = time.perf_counter()
    preset, cfg, teacher_dir = resolve(args)
    if preset.method == "sfd" and cfg.nfe == 1 and not cfg.nfes and teacher_dir is None:
        teacher_dir = source_teacher(cfg.source)  # pictures and metrics against the source's own teacher
    teacher_dir = teacher_dir or TEACHER_DIR
    suffix = f"-nfe{cfg.nfe}" if preset.method == "sfd" and not cfg.nfes else ""
    out = args.out or Path("runs") / (args.preset + suffix)
    accelerator = Accelerator(cpu=args.cpu)
    teacher = load_teacher(teacher_dir)
    check_conditioning(args.preset, preset, teacher)
    teacher.to(accelerator.device)
    uses_data = preset.method == "dmd2" and (cfg.use_gan or preset.data == "digits")
    real_data = load_real_data(preset, teacher, args.data) if uses_data else None
    pairs = None
    if preset.method == "dmd2" and cfg.regression_weight > 0:
        from distill.dmd2 import make_regression_pairs

        pairs = make_regression_pairs(teacher, n=2000, seed=12345)
    main = accelerator.is_main_process
    score = None
    if preset.method == "dmd2" and cfg.select_every:
        if is_digits_teacher(teacher_dir):
            score = digits_selection_score(teacher)
        else:
            cfg = dataclasses.replace(cfg, select_every=0)
            if main:
                print("note: checkpoint selection rates students on the digits data, and this is not the digits "
                      "teacher: the last step ships (select_every=0)")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({
            "preset": args.preset, "teacher": str(teacher_dir), "data": str(args.data) if args.data else preset.data,
            "processes": accelerator.num_processes, "device": str(accelerator.device),
            "method": preset.method, preset.method: dataclasses.asdict(cfg)}, indent=2))
        print(f"distilling {teacher.describe()}\n  preset {args.preset}: {preset.description}\n  output {out}")
    if preset.method == "sfd" and cfg.nfe == 1 and not cfg.nfes:
        bundle = train_sfd_one_step(cfg, out, progress=not args.no_progress, accelerator=accelerator)
    elif preset.method == "sfd":
        bundle = train_sfd(cfg, teacher, out, progress=not args.no_progress, accelerator=accelerator)
    else:
        bundle = train_dmd2(cfg, teacher, real_data, out, pairs, progress=not args.no_progress,
                            accelerator=accelerator, score=score)
    if not main:
        return bundle
    if cfg.teacher_dtype != "fp32" or cfg.fsdp_shard_teacher:
        # training cast the teacher's weights or sharded them across the processes: the pictures and metrics
        # below need it whole, in full precision, on this process
        teacher = load_teacher(teacher_dir)
        teacher.to(accelerator.device)

    loss_plot(out / "metrics.jsonl", out / "losses.png")
    if teacher.conditioning == "text":  # sample_student / sample_teacher take class labels, not prompts
        print("note: no samples.png for a text-to-image student; sample it with prompts through the runtime")
    else:
        comparison_picture(bundle, teacher, out / "samples.png", seed=EVAL_SEED, device=accelerator.device)
    n = preset.eval_samples if args.eval_samples is None else args.eval_samples
    result = {"preset": args.preset, "train_seconds": json.loads((bundle / "fewstep_student.json").read_text())[
        "training"]["train_seconds"]}
    if n > 0 and is_digits_teacher(teacher_dir):
        result |= summarize(evaluate_student(bundle, teacher, n, seed=EVAL_SEED, device=accelerator.device),
                            teacher_baselines(teacher_dir))
    result |= {"wall_seconds": round(time.perf_counter() - started, 1), "peak_memory_mb": peak_memory_mb(),
               "device": str(accelerator.device), "threads": torch.get_num_threads()}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    _patch_manifest_metrics(bundle, result.get("student", {}))
    report(out, bundle, result)
    return bundle


def peak_memory_mb() -> float:
    """Peak accelerator memory on CUDA; the process's peak resident memory (RSS) on the CPU."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def _patch_manifest_metrics(bundle: Path, student: dict) -> None:
    from distill.bundle import MANIFEST_NAME

    path = bundle / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["metrics"] = {nfe: {k: row[k] for k in ("fd", "accuracy", "n") if k in row}
                           for nfe, row in student.items()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(path)


def report(out: Path, bundle: Path, result: dict) -> None:
    lines = [f"\nstudent bundle: {bundle}  (trained in {result['train_seconds']:.0f} s; whole run "
             f"{result['wall_seconds']:.0f} s, peak memory {result['peak_memory_mb']:.0f} MB)"]
    ref = result.get("teacher_reference")
    for row in result.get("student", {}).values():
        line = f"  student {row['nfe']} step(s): FD {row['fd']:.3f}, class accuracy {100 * row['accuracy']:.1f}%"
        if ref:
            line += (f"  (teacher {ref['sampler']} {ref['nfe']} NFE: FD {ref['fd']:.3f}, "
                     f"{100 * ref['accuracy']:.1f}%; student {row['speedup_vs_teacher_reference']:.0f}x faster)")
        lines.append(line)
    manifest = json.loads((bundle / "fewstep_student.json").read_text())
    pictures = [out / "losses.png"] + ([out / "samples.png"] if (out / "samples.png").exists() else [])
    lines += [f"  pictures: {', '.join(map(str, pictures))}",
              f"  metrics: {out / 'metrics.json'} (training log {out / 'metrics.jsonl'})",
              "next:"]
    if "latent_shape" not in manifest["image"]:
        lines.append(f"  python -m distill.sample --model {bundle} --n 100 --out {out / 'more.npz'}")
    lines.append(f"  python -m export.trt --bundle {bundle} --nfe {max(int(k) for k in manifest['nfe'])}")
    print("\n".join(lines))


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    run(args)


if __name__ == "__main__":
    main()
