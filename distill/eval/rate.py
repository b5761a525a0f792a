"""Evaluate a model or a samples file: `python -m distill.eval --model PATH --sampler S --nfe K`.

Reports the digits FD (classifier feature space, against the training split; `fd_heldout` against the
360 held-out images) and the class accuracy of conditional samples; with `--inception-weights FILE` (a
local pt_inception weights file, never downloaded) also the standard Inception FID. Appends the result
to OUT/metrics.jsonl and OUT/metrics.json and writes an image grid per evaluated model.
"""

import argparse
import re
from pathlib import Path

import numpy as np

from distill.errors import UserError, cli_main
from distill.eval.metrics import append_record, digits_scores, inception_fid, save_grid
from distill.sample import add_sampling_args, run_sampling


def evaluate_images(images: np.ndarray, labels: np.ndarray | None, inception_weights: Path | None = None,
                    reference: np.ndarray | None = None) -> dict:
    """Digits FD + accuracy (for 16x16 single-channel images), and Inception FID when weights are given."""
    result = {}
    if images.shape[1:] == (16, 16, 1):
        has_labels = labels is not None and (np.asarray(labels) >= 0).all()
        result.update(digits_scores(images, labels if has_labels else None))
    if inception_weights is not None:
        if reference is None:
            from distill.data import to_uint8
            from distill.digits.data import load_digits_split

            reference = to_uint8(load_digits_split("train")[0]).numpy()
        result["inception_fid"] = inception_fid(images, reference, inception_weights)
    if not result:
        raise UserError(f"images of shape {images.shape[1:]} are not digits: pass --inception-weights for FID")
    return result


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if not path.exists():
        raise UserError(f"samples file {path} does not exist")
    try:
        data = np.load(path)
        images = data["images"]
        labels = data["labels"] if "labels" in data else None
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path} is not a samples .npz with an 'images' array ({e})") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise UserError(f"{path}: 'images' must be (N, H, W, C) uint8, got {images.dtype} {images.shape}")
    return images, labels


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m distill.eval", description=__doc__.split("\n\n")[0])
    add_sampling_args(p)
    p._option_string_actions["--model"].required = False
    p.add_argument("--samples", type=Path, help="evaluate this .npz instead of sampling a model")
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="folder for metrics and grids")
    p.add_argument("--inception-weights", type=Path, help="local pt_inception weights for standard FID")
    p.add_argument("--reference", type=Path, help=".npz of real images for Inception FID (default: digits)")
    args = p.parse_args(argv)
    if (args.model is None) == (args.samples is None):
        raise UserError("give exactly one of --model (sample it) or --samples (an .npz to evaluate)")
    if args.samples is not None:
        images, labels = load_npz(args.samples)
        record = {"model": str(args.samples), "sampler": None, "nfe": None}
        seconds = None
    else:
        images, labels, model, seconds = run_sampling(args)
        if hasattr(model, "manifest"):  # a student bundle: its own loop, guidance built in
            nfe = args.nfe if args.nfe is not None else model.nfes[-1]
            record = {"model": str(args.model), "sampler": model.manifest["method"], "nfe": nfe, "seed": args.seed}
        else:
            scale = model.guidance_scale if args.guidance is None else args.guidance
            record = {"model": str(args.model), "sampler": args.sampler, "nfe": args.nfe,
                      "schedule": args.schedule, "guidance": scale, "seed": args.seed}
    reference = load_npz(args.reference)[0] if args.reference else None
    result = evaluate_images(images, labels, args.inception_weights, reference)
    record.update({"n": len(images), **result, "sample_seconds": seconds and round(seconds, 2)})
    slug = re.sub(r"[^A-Za-z0-9]+", "_", f"{Path(record['model']).name}_{record['sampler']}_{record['nfe']}")
    record["grid"] = str(save_grid(images[:100], args.out / f"grid_{slug.strip('_')}.png"))
    append_record(args.out, record)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in result.items())
    print(f"{record['model']} {record['sampler'] or ''} nfe={record['nfe']} n={len(images)}: {shown}")
    print(f"appended to {args.out / 'metrics.jsonl'}; grid {record['grid']}")


if __name__ == "__main__":
    main()
