"""SFD on the digits teacher: the paper-style table (`python -m benchmarks.bench_sfd`).

Trains (through `python -m distill.run`, one process per run, --parallel at a time) SFD students at NFE 2-5,
one SFD-v student for all of them and the one-NFE second stage from the SFD-v student; scores each at every
NFE it serves (1,000 samples), next to the teacher's own DPM-Solver++(3M) and DDIM at the same NFE, its
50-step reference, and a DMD2 student's training cost (--dmd2 RUN_DIR). Writes docs/sfd_digits.{md,json,png}.
Finished run folders are reused, so an interrupted benchmark continues.
"""

import argparse
import json
import time
from pathlib import Path

from benchmarks.bench_dmd2 import run_all
from distill.errors import UserError, cli_main

NFES = (2, 3, 4, 5)


def plan(args) -> list[tuple[str, str, list[str]]]:
    common = [f"steps={args.steps}"] if args.steps else []
    runs = [(f"sfd-nfe{k}", "digits-sfd", [f"nfe={k}", *common]) for k in args.nfes]
    if args.variable:
        runs.append(("sfd-v", "digits-sfd-v", [f"nfes={list(args.nfes)}", *common]))
    return runs


def one_step_run(args) -> tuple[str, str, list[str]]:
    source = args.work / "sfd-v" / "student"
    steps = [f"steps={args.one_step_steps}"]
    return ("sfd-v-1nfe", "digits-sfd", ["nfe=1", f"source={source}", f"source_nfe={max(args.nfes)}", *steps])


def teacher_rows(nfes, n: int, device: str) -> list[dict]:
    """The untrained teacher's DPM-Solver++(3M) and DDIM at each NFE (labels cycling, seed 1 as the students)."""
    from distill.digits import TEACHER_DIR
    from distill.eval.metrics import digits_metric
    from distill.sample import parse_labels, sample_teacher
    from distill.teachers import load_teacher

    teacher = load_teacher(TEACHER_DIR).to(device)
    labels = parse_labels("cycle", n, teacher.num_classes)
    metric, rows = digits_metric(), []
    for sampler in ("dpmpp-3m", "ddim"):
        for nfe in nfes:
            t0 = time.perf_counter()
            images = sample_teacher(teacher, sampler, nfe, n, labels, seed=1, progress=False)
            rows.append({"run": f"teacher {sampler}", "nfe": nfe, "n": n, **metric(images, labels.numpy()),
                         "images_per_s": round(n / (time.perf_counter() - t0), 1)})
    return rows


def trajectory_rows(nfes, teacher_steps=(2, 4), n: int = 500, device: str = "cpu") -> list[dict]:
    """How good SFD's teacher targets are: the teacher's DPM-Solver++(3M) over SFD's refined grid (the end of
    the trajectory the student learns), scored like a sampler."""
    import torch

    from distill.data import to_uint8
    from distill.digits import TEACHER_DIR
    from distill.eval.metrics import digits_metric
    from distill.sample import noise_for
    from distill.sfd import teacher_sigmas
    from distill.teachers import load_teacher
    from distill.teachers.denoiser import guided
    from distill.teachers.samplers import dpmpp_states

    teacher = load_teacher(TEACHER_DIR).to(device)
    labels = torch.arange(n) % teacher.num_classes
    metric, rows = digits_metric(), []
    for nfe in nfes:
        for k in teacher_steps:
            fine = teacher_sigmas(nfe, True, k, 0.006, 80.0).to(device)
            x = noise_for(1, 0, n, teacher.x_shape, device) * 80.0
            D = guided(teacher.denoiser, teacher.guidance_scale, teacher.uncond(n))
            with torch.no_grad():
                *_, last = dpmpp_states(D, x, fine, teacher.cond(labels=labels.to(device)), order=3)
            rows.append({"nfe": nfe, "teacher_steps": k, "solver_steps": len(fine) - 1, "n": n,
                         **metric(to_uint8(last.cpu()).numpy(), labels.numpy())})
            print(f"NFE {nfe}, {k} teacher steps per interval: FD {rows[-1]['fd']:.3f}")
    return rows


