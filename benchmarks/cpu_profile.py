"""Where an engine's CPU time goes, and how close it comes to the machine's limit:
`python -m benchmarks.cpu_profile --engine DIR [--batches 1,64] [--threads 2] [--out docs/cpu_profile.md]`.

- Per-op time of every ONNX file in the engine on ONNX Runtime's CPU provider (its own profiler,
  `SessionOptions.enable_profiling`, on the graph as ONNX Runtime optimizes it), per batch size: the op types by
  time, and "outside kernels" (the executor between ops), so each table sums to the profiled run's total.
  The profiler adds a few microseconds per op, which matters at batch 1 (about 700-1000 ops a call): the
  unprofiled median is printed beside it.
- The same for OpenVINO when it is installed (its per-primitive counters, PERF_COUNT), with the kernel each
  layer ran (e.g. `brgconv_avx512_I8`, `jit_avx512_f32`).
- The student's multiply-accumulates per image: Conv / MatMul / Gemm of the fp32 graph, with the shapes ONNX
  Runtime ran them at (batch 1, graph unoptimized, weights not pre-packed, so every weight shape is visible).
- The CPU's measured peak: a 2048^3 GEMM per arithmetic, on the same threads: fp32 (ONNX Runtime MatMul, MLAS),
  int8 (ONNX Runtime MatMulInteger, uint8 x int8, MLAS's VNNI kernels), bf16 (OpenVINO MatMul with a bf16
  inference precision, oneDNN), best of a few calls each; and the achieved fraction = 2 x MACs x images/s over
  the peak of the arithmetic the variant's convolutions run in.
Writes OUT (Markdown) and OUT with .json. Needs onnx (for the GEMM graphs), not torch.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.runtime_bench import cpu_name
from runtime.errors import UserError, cli_main
from runtime.manifest import read_manifest

WEIGHTED_OPS = ("Conv", "MatMul", "Gemm")
GEMM_SIZE = 2048


def feed_for(manifest: dict, batch: int, seed: int = 0) -> dict:
    """A network input like the loop's first call: noise at the schedule's first sigma, classes cycling."""
    rng = np.random.default_rng(seed)
    schedule = manifest["schedule"]
    names = [i["name"] for i in manifest["inputs"]]
    shape = manifest["inputs"][names.index("x")]["shape"][1:]
    feed = {"x": (rng.standard_normal((batch, *shape)) * schedule["sigmas"][0]).astype(np.float32),
            "sigma": np.full(batch, schedule["sigmas"][0], np.float32),
            "timestep": np.full(batch, schedule["timesteps"][0], np.float32)}
    if "class_labels" in names:
        feed["class_labels"] = (np.arange(batch) % manifest["conditioning"]["num_classes"]).astype(np.int64)
    if "nfe" in names:
        feed["nfe"] = np.full(batch, schedule["nfe"], np.int64)
    unknown = [n for n in names if n not in feed]
    if unknown:
        raise UserError(f"benchmarks.cpu_profile feeds class or unconditional pixel engines; this one also takes "
                        f"{unknown}")
    return feed


def ort_session(path: Path, threads: int, profile_prefix: str | None = None, optimize: bool = True,
                prepack: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def profiler_events(session, feed: dict, runs: int, warmup: int) -> tuple[list[dict], list[dict]]:
    """(the node events, the model_run events) of the last `runs` of warmup + runs profiled calls."""
    for _ in range(warmup + runs):
        session.run(None, feed)
    trace = Path(session.end_profiling())
    try:
        events = json.loads(trace.read_text())
    finally:
        trace.unlink()
    model_runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][-runs:]
    start = model_runs[0]["ts"]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start]
    return nodes, model_runs


def median_ms(fn, seconds: float, min_calls: int = 5) -> float:
    for _ in range(3):
        fn()
    out, start = [], time.perf_counter()
    while len(out) < min_calls or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        out.append(1000 * (time.perf_counter() - t0))
    return float(np.median(out))


KINDS = ("int8 Conv/MatMul/Gemm", "float Conv/MatMul/Gemm", "Q/DQ", "layout changes", "other ops", "outside kernels")


def kind_of(op: str) -> str:
    """What an op (ONNX Runtime's op type, or OpenVINO's "layer type (kernel)") does, for the summary table."""
    name, _, kernel = op.partition(" (")
    if name in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
        return "Q/DQ"
    if name in ("Transpose", "ReorderInput", "ReorderOutput", "Reorder"):
        return "layout changes"
    if name in ("QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QGemm") or \
            name in ("Convolution", "FullyConnected", "MatMul") and "I8" in kernel:
        return "int8 Conv/MatMul/Gemm"
    if name in ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "Convolution", "FullyConnected"):
        return "float Conv/MatMul/Gemm"
    return "other ops"


def by_kind(times: dict, calls: dict, total_us: float) -> dict:
    """{kind: {"us", "calls", "share"}} over every op (KINDS), summing to `total_us`."""
    out = {k: {"us": 0.0, "calls": 0} for k in KINDS}
    for op, us in times.items():
        out[kind_of(op)]["us"] += us
        out[kind_of(op)]["calls"] += calls[op]
    out["outside kernels"]["us"] = total_us - sum(times.values())
    for v in out.values():
        v["share"] = v["us"] / total_us
    return out


def op_table(times: dict, calls: dict, total_us: float, top: int) -> list[dict]:
    """Op types by time (us per run); the rest folded into "other ops", and the time outside kernels, so the
    rows sum to `total_us`."""
    ranked = sorted(times, key=times.get, reverse=True)
    rows = [{"op": op, "us": times[op], "calls": calls[op]} for op in ranked[:top]]
    rest = ranked[top:]
    if rest:
        rows.append({"op": f"other ops ({len(rest)} types)", "us": sum(times[o] for o in rest),
                     "calls": sum(calls[o] for o in rest)})
    rows.append({"op": "outside kernels", "us": total_us - sum(times.values()), "calls": 0})
    for r in rows:
        r["share"] = r["us"] / total_us
    return rows


def profile_ort(path: Path, feed: dict, threads: int, runs: int, top: int = 12, seconds: float = 1.0) -> dict:
    """ONNX Runtime's per-op profile of one file at one batch size (us per run, averaged over `runs`)."""
    with tempfile.TemporaryDirectory() as tmp:
        session = ort_session(path, threads, profile_prefix=str(Path(tmp) / "ort"))
        nodes, model_runs = profiler_events(session, feed, runs, warmup=3)
    times, calls = defaultdict(float), defaultdict(int)
    for e in nodes:
        times[e["args"]["op_name"]] += e["dur"] / runs
        calls[e["args"]["op_name"]] += 1
    calls = {k: v // runs for k, v in calls.items()}
    total = sum(r["dur"] for r in model_runs) / runs
    plain = ort_session(path, threads)
    return {"engine": "onnxruntime", "total_us": total, "ops": op_table(times, calls, total, top),
            "kinds": by_kind(times, calls, total),
            "kernels": sum(calls.values()), "unprofiled_ms": median_ms(lambda: plain.run(None, feed), seconds)}


def profile_openvino(path: Path, feed: dict, threads: int, inference_precision: str, runs: int, top: int = 12,
                     seconds: float = 1.0) -> dict:
    """OpenVINO's per-primitive counters (us per run) of one file, compiled for this batch size, by layer type and
    the kernel it ran."""
    from runtime.openvino import OpenVinoBackend

    backend = OpenVinoBackend(path, inference_precision, threads)
    unprofiled = median_ms(lambda: backend.run(feed), seconds)
    backend.config["PERF_COUNT"] = True
    backend.compiled.clear()
    compiled = backend.compiled_for(len(feed["x"]))
    request = compiled.create_infer_request()
    times, calls = defaultdict(float), defaultdict(int)
    totals = []
    for i in range(3 + runs):
        t0 = time.perf_counter()
        request.infer(feed)
        wall = 1e6 * (time.perf_counter() - t0)
        if i < 3:
            continue
        totals.append(wall)
        for info in request.get_profiling_info():
            us = info.real_time.total_seconds() * 1e6
            if us > 0:
                key = f"{info.node_type} ({info.exec_type})"
                times[key] += us / runs
                calls[key] += 1
    calls = {k: v // runs for k, v in calls.items()}
    # OpenVINO's per-primitive counters can add up to a few % more than the call's wall time (timer overhead):
    # then the table's total is their sum and "outside kernels" is zero
    total = max(float(np.mean(totals)), sum(times.values()))
    return {"engine": f"openvino {inference_precision}", "total_us": total, "ops": op_table(times, calls, total, top),
            "kinds": by_kind(times, calls, total),
            "kernels": sum(calls.values()), "unprofiled_ms": unprofiled}


def session_start(path: Path, threads: int, calls: int = 3) -> dict:
    """Milliseconds to open an ONNX Runtime session (best of `calls`): from the file (optimizing it), while saving
    the optimized graph (SessionOptions.optimized_model_filepath), and from that saved graph with optimization
    off. The saved graph holds NCHWc / NHWC kernels for this CPU (ONNX Runtime warns): a cache, not a shippable
    file."""
    import onnxruntime as ort

    def best(make) -> float:
        out = []
        for _ in range(calls):
            t0 = time.perf_counter()
            make()
            out.append(1000 * (time.perf_counter() - t0))
        return min(out)

    with tempfile.TemporaryDirectory() as tmp:
        saved = str(Path(tmp) / "optimized.onnx")

        def saving():
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.optimized_model_filepath = saved
            options.log_severity_level = 3  # the hardware-specific warning, stated above
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def from_saved():
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            ort.InferenceSession(saved, options, providers=["CPUExecutionProvider"])

        return {"from_file_ms": best(lambda: ort_session(path, threads)), "saving_ms": best(saving),
                "from_optimized_ms": best(from_saved)}


def graph_macs(path: Path, feed1: dict) -> dict:
    """Multiply-accumulates per image of the Conv / MatMul / Gemm nodes, from the shapes ONNX Runtime's profiler
    records for an unoptimized, batch-1 run (out elements x the reduction length)."""
    with tempfile.TemporaryDirectory() as tmp:
        session = ort_session(path, 1, profile_prefix=str(Path(tmp) / "macs"), optimize=False, prepack=False)
        nodes, _ = profiler_events(session, feed1, runs=1, warmup=0)
    macs = defaultdict(int)
    for e in nodes:
        op = e["args"]["op_name"]
        if op not in WEIGHTED_OPS:
            continue
        shapes = [next(iter(d.values())) for d in e["args"]["input_type_shape"]]
        out = next(iter(e["args"]["output_type_shape"][0].values()))
        if op == "Conv":  # weight (C_out, C_in / groups, kh, kw)
            reduce = int(np.prod(shapes[1][1:]))
        elif op == "MatMul":  # (..., M, K) x (..., K, N)
            reduce = shapes[0][-1]
        else:  # Gemm: A is (M, K) or, transposed, (K, M); out is (M, N)
            reduce = int(np.prod(shapes[0])) // out[0]
        macs[op] += int(np.prod(out)) * reduce
    return dict(macs)


def gemm_graph(n: int, kind: str) -> bytes:
    """A one-node ONNX graph: (n, n) activations times an (n, n) weight, fp32 MatMul or uint8 x int8
    MatMulInteger."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if kind == "fp32":
        a, y, op = TensorProto.FLOAT, TensorProto.FLOAT, "MatMul"
        w = rng.standard_normal((n, n)).astype(np.float32)
    else:
        a, y, op = TensorProto.UINT8, TensorProto.INT32, "MatMulInteger"
        w = rng.integers(-127, 128, (n, n)).astype(np.int8)
    graph = helper.make_graph([helper.make_node(op, ["a", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("a", a, [n, n])],
                              [helper.make_tensor_value_info("y", y, [n, n])], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def best_seconds(fn, calls: int = 5) -> float:
    fn()
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def gemm_peak(threads: int, n: int = GEMM_SIZE) -> dict:
    """Measured GEMM throughput (G multiply-adds x 2 per second) per arithmetic on `threads` threads."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    peak = {}
    for kind in ("fp32", "int8"):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(gemm_graph(n, kind), options, providers=["CPUExecutionProvider"])
        a = rng.standard_normal((n, n)).astype(np.float32) if kind == "fp32" else \
            rng.integers(0, 256, (n, n)).astype(np.uint8)
        peak[kind] = {"gops": 2 * n**3 / best_seconds(lambda s=session, x=a: s.run(None, {"a": x})) / 1e9,
                      "how": f"ONNX Runtime {'MatMul fp32' if kind == 'fp32' else 'MatMulInteger uint8 x int8'}, "
                             f"{n}^3, {threads} threads"}
    try:
        import openvino as ov
        import openvino.opset13 as ops

        from runtime.openvino import cpu_supports_bf16
    except ImportError:
        return peak
    for kind, hint in (("fp32", "f32"), ("bf16", "bf16")):
        if hint == "bf16" and not cpu_supports_bf16():
            continue
        param = ops.parameter([n, n], ov.Type.f32, name="a")
        model = ov.Model([ops.matmul(param, ops.constant(rng.standard_normal((n, n)).astype(np.float32)), False,
                                     False)], [param])
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                          "INFERENCE_NUM_THREADS": threads,
                                                          "PERFORMANCE_HINT": "LATENCY"})
        request, x = compiled.create_infer_request(), rng.standard_normal((n, n)).astype(np.float32)
        gops = 2 * n**3 / best_seconds(lambda r=request, v=x: r.infer({0: v})) / 1e9
        if gops > peak.get(kind, {}).get("gops", 0):
            peak[kind] = {"gops": gops, "how": f"OpenVINO MatMul, inference precision {hint}, {n}^3, {threads} threads"}
    return peak


