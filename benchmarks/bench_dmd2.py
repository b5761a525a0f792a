"""DMD2 on the digits teacher: the student table (`python -m benchmarks.bench_dmd2`).

Runs `python -m distill.run` once per entry of --runs (each a preset, optionally with `+key=value`
overrides, and optionally named: `name=preset+key=value+...`), as separate processes (--parallel of them
at a time: several fit on one GPU), then writes docs/dmd2_digits.md / .json / .png: FD and class accuracy
of every student at each NFE it serves (1,000 samples by default), training time, peak memory and
images/s, next to the teacher's 50-step reference from the committed baselines.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from distill.errors import UserError, cli_main
from distill.run import PRESETS

DEFAULT_RUNS = ["digits-1step", "digits-4step", "digits-4step-no-bsim", "digits-dm-only", "digits-ttur",
                "digits-regression"]


def parse_run(spec: str) -> tuple[str, str, list[str]]:
    """'name=preset+k=v+k=v' or 'preset' -> (name, preset, ['k=v', ...])."""
    name, _, rest = spec.partition("=") if "=" in spec.split("+")[0] else ("", "", spec)
    preset, *overrides = rest.split("+")
    if preset not in PRESETS:
        raise UserError(f"--runs: unknown preset {preset!r} in {spec!r}; presets: {', '.join(PRESETS)}")
    return name or preset, preset, overrides


def command(preset: str, overrides: list[str], out: Path, args) -> list[str]:
    cmd = [sys.executable, "-m", "distill.run", "--preset", preset, "--out", str(out), "--no-progress",
           "--eval-samples", str(args.eval_samples)]
    for o in overrides:
        cmd += ["--set", o]
    if args.cpu:
        cmd.append("--cpu")
    if args.teacher is not None:
        cmd += ["--teacher", str(args.teacher)]
    return cmd


def run_all(runs: list[tuple[str, str, list[str]]], args) -> tuple[list[dict], dict | None]:
    """Launch the runs, --parallel at a time; a finished run's folder is reused (its metrics read back)."""
    pending, active, results = list(runs), [], {}
    while pending or active:
        while pending and len(active) < args.parallel:
            name, preset, overrides = pending.pop(0)
            out = args.work / name
            if (out / "metrics.json").exists() and not args.rerun:
                results[name] = (preset, overrides, None)
                continue
            log = open(args.work / f"{name}.log", "w")
            env = os.environ | {"PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(command(preset, overrides, out, args), stdout=log, stderr=subprocess.STDOUT,
                                    env=env)
            active.append((name, preset, overrides, proc, time.perf_counter(), log))
            print(f"started {name}: preset {preset} {' '.join(overrides)}")
        for item in list(active):
            name, preset, overrides, proc, t0, log = item
            if proc.poll() is not None:
                log.close()
                active.remove(item)
                if proc.returncode != 0:
                    raise UserError(f"run {name} failed (exit {proc.returncode}); see {args.work / (name + '.log')}")
                results[name] = (preset, overrides, round(time.perf_counter() - t0, 1))
                print(f"finished {name} in {results[name][2]:.0f} s")
        time.sleep(1)
    rows, reference = [], None
    for name, preset, overrides in runs:
        metrics = json.loads((args.work / name / "metrics.json").read_text())
        for row in metrics.get("student", {}).values():
            if "fd_heldout" not in row:  # a run from before distill.run reported it: the same samples, measured now
                row["fd_heldout"] = heldout_fd(args.work / name / "student", row["nfe"], row["n"])
            rows.append({"run": name, "preset": preset, "overrides": overrides, **row,
                         "train_seconds": metrics["train_seconds"], "peak_memory_mb": metrics["peak_memory_mb"],
                         "device": metrics["device"], "threads": metrics["threads"]})
        reference = reference or metrics.get("teacher_reference")
    return rows, reference


def heldout_fd(bundle_dir: Path, nfe: int, n: int) -> float:
    """FD against the held-out split of the samples distill.run evaluates (seed 1, labels cycling)."""
    from distill.bundle import load_bundle
    from distill.eval.metrics import heldout_metric
    from distill.run import EVAL_SEED
    from distill.sample import parse_labels, sample_student

    bundle = load_bundle(bundle_dir)
    images = sample_student(bundle, nfe, n, parse_labels("cycle", n, bundle.num_classes), EVAL_SEED, progress=False)
    return heldout_metric()(images)["fd"]


def write_report(rows: list[dict], reference: dict | None, out: Path, tag: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = "dmd2_digits" + (f"_{tag}" if tag else "")
    (out / f"{stem}.json").write_text(json.dumps({"reference": reference, "rows": rows}, indent=2))
    lines = ["| run | settings | NFE | FD ↓ | held-out FD ↓ | class accuracy | train s | peak MB | images/s | device |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        settings = " ".join([r["preset"], *r["overrides"]])
        heldout = f"{r['fd_heldout']:.3f}" if r.get("fd_heldout") is not None else "–"
        lines.append(f"| {r['run']} | {settings} | {r['nfe']} | {r['fd']:.3f} | {heldout} | "
                     f"{100 * r['accuracy']:.1f}% | {r['train_seconds']:.0f} | {r['peak_memory_mb']:.0f} | "
                     f"{r['images_per_s']:.0f} | {r['device']} |")
    if reference:
        # the teacher's baselines hold no held-out FD (benchmarks.compare_students --teacher-nfe 50 measures it)
        lines.append(f"| teacher | {reference['sampler']} (reference) | {reference['nfe']} | {reference['fd']:.3f} | "
                     f"– | {100 * reference['accuracy']:.1f}% | – | – | {reference['images_per_s']:.0f} | – |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(rows) + 1.5))
    labels = [f"{r['run']} ({r['nfe']} NFE)" for r in rows]
    ax.barh(labels, [r["fd"] for r in rows], color="C0")
    if reference:
        ax.axvline(reference["fd"], color="k", ls="--", label=f"teacher {reference['sampler']} {reference['nfe']} NFE")
        ax.legend(fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="digits FD (lower is better)", title="DMD2 students on the digits teacher")
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)
    plt.close(fig)


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_dmd2", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=",".join(DEFAULT_RUNS), help="comma-separated [name=]preset[+key=value...]")
    p.add_argument("--teacher", type=Path, help="teacher folder (default: the committed digits teacher)")
    p.add_argument("--work", type=Path, default=Path("runs/bench_dmd2"), help="run folders (reused when complete)")
    p.add_argument("--out", type=Path, required=True, help="the folder the tables and pictures go to")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (several fit on one GPU)")
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    p.add_argument("--rerun", action="store_true", help="run again even where a finished run exists")
    p.add_argument("--tag", default="", help="report name suffix: OUT/dmd2_digits_TAG.md/.json/.png")
    args = p.parse_args(argv)
    runs = [parse_run(s) for s in args.runs.split(",") if s]
    args.work.mkdir(parents=True, exist_ok=True)
    rows, reference = run_all(runs, args)
    write_report(rows, reference, args.out, args.tag)
    print((args.out / ("dmd2_digits" + (f"_{args.tag}" if args.tag else "") + ".md")).read_text())


if __name__ == "__main__":
    main()
