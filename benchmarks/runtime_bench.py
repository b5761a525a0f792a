"""Latency of an engine folder, per backend x precision x batch x NFE, next to the PyTorch student (eager and
torch.compile) and the teacher's 50-step sampler: `python -m benchmarks.runtime_bench --engine DIR --out OUT`.

Each cell times `Pipeline.generate` (the whole request: noise, loop, uint8 images) after a warm-up, and reports
p50 / p90 latency and images/s at p50. The runtime's overhead is measured on the first ONNX Runtime cell at batch
1: `generate` against the bare backend call on the same inputs. Low-precision rows carry the digits FD that export's
quality gate measured for their file (the manifest's `quality`), next to their speed, so the choice is on both.
`--interleave` times the variants in turns of ~0.1 s instead of one after the other, for fair comparisons on a
shared machine.
Writes OUT.md, OUT.json and OUT.png.
The PyTorch and teacher rows need torch (and the bundle / teacher on this machine); the runtime itself does not.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from fewstep.errors import UserError, cli_main
from runtime.noise import request_noise
from runtime.openvino import openvino_available
from runtime.pipeline import Pipeline


def gpu_name() -> str | None:
    """The GPU's name when torch is importable and sees one (the runtime itself does not need torch)."""
    if "torch" not in sys.modules:
        return None
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def write_report(out: Path, report: dict, text: str) -> None:
    """OUT.json (the figures) and OUT.md (`text`, the page the docs quote), then the page on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(text)
    print(text)


def time_calls(fn, seconds: float, min_calls: int = 5, warmup: int = 3) -> np.ndarray:
    """Milliseconds of repeated fn() calls (after `warmup` untimed ones), for about `seconds` in all."""
    for _ in range(warmup):
        fn()
    out, start = [], time.perf_counter()
    while len(out) < min_calls or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        out.append(1000 * (time.perf_counter() - t0))
    return np.array(out)


def time_interleaved(fns: list, seconds: float, min_calls: int = 5, warmup: int = 3,
                     turn_s: float = 0.1, settle_s: float = 0.02) -> list[np.ndarray]:
    """Milliseconds of each fn, the fns taking turns of about `turn_s` each for about `seconds` per fn in all:
    contention that comes and goes on a shared machine then hits every variant alike. The first `settle_s` of a
    turn is untimed (at least one call): ONNX Runtime's and OpenVINO's idle workers spin for a while after a call,
    and the previous variant's would otherwise slow this one down."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    out, start = [[] for _ in fns], time.perf_counter()
    while len(out[0]) < min_calls or time.perf_counter() - start < seconds * len(fns):
        for fn, ms in zip(fns, out):
            turn = time.perf_counter()
            fn()
            while time.perf_counter() - turn < settle_s:
                fn()
            while True:
                t0 = time.perf_counter()
                fn()
                ms.append(1000 * (time.perf_counter() - t0))
                if t0 - turn >= turn_s:
                    break
    return [np.array(ms) for ms in out]


def row(kind: str, backend: str, precision: str, batch: int, nfe: int, ms: np.ndarray, **extra) -> dict:
    p50 = float(np.percentile(ms, 50))
    return {"kind": kind, "backend": backend, "precision": precision, "batch": batch, "nfe": nfe,
            "p50_ms": round(p50, 3), "p90_ms": round(float(np.percentile(ms, 90)), 3),
            "images_per_s": round(1000 * batch / p50, 1), "calls": len(ms), **extra}


def quality(manifest: dict, precision: str, backend: str) -> dict:
    """The FD export's quality gate measured for this precision's file on this backend ({} when it has none); the
    PyTorch rows get the student's own FD from the same gate."""
    files = manifest["files"]
    if backend.startswith("pytorch"):
        q = next((f["quality"] for f in files.values() if "quality" in f), None)
        return {"fd": q["fd_pytorch_fp32"], "fd_change": 0.0} if q and precision == "fp32" else {}
    entry = files.get(precision, {})
    # OpenVINO runs int8 with its own rounding: its FD is the gate's run through it (quality_openvino); a file made
    # for OpenVINO (bf16) has it as its quality
    key = "quality_openvino" if backend == "openvino-cpu" and entry.get("backend") != backend else "quality"
    q = entry.get(key)
    return {"fd": q["fd"], "fd_change": q["fd_change"]} if q else {}


