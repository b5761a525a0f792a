"""Sample a model to an .npz: `python -m distill.sample --model PATH --sampler NAME --nfe K ...`.

Writes `images` (N, H, W, C) uint8 and `labels` (N,) int64 (-1 where unconditional), plus a PNG grid
of the first 100 images next to it. Noise is drawn per sample from (seed, index), so the images do
not depend on the batch size.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from distill.data import to_uint8
from distill.errors import UserError, cli_main
from distill.teachers.denoiser import guided
from distill.teachers.samplers import SAMPLERS, sample, steps_for_nfe
from distill.teachers.schedule import SCHEDULES
from fewstep import labels


def parse_labels(spec: str | None, n: int, num_classes: int | None) -> torch.Tensor | None:
    """--labels as an (n,) tensor (fewstep/labels.py: 'cycle', '3,5', ...), None for unconditional models."""
    ids = labels.parse_labels(spec, n, num_classes)
    return None if ids is None else torch.tensor(ids)


def noise_for(seed: int, start: int, count: int, shape, device="cpu") -> torch.Tensor:
    """Unit Gaussian noise for samples start..start+count-1, each from its own (seed, index) stream."""
    out = torch.empty((count, *shape))
    for j in range(count):
        g = torch.Generator().manual_seed(seed * 1_000_003 + start + j)
        out[j] = torch.randn(shape, generator=g)
    return out.to(device)


@torch.no_grad()
def sample_teacher(teacher, sampler: str, nfe: int, n: int, labels: torch.Tensor | None, seed: int = 0,
                   guidance: float | None = None, batch_size: int = 250, grid: str | None = None,
                   progress: bool = True) -> np.ndarray:
    """n images (N, H, W, C) uint8 from a teacher with a named sampler at `nfe` network calls."""
    steps_for_nfe(sampler, nfe)  # fail before any work
    scale = teacher.guidance_scale if guidance is None else guidance
    out = []
    for start in tqdm(range(0, n, batch_size), desc=f"{sampler} nfe={nfe}", disable=not progress, leave=False):
        count = min(batch_size, n - start)
        noise = noise_for(seed, start, count, teacher.x_shape, teacher.device)
        cond = teacher.cond(labels=labels[start:start + count]) if labels is not None else teacher.cond()
        D = guided(teacher.denoiser, scale, teacher.uncond(count))
        x0 = sample(D, noise, teacher.denoiser.schedule, sampler, nfe, cond, grid)
        out.append(to_uint8(teacher.decode(x0).float().cpu()).numpy())
    return np.concatenate(out)


@torch.no_grad()
def sample_student(bundle, nfe: int | None, n: int, labels: torch.Tensor | None, seed: int = 0,
                   batch_size: int = 250, progress: bool = True, decode=None) -> np.ndarray:
    """n images (N, H, W, C) uint8 from a student bundle with its own loop at `nfe` calls (default: its most).

    Each sample's starting noise and re-noising draws come from its own (seed, index) stream, so images do
    not depend on the batch size. `decode` maps the student's space to images (latent students: the VAE).
    """
    nfe = bundle.nfes[-1] if nfe is None else nfe
    bundle.sigmas(nfe)  # fail before any work on an NFE the student does not serve
    out = []
    for start in tqdm(range(0, n, batch_size), desc=f"student nfe={nfe}", disable=not progress, leave=False):
        count = min(batch_size, n - start)
        draws = noise_for(seed, start, count, (nfe, *bundle.x_shape), bundle.device)  # (N, nfe, C, H, W)
        cond = bundle.cond(labels[start:start + count] if labels is not None else None)
        x0 = bundle.generate(draws[:, 0], cond, nfe, fresh_noise=draws[:, 1:].transpose(0, 1))
        x0 = decode(x0) if decode is not None else x0
        out.append(to_uint8(x0.float().cpu()).numpy())
    return np.concatenate(out)


def is_student(path: Path) -> bool:
    from distill.bundle import MANIFEST_NAME

    return (Path(path) / MANIFEST_NAME).exists()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path,
                   help="teacher folder (diffusers layout or factory spec) or student bundle (fewstep_student.json)")
    p.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                   help="teacher sampler (default dpmpp-2m); students use their own loop")
    p.add_argument("--nfe", type=int, default=None,
                   help="network calls per image (Heun: odd); default 50 for a teacher, a student's most")
    p.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="sigma grid (default: the sampler's own: discrete for ddim, karras otherwise)")
    p.add_argument("--n", type=int, default=1000, help="number of images")
    p.add_argument("--labels", default=None, help="'cycle' (default) or comma-separated class ids")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the teacher's own)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default=default_device())


def run_sampling(args) -> tuple[np.ndarray, np.ndarray | None, object, float]:
    """Shared by sample and eval: load, validate, sample. Returns images, labels, teacher, seconds."""
    from distill.teachers import load_teacher

    if args.n < 1 or args.batch_size < 1:
        raise UserError("--n and --batch-size must be positive")
    if not Path(args.model).exists():
        raise UserError(f"model path {args.model} does not exist")
    if is_student(args.model):
        return _run_student_sampling(args)
    args.sampler = args.sampler or "dpmpp-2m"
    args.nfe = 50 if args.nfe is None else args.nfe
    try:
        steps_for_nfe(args.sampler, args.nfe)
    except ValueError as e:
        raise UserError(f"--nfe {args.nfe}: {e}") from None
    teacher = load_teacher(args.model).to(args.device)
    labels = parse_labels(args.labels, args.n, teacher.num_classes)
    t0 = time.perf_counter()
    images = sample_teacher(teacher, args.sampler, args.nfe, args.n, labels, args.seed, args.guidance,
                            args.batch_size, args.schedule)
    return images, None if labels is None else labels.numpy(), teacher, time.perf_counter() - t0


def _run_student_sampling(args) -> tuple[np.ndarray, np.ndarray | None, object, float]:
    from distill.bundle import load_bundle

    bundle = load_bundle(args.model)
    if "latent_shape" in bundle.manifest["image"]:
        raise UserError(f"{args.model} is a {bundle.manifest['family']} student; sampling it from the command line "
                        "needs its teacher's text encoders and VAE: use the runtime (see README)")
    if args.sampler is not None:
        print(f"note: --sampler {args.sampler} is ignored; a {bundle.manifest['method']} student samples with its "
              "own loop", file=sys.stderr)
    if args.guidance is not None:
        print("note: --guidance is ignored; a distilled student has its guidance built in", file=sys.stderr)
    if args.nfe is not None and args.nfe not in bundle.nfes:
        raise UserError(f"--nfe {args.nfe}: this student serves NFE {', '.join(map(str, bundle.nfes))}")
    bundle.to(args.device)
    labels = parse_labels(args.labels, args.n, bundle.num_classes)
    t0 = time.perf_counter()
    images = sample_student(bundle, args.nfe, args.n, labels, args.seed, args.batch_size)
    return images, None if labels is None else labels.numpy(), bundle, time.perf_counter() - t0


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m distill.sample", description=__doc__.split("\n\n")[0])
    add_sampling_args(p)
    p.add_argument("--out", type=Path, default=Path("samples.npz"))
    args = p.parse_args(argv)
    images, labels, _, seconds = run_sampling(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    labels = labels if labels is not None else np.full(len(images), -1)
    np.savez(args.out, images=images, labels=labels.astype(np.int64))
    from distill.eval.metrics import save_grid

    grid = save_grid(images[:100], args.out.with_suffix(".png"))
    print(f"{len(images)} images in {seconds:.1f} s -> {args.out} (grid: {grid})")


if __name__ == "__main__":
    main()