CPU_PRECISIONS = ("fp32", "int8", "int8-cpu", "bf16")  # the UNet's files a CPU runs (not fp16, plans, latent parts)


def variants(manifest: dict, openvino: bool) -> list[tuple[str, str, str, str]]:
    """(label, engine, file precision, arithmetic of its convolutions) for each CPU file of the engine, on ONNX
    Runtime (files that name no other backend) and, when installed, on OpenVINO (in the file's inference
    precision: bf16 for the bf16 entry, else f32)."""
    out = []
    for precision, entry in manifest["files"].items():
        if precision not in CPU_PRECISIONS:
            continue
        arithmetic = "int8" if precision.startswith("int8") else precision
        if "backend" not in entry:
            out.append((f"onnxruntime {precision}", "onnxruntime", precision, arithmetic))
        if openvino:
            hint = entry.get("inference_precision", "f32")
            out.append((f"openvino {precision}", f"openvino-{hint}", precision, arithmetic))
    return out


def markdown(result: dict) -> str:
    lines = [f"# CPU profile: {result['engine']}", "",
             f"Machine: {result['machine']}; {result['threads']} threads; load average while profiling "
             f"{result['load']}. Command: `{result['command']}`", "",
             "What this shows and what was done about it: the README's \"CPU speed\" section. Timings on a shared "
             "machine vary by tens of percent from minute to minute; compare variants within one table.", "",
             f"Work per image: **{result['macs_per_image'] / 1e6:.1f} M multiply-accumulates** "
             f"({', '.join(f'{k} {v / 1e6:.1f} M' for k, v in result['macs'].items())}), "
             f"{2 * result['macs_per_image'] / 1e6:.0f} MFLOP.", "", "## The CPU's measured peak", "",
             "| arithmetic | GFLOP/s (GOP/s for int8) | how |", "|---|---:|---|"]
    for kind, p in result["peak"].items():
        lines.append(f"| {kind} | {p['gops']:.0f} | {p['how']} |")
    lines += ["", "## Achieved", "", "| variant | batch | unprofiled ms | images/s | GFLOP/s | peak used | achieved |",
              "|---|---:|---:|---:|---:|---|---:|"]
    for v in result["variants"]:
        lines.append(f"| {v['label']} | {v['batch']} | {v['unprofiled_ms']:.3f} | {v['images_per_s']:.0f} | "
                     f"{v['gflops']:.1f} | {v['arithmetic']} | {100 * v['fraction_of_peak']:.1f} % |")
    lines += ["", "## Where the time goes, by kind", "",
              "Share of the profiled run (kernel calls per run in brackets). \"outside kernels\": the executor between "
              "ops, including the profiler's own cost, which dominates at batch 1 on ONNX Runtime.", "",
              "| variant | batch | " + " | ".join(KINDS) + " |", "|---|---:|" + "---:|" * len(KINDS)]
    for v in result["variants"]:
        cells = [f"{100 * v['kinds'][k]['share']:.1f} %" + (f" ({v['kinds'][k]['calls']})" if v["kinds"][k]["calls"]
                                                            else "") for k in KINDS]
        lines.append(f"| {v['label']} | {v['batch']} | " + " | ".join(cells) + " |")
    lines += ["", f"## Starting a session (ONNX Runtime, {result['threads']} threads)", "",
              "| file | from the file, ms | saving the optimized model, ms | from the saved optimized model, ms |",
              "|---|---:|---:|---:|"]
    for precision, t in result.get("session_start", {}).items():
        lines.append(f"| {precision} | {t['from_file_ms']:.0f} | {t['saving_ms']:.0f} | {t['from_optimized_ms']:.0f} |")
    for v in result["variants"]:
        lines += ["", f"## {v['label']}, batch {v['batch']}", "",
                  f"Profiled run {v['total_us'] / 1000:.3f} ms ({v['kernels']} kernels), unprofiled median "
                  f"{v['unprofiled_ms']:.3f} ms.", "", "| op | us per run | calls | share |", "|---|---:|---:|---:|"]
        for r in v["ops"]:
            lines.append(f"| {r['op']} | {r['us']:.1f} | {r['calls']} | {100 * r['share']:.1f} % |")
        lines.append(f"| **total** | **{sum(r['us'] for r in v['ops']):.1f}** | | **100 %** |")
    return "\n".join(lines) + "\n"


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"
    except OSError:
        return "unknown"


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", type=Path, required=True)
    p.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads (ONNX Runtime, OpenVINO)")
    p.add_argument("--runs", type=int, default=0, help="profiled calls per cell (default: ~1 s of calls)")
    p.add_argument("--openvino", choices=("auto", "no"), default="auto", help="also profile OpenVINO when installed")
    p.add_argument("--no-peak", action="store_true", help="skip the GEMM peak (tests)")
    p.add_argument("--out", type=Path, required=True, help="the report (OUT, with OUT.json beside it)")
    args = p.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise UserError(f"--batches must be comma-separated integers, got {args.batches!r}") from None
    manifest = read_manifest(args.engine)
    from runtime.openvino import openvino_available

    openvino = args.openvino == "auto" and openvino_available()
    fp32 = manifest["files"].get("fp32")
    if fp32 is None:
        raise UserError(f"{args.engine} has no fp32 file to count the student's multiply-accumulates on")
    macs = graph_macs(args.engine / fp32["path"], feed_for(manifest, 1))
    per_image = sum(macs.values())
    peak = {} if args.no_peak else gemm_peak(args.threads)
    rows = []
    for label, engine, precision, arithmetic in variants(manifest, openvino):
        path = args.engine / manifest["files"][precision]["path"]
        for batch in batches:
            feed = feed_for(manifest, batch)
            runs = args.runs or max(3, 200 // batch)
            if engine == "onnxruntime":
                prof = profile_ort(path, feed, args.threads, runs)
            else:
                prof = profile_openvino(path, feed, args.threads, engine.removeprefix("openvino-"), runs)
            images_per_s = 1000 * batch / prof["unprofiled_ms"]
            gflops = 2 * per_image * images_per_s / 1e9
            top = peak.get(arithmetic, {}).get("gops")
            rows.append({"label": label, "precision": precision, "batch": batch, "arithmetic": arithmetic,
                         "images_per_s": images_per_s, "gflops": gflops,
                         "fraction_of_peak": gflops / top if top else float("nan"), **prof})
            print(f"{label} batch {batch}: {prof['unprofiled_ms']:.3f} ms, {images_per_s:.0f} images/s, "
                  f"{gflops:.1f} GFLOP/s", flush=True)
    starts = {precision: session_start(args.engine / manifest["files"][precision]["path"], args.threads)
              for label, engine, precision, _ in variants(manifest, False) if engine == "onnxruntime"}
    result = {"engine": str(args.engine), "machine": f"{cpu_name()}, {os.cpu_count()} cores", "threads": args.threads,
              "load": load_average(),
              "command": "python -m benchmarks.cpu_profile " + " ".join(sys.argv[1:] if argv is None else argv),
              "macs": macs, "macs_per_image": per_image, "peak": peak, "variants": rows, "session_start": starts}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(result))
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
