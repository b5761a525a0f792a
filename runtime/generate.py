"""Sample a few-step engine from the command line, with no torch:
`python -m runtime.generate --engine DIR --nfe K --n N --labels cycle --seed S --out samples.npz`
(text-to-image engines: `--prompt "a photo of a cat" [--prompt ...]`).

Writes `images` (N, H, W, C) uint8 and `labels` (N,) int64 (-1 where unconditional; text engines: `prompts` (N,)),
the layout of `python -m distill.sample`, plus a PNG grid next to it (`--png` to choose its path).
"""

import argparse
import json
from pathlib import Path

import numpy as np

from fewstep import labels

from .errors import UserError, cli_main
from .pipeline import BACKENDS, Pipeline


def parse_labels(spec: str | None, n: int, num_classes: int | None) -> np.ndarray | None:
    """--labels as an (n,) int64 array (fewstep/labels.py: 'cycle', '3,5', ...), None for unconditional engines."""
    ids = labels.parse_labels(spec, n, num_classes, what="engine")
    return None if ids is None else np.array(ids, dtype=np.int64)


def save_grid(images: np.ndarray, path: Path, columns: int = 10) -> None:
    """A PNG grid of (N, H, W, C) uint8 images (Pillow)."""
    from PIL import Image

    n, h, w, c = images.shape
    rows = -(-n // columns)
    grid = np.zeros((rows * h, min(n, columns) * w, c), np.uint8)
    for k, img in enumerate(images):
        r, q = divmod(k, columns)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    scale = max(1, 256 // max(h, w))  # small images are enlarged so the grid can be looked at
    Image.fromarray(grid.squeeze(-1) if c == 1 else grid).resize(
        (grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m runtime.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", type=Path, required=True, help="an engine folder (python -m export.onnx --out)")
    p.add_argument("--nfe", type=int, help="network calls per image (default: the most the engine serves)")
    p.add_argument("--n", type=int, default=100, help="number of images")
    p.add_argument("--labels", default=None, help="'cycle' (default) or comma-separated class ids")
    p.add_argument("--prompt", action="append", help="text-to-image engines: a prompt (repeat for several; the n "
                   "images cycle through them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("samples.npz"))
    p.add_argument("--png", type=Path, help="grid picture (default: OUT with .png)")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--precision", default="fp32", help="which exported file: fp32, fp16, int8")
    p.add_argument("--batch-size", type=int, help="images per backend call (default: 16, or the engine's limit)")
    args = p.parse_args(argv)
    if args.n < 1:
        raise UserError("--n must be at least 1")
    pipe = Pipeline.load(args.engine, args.backend, args.precision)
    print(pipe.describe())
    if pipe.text is not None:
        if not args.prompt or args.labels is not None:
            raise UserError("this engine is text-to-image: give --prompt TEXT (repeat for several), not --labels")
        conditions = [args.prompt[i % len(args.prompt)] for i in range(args.n)]
    elif args.prompt:
        raise UserError("--prompt is for text-to-image engines; this one takes "
                        + ("--labels" if pipe.num_classes else "no condition"))
    else:
        conditions = parse_labels(args.labels, args.n, pipe.num_classes)
    out = pipe.generate(conditions, n=args.n if conditions is None else None, nfe=args.nfe, seed=args.seed,
                        batch_size=args.batch_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fields = {"prompts": np.array(out.prompts)} if pipe.text is not None else {
        "labels": out.labels if out.labels is not None else np.full(args.n, -1)}
    np.savez(args.out, images=out.images, **fields)
    png = args.png or args.out.with_suffix(".png")
    save_grid(out.images, png)
    t = out.timings
    print(f"{args.n} images at NFE {out.nfe} in {t['total_ms']:.1f} ms ({1000 * args.n / t['total_ms']:.0f} images/s; "
          f"backend {t['backend_ms']:.1f} ms) -> {args.out}, {png}")
    print(json.dumps({"timings": t}))


if __name__ == "__main__":
    main()
