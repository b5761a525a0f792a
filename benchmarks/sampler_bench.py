"""The sampler graph (export/sampler.py) against the runtime's step loop on the same student, side by side in one run:
`python -m benchmarks.sampler_bench --engine DIR [--nfe K] [--batches 1,64] [--threads 2] --out OUT`.

Per batch size, two variants take turns (runtime_bench.time_interleaved): the whole request through
`runtime.Pipeline` (ONNX Runtime on the CPU: noise from the seed, the loop in numpy, uint8), and one ONNX Runtime
call of the sampler graph (noise and labels in, uint8 out; the caller's noise drawn once, outside the timing, as a
client of a graph server sends it). Both with the same intra-op threads. Writes OUT.md and OUT.json.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from benchmarks.runtime_bench import cpu_name, time_interleaved, write_report
from export.sampler import sampler_name, write_sampler
from fewstep.errors import cli_main
from runtime.noise import request_noise
from runtime.pipeline import Pipeline


def bench(engine: Path, nfe: int | None, batches: list[int], threads: int, seconds: float) -> dict:
    import onnxruntime as ort

    pipe = Pipeline.load(engine, "onnxruntime-cpu", threads=threads)
    nfe = pipe.schedule(nfe)["nfe"]
    path = engine / sampler_name(nfe, "fp32")
    if not path.exists():
        write_sampler(engine, nfe)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rows = []
    for n in batches:
        labels = np.arange(n) % (pipe.num_classes or 1) if pipe.num_classes else None
        feed = {"noise": request_noise(0, 0, n, pipe.draws(nfe), pipe.x_shape)}
        if labels is not None:
            feed["class_labels"] = labels.astype(np.int64)
        conditions = None if labels is None else labels.tolist()
        loop, graph = time_interleaved([
            lambda: pipe.generate(conditions, n=n, nfe=nfe, seed=0),  # noqa: B023 (called within this iteration)
            lambda: session.run(["images"], feed)], seconds)  # noqa: B023
        same = np.abs(session.run(["images"], feed)[0].astype(int) -
                      pipe.generate(conditions, n=n, nfe=nfe, noise=feed["noise"]).images.astype(int)).max()
        rows.append({"batch": n, "loop_ms": float(np.median(loop)), "graph_ms": float(np.median(graph)),
                     "loop_per_image_ms": float(np.median(loop)) / n, "graph_per_image_ms": float(np.median(graph)) / n,
                     "calls": [len(loop), len(graph)], "max_level_difference": int(same)})
    return {"engine": str(engine), "method": pipe.manifest.get("method"), "nfe": nfe, "threads": threads,
            "cpu": cpu_name(), "cores": os.cpu_count(), "rows": rows}


def markdown(report: dict) -> str:
    lines = [f"# The sampler graph vs the runtime's step loop ({report['method']} student, NFE {report['nfe']})", "",
             f"`python -m benchmarks.sampler_bench {' '.join(sys.argv[1:])}` on {report['cpu']} "
             f"({report['cores']} cores), ONNX Runtime on the CPU, {report['threads']} intra-op threads, fp32; "
             "medians of calls taking turns.", "",
             "| batch | step loop (ms) | sampler graph (ms) | per image, loop / graph (ms) | graph / loop | "
             "max uint8 difference |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['batch']} | {r['loop_ms']:.2f} | {r['graph_ms']:.2f} | {r['loop_per_image_ms']:.3f} / "
                     f"{r['graph_per_image_ms']:.3f} | {r['graph_ms'] / r['loop_ms']:.2f} | "
                     f"{r['max_level_difference']} |")
    return "\n".join(lines) + "\n"


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.sampler_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", type=Path, required=True)
    p.add_argument("--nfe", type=int)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per variant and batch size")
    p.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.json")
    args = p.parse_args(argv)
    report = bench(args.engine, args.nfe, [int(b) for b in args.batches.split(",")], args.threads, args.seconds)
    write_report(args.out, report, markdown(report))


if __name__ == "__main__":
    main()