def write_report(rows: list[dict], teacher: list[dict], reference: dict | None, dmd2: dict | None, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sfd_digits.json").write_text(json.dumps({"students": rows, "teacher": teacher, "reference": reference,
                                                     "dmd2": dmd2}, indent=2))
    by_nfe = {}
    for r in teacher:
        by_nfe.setdefault(r["nfe"], {})[r["run"]] = r
    lines = ["| student | NFE | FD ↓ | class accuracy | fine-tuning (min) | teacher 3M FD | teacher DDIM FD |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = by_nfe.get(r["nfe"], {})
        three = t.get("teacher dpmpp-3m", {}).get("fd")
        ddim = t.get("teacher ddim", {}).get("fd")
        lines.append(f"| {r['run']} | {r['nfe']} | {r['fd']:.3f} | {100 * r['accuracy']:.1f}% | "
                     f"{r['train_seconds'] / 60:.1f} | {'–' if three is None else f'{three:.3f}'} | "
                     f"{'–' if ddim is None else f'{ddim:.3f}'} |")
    if reference:
        lines.append(f"| teacher {reference['sampler']} (reference) | {reference['nfe']} | {reference['fd']:.3f} | "
                     f"{100 * reference['accuracy']:.1f}% | – | – | – |")
    if dmd2:
        for nfe, row in dmd2["student"].items():
            lines.append(f"| DMD2 ({dmd2['preset']}, for cost) | {nfe} | {row['fd']:.3f} | "
                         f"{100 * row['accuracy']:.1f}% | {dmd2['train_seconds'] / 60:.1f} | – | – |")
    (out / "sfd_digits.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, style in (("sfd", "o-"), ("sfd-v", "s-")):
        pts = sorted((r["nfe"], r["fd"]) for r in rows if r["run"].split("-nfe")[0] == name and r["nfe"] > 1)
        if pts:
            ax.plot(*zip(*pts), style, label=name.upper())
    for r in rows:
        if r["nfe"] == 1:
            ax.plot([1], [r["fd"]], "D", label=f"{r['run']}")
    for sampler, style in (("teacher dpmpp-3m", "x--"), ("teacher ddim", "+--")):
        pts = sorted((r["nfe"], r["fd"]) for r in teacher if r["run"] == sampler)
        ax.plot(*zip(*pts), style, color="0.5", label=f"{sampler} (no training)")
    if reference:
        ax.axhline(reference["fd"], color="k", ls=":", label=f"teacher {reference['nfe']} steps")
    ax.set(xlabel="NFE", ylabel="digits FD (lower is better)", yscale="log", title="SFD on the digits teacher")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sfd_digits.png", dpi=120)
    plt.close(fig)


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_sfd", description=__doc__.split("\n\n")[0])
    p.add_argument("--nfes", default="2,3,4,5", help="SFD students to train (comma-separated, within 2..5)")
    p.add_argument("--no-variable", dest="variable", action="store_false", help="skip SFD-v and the 1-NFE stage")
    p.add_argument("--steps", type=int, help="batches per student (default: the presets')")
    p.add_argument("--one-step-steps", type=int, default=200, help="batches of the one-NFE stage")
    p.add_argument("--dmd2", type=Path, help="a finished DMD2 run folder (e.g. runs/quickstart) for the cost row")
    p.add_argument("--work", type=Path, default=Path("runs/bench_sfd"), help="run folders (reused when complete)")
    p.add_argument("--out", type=Path, required=True, help="the folder the tables and pictures go to")
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--rerun", action="store_true")
    p.add_argument("--trajectories", action="store_true",
                   help="only score the teacher's 3M trajectories on SFD's grids -> OUT/sfd_teacher_trajectories.json")
    args = p.parse_args(argv)
    args.teacher = None
    if args.trajectories:
        rows = trajectory_rows(NFES)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sfd_teacher_trajectories.json").write_text(json.dumps(rows, indent=2))
        return
    try:
        args.nfes = tuple(int(k) for k in args.nfes.split(","))
    except ValueError:
        raise UserError(f"--nfes must be comma-separated integers, got {args.nfes!r}") from None
    if any(k not in NFES for k in args.nfes):
        raise UserError(f"--nfes must lie within {', '.join(map(str, NFES))}")
    args.work.mkdir(parents=True, exist_ok=True)
    rows, reference = run_all(plan(args), args)
    if args.variable:
        more, _ = run_all([one_step_run(args)], args)
        rows += more
    device = "cuda" if not args.cpu and __import__("torch").cuda.is_available() else "cpu"
    teacher = teacher_rows(sorted(set(args.nfes) | {1}), args.eval_samples, device)
    dmd2 = json.loads((args.dmd2 / "metrics.json").read_text()) if args.dmd2 else None
    write_report(rows, teacher, reference, dmd2, args.out)
    print((args.out / "sfd_digits.md").read_text())


if __name__ == "__main__":
    main()