def runtime_overhead(pipe: Pipeline, seconds: float) -> dict:
    """generate() at NFE 1 (or the fewest served), batch 1, against the bare backend call on the same feed."""
    nfe = pipe.nfes[0]
    schedule = pipe.schedule(nfe)
    # the input generate's first call feeds (seed 0, image 0): the bare call runs on the same numbers
    x = request_noise(0, 0, 1, 1, pipe.x_shape)[:, 0].astype(np.float64) * schedule["sigmas"][0]
    feed = {"x": x.astype(np.float32), "sigma": np.full(1, schedule["sigmas"][0], np.float32),
            "timestep": np.full(1, schedule["timesteps"][0], np.float32)}
    if "class_labels" in pipe.inputs:
        feed["class_labels"] = np.zeros(1, np.int64)
    if "nfe" in pipe.inputs:
        feed["nfe"] = np.full(1, nfe, np.int64)
    calls = nfe  # NFE counts network calls (SFD's analytical first step makes none)
    labels = [0] if pipe.num_classes else None
    # interleaved: on a shared machine, load that comes and goes would otherwise land on one side only
    bare, full = time_interleaved([lambda: pipe.backend.run(feed),
                                   lambda: pipe.generate(labels, n=None if labels else 1, nfe=nfe, seed=0)], seconds)
    b, f = float(np.median(bare)) * calls, float(np.median(full))
    return {"nfe": nfe, "network_calls": calls, "bare_backend_ms": round(b, 4), "generate_ms": round(f, 4),
            "overhead": round(f / b - 1, 4), "backend": pipe.backend.name, "precision": pipe.precision}


