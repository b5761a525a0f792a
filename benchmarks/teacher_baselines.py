"""The teacher's baseline table: `python -m benchmarks.teacher_baselines [--teacher DIR] [--n 1000]`.

Samples the teacher with its 50-step reference sampler and with DDIM and DPM-Solver++ (2M, 3M) at
NFE 1, 2, 4, 8, and scores each with the digits FD and class accuracy. This is the table every
student is compared with. Writes OUT/teacher_baselines.{md,json,png} and a sample grid per row.
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from distill.data import to_uint8
from distill.digits import TEACHER_DIR
from distill.digits.data import load_digits_split
from distill.errors import UserError, cli_main
from distill.eval.metrics import digits_metric, save_grid
from distill.sample import default_device, parse_labels, sample_teacher
from distill.teachers import load_teacher

REFERENCE = ("dpmpp-2m", 50)  # the teacher's "50-step sampler"


def real_data_floor(n_heldout: int = 360) -> dict:
    """FD and accuracy of the held-out real images: the best any generator can hope to score."""
    x, y = load_digits_split("heldout")
    return digits_metric()(to_uint8(x[:n_heldout]).numpy(), y[:n_heldout].numpy())


def run_baselines(teacher_dir: Path, n: int, nfes: list[int], samplers: list[str], seed: int,
                  guidance: float | None, out: Path, device: str) -> list[dict]:
    teacher = load_teacher(teacher_dir).to(device)
    labels = parse_labels("cycle", n, teacher.num_classes)
    metric = digits_metric()
    rows = []
    plan = [REFERENCE] + [(s, k) for s in samplers for k in nfes]
    for sampler, nfe in plan:
        t0 = time.perf_counter()
        images = sample_teacher(teacher, sampler, nfe, n, labels, seed, guidance)
        seconds = time.perf_counter() - t0
        row = {"sampler": sampler, "nfe": nfe, "n": n, **metric(images, labels.numpy()),
               "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1)}
        save_grid(images[:100], out / "grids" / f"teacher_{sampler}_{nfe}.png")
        rows.append(row)
        print(f"{sampler:>9} NFE {nfe:>2}: FD {row['fd']:.4f}  acc {row['accuracy']:.3f}  ({seconds:.1f} s)")
    return rows


def write_report(rows: list[dict], floor: dict, meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "teacher_baselines.json").write_text(json.dumps({"meta": meta, "real_heldout": floor, "rows": rows},
                                                           indent=2))
    lines = [f"Teacher: `{meta['teacher']}`, {meta['n']} samples per row (labels cycling 0-9), seed {meta['seed']}, "
             f"CFG scale {meta['guidance']}, device {meta['device']} ({meta['threads']} threads).",
             "", "| sampler | NFE | FD ↓ | class accuracy | seconds | images/s |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['nfe']} | {r['fd']:.3f} | {100 * r['accuracy']:.1f}% | "
                     f"{r['seconds']:.1f} | {r['images_per_s']:.0f} |")
    lines.append(f"| real held-out images (floor) | – | {floor['fd']:.3f} | {100 * floor['accuracy']:.1f}% | – | – |")
    (out / "teacher_baselines.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for sampler in dict.fromkeys(r["sampler"] for r in rows[1:]):
        pts = [(r["nfe"], r["fd"]) for r in rows[1:] if r["sampler"] == sampler]
        ax.plot(*zip(*pts), marker="o", label=sampler)
    ax.axhline(rows[0]["fd"], color="k", ls="--", label=f"{rows[0]['sampler']} NFE {rows[0]['nfe']}")
    ax.axhline(floor["fd"], color="gray", ls=":", label="real held-out")
    ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="digits FD (lower is better)",
           title="Teacher samplers vs NFE")
    ax.set_xticks(sorted({r["nfe"] for r in rows[1:]}), labels=[str(k) for k in sorted({r["nfe"] for r in rows[1:]})])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "teacher_baselines.png", dpi=120)
    plt.close(fig)


def _shown(path: Path) -> str:
    """The path relative to the working directory when it lies below it (reports stay machine-independent)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.teacher_baselines", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", type=Path, default=TEACHER_DIR)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--nfe", default="1,2,4,8", help="comma-separated NFEs")
    p.add_argument("--samplers", default="ddim,dpmpp-2m,dpmpp-3m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the teacher's own)")
    p.add_argument("--out", type=Path, required=True, help="the folder the tables and pictures go to")
    p.add_argument("--device", default=default_device())
    p.add_argument("--save-in-teacher", action="store_true",
                   help="also write fewstep_baselines.json into the teacher folder (distill.run compares with it)")
    args = p.parse_args(argv)
    try:
        nfes = [int(k) for k in args.nfe.split(",")]
    except ValueError:
        raise UserError(f"--nfe must be comma-separated integers, got {args.nfe!r}") from None
    samplers = args.samplers.split(",")
    teacher_scale = load_teacher(args.teacher).guidance_scale
    rows = run_baselines(args.teacher, args.n, nfes, samplers, args.seed, args.guidance, args.out, args.device)
    meta = {"teacher": _shown(args.teacher), "n": args.n, "seed": args.seed,
            "guidance": args.guidance if args.guidance is not None else teacher_scale,
            "device": args.device, "threads": torch.get_num_threads()}
    write_report(rows, real_data_floor(), meta, args.out)
    if args.save_in_teacher:
        shutil.copyfile(args.out / "teacher_baselines.json", args.teacher / "fewstep_baselines.json")
    print(f"wrote {args.out / 'teacher_baselines.md'}, .json and .png")
    return np.array([r["fd"] for r in rows])


if __name__ == "__main__":
    main()
