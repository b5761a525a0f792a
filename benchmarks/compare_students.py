"""Digits students compared on several noise seeds (`python -m benchmarks.compare_students BUNDLE ... --seeds 1,2,3`).

The FD of 1,000 samples moves by about 0.01 with the sampling noise alone (the teacher's 50 steps: 0.078 on
seed 0, 0.065 on seed 1), as much as the differences between good students. This draws every student, and
optionally the teacher's 50-step reference, on the same seeds (labels cycling) and reports per model the
mean and the spread over seeds of: FD against the training split (the reported metric), FD against the
held-out split (images no network trained on) and class accuracy; and how many seeds each model beats the
first one on, seed for seed (the same noise, so a paired comparison).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from distill.errors import UserError, cli_main

METRICS = (("fd", "FD ↓"), ("fd_heldout", "held-out FD ↓"), ("accuracy", "class accuracy"))


def compare(bundles: list[Path], seeds: list[int], n: int = 1000, teacher_nfe: int = 0,
            progress: bool = True, done: dict | None = None) -> list[dict]:
    """One entry per model: name, NFE, per-seed scores. Students at the most NFE they serve; the teacher
    (DPM-Solver++(2M), its default CFG) when teacher_nfe > 0. `done`: {(name, nfe, n, seed): scores} measured
    before (an earlier --out file), reused instead of sampling again."""
    from tqdm import tqdm

    from distill.bundle import load_bundle
    from distill.digits import TEACHER_DIR
    from distill.eval.metrics import digits_scores
    from distill.sample import parse_labels, sample_student, sample_teacher
    from distill.teachers import load_teacher

    labels = parse_labels("cycle", n, 10)
    done = done or {}

    def scores(name, nfe, sample) -> list[dict]:
        return [done.get((name, nfe, n, seed)) or digits_scores(sample(seed), labels.numpy()) for seed in seeds]

    models = []
    for path in tqdm(bundles, desc="students", disable=not progress):
        if not path.is_dir():
            raise UserError(f"{path} is not a student bundle folder")
        bundle = load_bundle(path)
        if bundle.num_classes != 10 or tuple(bundle.x_shape) != (1, 16, 16):
            raise UserError(f"{path} is not a student of the digits teacher (the metrics are the digits ones)")
        nfe = bundle.nfes[-1]
        runs = scores(str(path), nfe,
                      lambda seed, b=bundle, k=nfe: sample_student(b, k, n, labels, seed, progress=False))
        models.append({"name": str(path), "nfe": nfe, "n": n, "seeds": seeds, "scores": runs})
    if teacher_nfe:
        teacher = load_teacher(TEACHER_DIR)
        name = f"teacher, DPM-Solver++(2M) {teacher_nfe} steps"
        runs = scores(name, teacher_nfe, lambda seed: sample_teacher(teacher, "dpmpp-2m", teacher_nfe, n, labels, seed,
                                                                     progress=progress))
        models.append({"name": name, "nfe": teacher_nfe, "n": n, "seeds": seeds, "scores": runs})
    return models


def measured(path: Path) -> dict:
    """{(name, nfe, n, seed): scores} from an earlier --out JSON (empty when there is none)."""
    if not path.exists():
        return {}
    try:
        models = json.loads(path.read_text())["models"]
        return {(m["name"], m["nfe"], m["n"], seed): s for m in models for seed, s in zip(m["seeds"], m["scores"])}
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a compare_students result ({e}); move it away to measure afresh") from None


def summary(models: list[dict]) -> list[dict]:
    """Mean and sample standard deviation over seeds, and seed-for-seed wins against the first model."""
    first = models[0]["scores"]
    out = []
    for m in models:
        row = {"name": m["name"], "nfe": m["nfe"]}
        for key, _ in METRICS:
            values = np.array([s[key] for s in m["scores"]])
            row[key] = float(values.mean())
            row[f"{key}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        for key in ("fd", "fd_heldout"):
            row[f"{key}_wins"] = sum(s[key] < f[key] for s, f in zip(m["scores"], first))
        out.append(row)
    return out


def table(rows: list[dict], seeds: list[int], n: int) -> str:
    lines = [f"Mean ± standard deviation over noise seeds {', '.join(map(str, seeds))} ({n} samples each, labels "
             "cycling); 'wins': seeds on which the model's FD is below the first row's on the same noise.", "",
             "| model | NFE | " + " | ".join(title for _, title in METRICS) + " | wins (FD / held-out) |",
             "|---|---:|" + "---:|" * (len(METRICS) + 1)]
    for r in rows:
        cells = [f"{r[k]:.4f} ± {r[k + '_sd']:.4f}" if k != "accuracy" else
                 f"{100 * r[k]:.1f} ± {100 * r[k + '_sd']:.1f} %" for k, _ in METRICS]
        lines.append(f"| {r['name']} | {r['nfe']} | " + " | ".join(cells) +
                     f" | {r['fd_wins']} / {r['fd_heldout_wins']} of {len(seeds)} |")
    return "\n".join(lines) + "\n"


def picture(models: list[dict], path: Path) -> None:
    """Every seed's FD (training split) against its held-out FD, one colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    colours = plt.get_cmap("tab20")
    markers = {1: "o"}  # 1-step students round, multi-step square, the teacher a star
    for i, m in enumerate(models):
        teacher = m["name"].startswith("teacher")
        ax.scatter([s["fd"] for s in m["scores"]], [s["fd_heldout"] for s in m["scores"]], color=colours(i % 20),
                   marker="*" if teacher else markers.get(m["nfe"], "s"), s=60 if teacher else 22,
                   label=m["name"] if teacher else f"{Path(m['name']).parent.name} ({m['nfe']} NFE)")
    ax.set(xlabel="FD against the training split (reported)", ylabel="FD against the held-out split",
           title="digits students, one point per noise seed")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def rating_curves(bundles: list[Path]) -> dict[str, list[tuple[int, float]]]:
    """Per bundle, the checkpoint ratings its run logged (select_every: held-out FD every N steps), as (steps done,
    rating) pairs from the run folder's metrics.jsonl next to the bundle; bundles without any are left out."""
    curves = {}
    for path in bundles:
        log = Path(path).parent / "metrics.jsonl"
        if not log.exists():
            continue
        points = []
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line torn by a crash
                continue
            if "selection_score" in record:
                points.append((int(record["step"]) + 1, float(record["selection_score"])))
        if points:
            curves[str(path)] = points
    return curves