def overhead_series(pipe: Pipeline, seconds: float, repeats: int) -> dict:
    """runtime_overhead `repeats` times with the compiled per-request arithmetic (runtime._native) and as many
    without it (numpy), alternating, so both see the same machine; the medians, and every run. A shared machine
    moves single runs by several percent either way, hence the series."""
    from runtime import native

    compiled = native.lib
    runs = {"compiled": [], "numpy": []}
    try:
        for i in range(repeats):
            order = (("compiled", compiled), ("numpy", None))
            for name, lib in order if i % 2 == 0 else order[::-1]:  # neither path always runs first
                if name == "compiled" and lib is None:
                    continue
                native.lib = lib
                runs[name].append(runtime_overhead(pipe, seconds))
    finally:
        native.lib = compiled
    out = {}
    for name, series in runs.items():
        if series:
            middle = sorted(series, key=lambda r: r["overhead"])[(len(series) - 1) // 2]  # a run's own figure
            out[name] = {"median": middle["overhead"], "median_run": middle,
                         "min": min(r["overhead"] for r in series), "max": max(r["overhead"] for r in series),
                         "runs": series}
    return out


def teacher_rows(teacher_dir: str, batches: list[int], seconds: float, steps: int = 50) -> list[dict]:
    """The teacher's DPM-Solver++(2M) at `steps` network calls (guided as its baselines were), per batch, on the
    GPU when torch sees one."""
    import torch

    from distill.sample import sample_teacher
    from distill.teachers import load_teacher

    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = load_teacher(teacher_dir).to(device)
    rows = []
    for batch in batches:
        labels = torch.arange(batch) % teacher.num_classes if teacher.num_classes else None
        ms = time_calls(lambda b=batch, lab=labels: sample_teacher(teacher, "dpmpp-2m", steps, b, lab,
                                                                   progress=False),
                        seconds, min_calls=2, warmup=1)
        rows.append(row("teacher", f"pytorch-{device}", "fp32", batch, steps, ms, sampler="dpmpp-2m"))
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [f"{r['backend']} {r['precision']}\nNFE {r['nfe']}" for r in rows if r["batch"] == rows[0]["batch"]]
    batches = sorted({r["batch"] for r in rows})
    width = 0.8 / len(batches)
    for k, batch in enumerate(batches):
        sel = [r for r in rows if r["batch"] == batch]
        ax.bar(np.arange(len(sel)) + k * width, [r["images_per_s"] for r in sel], width, label=f"batch {batch}")
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels, fontsize=7, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("images / s (p50)")
    ax.legend()
    ax.set_title("fewstep runtime: images per second")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict) -> str:
    lines = [f"# Runtime latency: {result['engine']}", "",
             f"Machine: {result['machine']}; threads: {result['threads']}"
             + (f"; load average at the end {' / '.join(f'{x:.2f}' for x in result['load_average'])} (1 / 5 / 15 min)"
                if "load_average" in result else "")
             + ("; variants interleaved" if result.get("interleaved") else "")
             + f". Command: `{result['command']}`", "",
             "| kind | backend | precision | NFE | batch | p50 ms | p90 ms | images/s | FD | FD vs PyTorch |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        fd = f"{r['fd']:.4f} | {100 * r['fd_change']:+.1f} %" if "fd" in r else "– | –"
        lines.append(f"| {r['kind']} | {r['backend']} | {r['precision']} | {r['nfe']} | {r['batch']} | "
                     f"{r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['images_per_s']:.0f} | {fd} |")
    o = result.get("overhead")
    if o:
        lines += ["", f"Runtime overhead ({o['backend']} {o['precision']}, NFE {o['nfe']}, batch 1): generate "
                      f"{o['generate_ms']:.3f} ms vs the bare backend call {o['bare_backend_ms']:.3f} ms: "
                      f"**{100 * o['overhead']:+.1f} %**."]
    for name, v in result.get("overhead_series", {}).items():
        how = "runtime._native, compiled" if name == "compiled" else "numpy, FEWSTEP_NATIVE=0"
        lines.append(f"- per-request arithmetic in {how}: median **{100 * v['median']:+.1f} %** over {len(v['runs'])} "
                     f"runs (range {100 * v['min']:+.1f} to {100 * v['max']:+.1f} %; generate "
                     + ", ".join(f"{r['generate_ms']:.2f}/{r['bare_backend_ms']:.2f}" for r in v["runs"]) + " ms)")
    for k, v in result.get("ratios", {}).items():
        lines.append(f"- {k}: **{v:.0f}×**")
    return "\n".join(lines) + "\n"


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.runtime_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", type=Path, required=True)
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--nfes", help="comma-separated NFEs (default: every NFE the engine serves)")
    p.add_argument("--precisions", help="comma-separated (default: every ONNX file in the engine)")
    p.add_argument("--backends", default="onnxruntime-cpu,openvino-cpu,pytorch,pytorch-compiled",
                   help="runtime backends to time (openvino-cpu needs openvino; pytorch* the bundle and torch)")
    p.add_argument("--teacher", default="auto", help="teacher folder for the 50-step row ('auto': the engine's "
                                                     "teacher; 'none' to skip)")
    p.add_argument("--bundle", help="the student bundle for the pytorch* rows (default: the path in the manifest)")
    p.add_argument("--seconds", type=float, default=2.0, help="timing budget per cell")
    p.add_argument("--interleave", action="store_true",
                   help="time the variants in turns of ~0.1 s, per (NFE, batch): fair comparisons on a machine "
                        "whose other load comes and goes")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="ONNX Runtime / torch intra-op threads")
    p.add_argument("--overhead-repeats", type=int, default=1,
                   help="measure the runtime overhead this many times, with and without the compiled per-request "
                        "arithmetic, alternating (the first ONNX Runtime cell reports their median)")
    p.add_argument("--out", type=Path, required=True, help="writes OUT.md, OUT.json and OUT.png")
    args = p.parse_args(argv)
    if args.overhead_repeats < 1 or args.overhead_repeats % 2 == 0 and args.overhead_repeats > 1:
        raise UserError(f"--overhead-repeats must be 1 or an odd number (its median is one run); got "
                        f"{args.overhead_repeats}")
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise UserError(f"--batches must be comma-separated integers, got {args.batches!r}") from None
    first = Pipeline.load(args.engine, "onnxruntime-cpu", threads=args.threads)
    nfes = [int(k) for k in args.nfes.split(",")] if args.nfes else first.nfes
    onnx = [k for k, v in first.manifest["files"].items() if v["path"].endswith(".onnx")]
    precisions = args.precisions.split(",") if args.precisions else onnx
    pipes, overhead = [], None
    for backend in args.backends.split(","):
        if backend.startswith("pytorch"):
            import torch

            torch.set_num_threads(args.threads)
        if backend == "openvino-cpu" and not openvino_available():
            print("skipped openvino-cpu: OpenVINO is not installed (pip install openvino, or the [cpu] extra)")
            continue
        if backend.startswith("pytorch"):  # the PyTorch student in fp32, and in fp16 beside an fp16 file on a GPU
            mine = ["fp32"] + (["fp16"] if "fp16" in precisions and torch.cuda.is_available() else [])
        for precision in (precisions if backend.startswith(("onnxruntime", "openvino")) else
                          mine if backend.startswith("pytorch") else ["fp32"]):
            try:
                if backend.startswith("pytorch"):  # the PyTorch reference (verify/), behind the same loop
                    from verify.reference import reference_pipeline

                    mode = backend.removeprefix("pytorch").removeprefix("-") or "eager"
                    pipe = reference_pipeline(args.engine, mode, precision, bundle=args.bundle)
                else:
                    pipe = Pipeline.load(args.engine, backend, precision, threads=args.threads)
            except UserError as e:
                print(f"skipped {backend} {precision}: {e}")
                continue
            if overhead is None and backend.startswith("onnxruntime"):
                if args.overhead_repeats > 1:
                    series = overhead_series(pipe, args.seconds, args.overhead_repeats)
                    overhead = series.get("compiled", series["numpy"])["median_run"]  # the headline: the median run
                else:
                    overhead = runtime_overhead(pipe, args.seconds)
            pipes.append((backend, precision, pipe))

    def request(pipe, batch: int, nfe: int):
        """One timed request: the batch as one network call where the engine allows it (generate's default
        would split it into chunks of 16; a TensorRT plan's profile caps it)."""
        labels = [int(c) for c in np.arange(batch) % pipe.num_classes] if pipe.num_classes else None
        chunk = min(batch, pipe.max_batch or batch)
        return lambda: pipe.generate(labels, n=None if labels else batch, nfe=nfe, seed=0, batch_size=chunk)

    cells = [(i, nfe, batch) for i in range(len(pipes)) for nfe in nfes for batch in batches]
    times = {}
    if args.interleave:  # per (NFE, batch), every pipeline in turn
        for nfe in nfes:
            for batch in batches:
                fns = [request(pipe, batch, nfe) for _, _, pipe in pipes]
                for i, ms in enumerate(time_interleaved(fns, args.seconds)):
                    times[i, nfe, batch] = ms
    else:
        for i, nfe, batch in cells:
            times[i, nfe, batch] = time_calls(request(pipes[i][2], batch, nfe), args.seconds)
    rows = []
    for i, nfe, batch in cells:
        backend, precision, pipe = pipes[i]
        rows.append(row("student", pipe.backend.name, pipe.precision, batch, nfe, times[i, nfe, batch],
                        **quality(first.manifest, precision, backend)))
        print(json.dumps(rows[-1]))
    teacher = first.manifest.get("student", {}).get("teacher") if args.teacher == "auto" else args.teacher
    if teacher and teacher != "none" and Path(teacher).exists():
        rows += teacher_rows(teacher, batches, args.seconds)
        print(json.dumps(rows[-1]))
    ratios = {}
    for batch in batches:
        best = max((r for r in rows if r["kind"] == "student" and r["batch"] == batch),
                   key=lambda r: r["images_per_s"], default=None)
        t = next((r for r in rows if r["kind"] == "teacher" and r["batch"] == batch), None)
        if best and t:
            ratios[f"batch {batch}: best student ({best['backend']} {best['precision']}, NFE {best['nfe']}) vs "
                   f"the teacher's 50 steps, images/s"] = best["images_per_s"] / t["images_per_s"]
    result = {"engine": str(args.engine), "machine": f"{cpu_name()}, {os.cpu_count()} cores"
              + (f", {gpu_name()}" if gpu_name() else ""), "threads": args.threads,
              "command": "python -m benchmarks.runtime_bench " + " ".join(sys.argv[1:] if argv is None else argv),
              "interleaved": args.interleave, "load_average": list(os.getloadavg()),
              "rows": rows, "overhead": overhead, "ratios": ratios}
    if args.overhead_repeats > 1 and overhead is not None:
        result["overhead_series"] = series
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result))
    plot(rows, args.out.with_suffix(".png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