def curves_picture(curves: dict, nfes: dict[str, int], path: Path) -> None:
    """The ratings over training, one line per run, coloured by the student's NFE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colours = {n: plt.get_cmap("tab10")(i) for i, n in enumerate(sorted(set(nfes.values())))}
    labelled = set()
    for name, points in curves.items():
        nfe = nfes[name]
        steps, values = zip(*points)
        ax.plot(steps, values, color=colours[nfe], alpha=0.7, marker=".",
                label=None if nfe in labelled else f"{nfe}-step students")
        labelled.add(nfe)
    ax.set(xlabel="training steps", ylabel="held-out FD (checkpoint rating, 1,000 samples)", yscale="log",
           title="digits students over training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare_students", description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="+", type=Path, help="student bundles of the digits teacher; the first is the "
                                                          "one the others are compared with seed for seed")
    p.add_argument("--seeds", default="1,2,3,4,5", help="comma-separated noise seeds (1 is distill.run's)")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--teacher-nfe", type=int, default=0, help="also the teacher's DPM-Solver++(2M) at this NFE")
    p.add_argument("--out", type=Path, help="write OUT.md, OUT.json and OUT.png (and OUT_curves.png: the runs' "
                                             "checkpoint ratings over training, where logged); what OUT.json "
                                             "already holds for the same model, NFE, sample count and seed is reused")
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    if not seeds or args.samples < 2:
        raise UserError("need at least one seed and two samples")
    done = measured(args.out.with_suffix(".json")) if args.out else {}
    models = compare(args.bundles, seeds, args.samples, args.teacher_nfe, done=done)
    text = table(summary(models), seeds, args.samples)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python -m benchmarks.compare_students", *(argv if argv is not None else sys.argv[1:])])
        args.out.with_suffix(".md").write_text(f"`{command}`\n\n{text}")
        args.out.with_suffix(".json").write_text(json.dumps({"summary": summary(models), "models": models}, indent=1))
        picture(models, args.out.with_suffix(".png"))
        curves = rating_curves(args.bundles)
        if curves:  # runs with checkpoint selection: how their rating moved over training
            curves_picture(curves, {m["name"]: m["nfe"] for m in models},
                           args.out.with_name(args.out.name + "_curves.png"))


if __name__ == "__main__":
    main()
