"""The native runtime against the Python runtime and a bare OpenVINO call on the same file, side by side in one run:
`python -m benchmarks.native_bench --engine DIR --lib build/capi/libfewstep.so --out OUT`.

Per precision and batch size, three variants are timed in turns of ~0.1 s (so the machine's other load falls on all
three alike): the whole request through libfewstep (called through ctypes: one C call), the whole request through
`runtime.Pipeline` (backend openvino-cpu), and the bare network call (OpenVINO's Python API, the compiled model for
that batch with the runtime's settings and an infer request whose inputs are already set: the floor for one call).
Beside them, the same bare call through ONNX Runtime at the given threads and at one thread (its fastest setting for
int8 at batch 1), so the table shows the fastest network call this CPU makes, whichever library makes it.
The engine's NFE is its default; for a 1-step student one request is one network call. Writes OUT.md and OUT.json.
"""

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.runtime_bench import cpu_name, time_interleaved
from fewstep.errors import UserError, cli_main
from runtime.noise import request_noise
from runtime.pipeline import Pipeline


class Params(ctypes.Structure):  # fewstep_params (runtime/capi/fewstep.h)
    _fields_ = [("labels", ctypes.POINTER(ctypes.c_int64)), ("n", ctypes.c_int32), ("nfe", ctypes.c_int32),
                ("seed", ctypes.c_uint64), ("noise", ctypes.POINTER(ctypes.c_float)), ("batch_size", ctypes.c_int32),
                ("progress", ctypes.c_void_p), ("user_data", ctypes.c_void_p)]


def native_request(lib, ctx, labels: np.ndarray | None, n: int, size: int):
    params = Params()
    lib.fewstep_params_init(ctypes.byref(params))
    keep = None if labels is None else np.ascontiguousarray(labels, dtype=np.int64)
    if keep is not None:
        params.labels = keep.ctypes.data_as(ctypes.POINTER(ctypes.c_int64))
    params.n, params.batch_size, params.seed = n, n, 0
    out = np.empty(n * size, np.uint8)

    def call():
        status = lib.fewstep_generate(ctx, ctypes.byref(params), out.ctypes.data_as(ctypes.c_void_p), out.size)
        if status != 0:
            raise UserError(f"libfewstep: {lib.fewstep_last_error().decode()}")
        return keep  # the labels must outlive the call

    return call, out


def bare_call(engine: Path, precision: str, pipe: Pipeline, labels, n: int, threads: int):
    """One network call through OpenVINO itself, compiled as the runtime compiles it, inputs set once."""
    import openvino as ov

    entry = pipe.manifest["files"][precision]
    core = ov.Core()
    model = core.read_model(str(engine / entry["path"]))
    model.reshape({p.get_any_name(): [n, *(d.get_length() for d in p.get_partial_shape()[1:])] for p in model.inputs})
    config = {"INFERENCE_PRECISION_HINT": entry.get("inference_precision", "f32"), "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": threads}
    request = core.compile_model(model, "CPU", config).create_infer_request()
    schedule = pipe.schedule(None)
    x = request_noise(0, 0, n, pipe.draws(schedule["nfe"]), pipe.x_shape)[:, 0] * schedule["sigmas"][0]
    feed = {"x": x.astype(np.float32), "sigma": np.full(n, schedule["sigmas"][0], np.float32),
            "timestep": np.full(n, schedule["timesteps"][0], np.float32)}
    if labels is not None:
        feed["class_labels"] = labels.astype(np.int64)
    if "nfe" in pipe.inputs:
        feed["nfe"] = np.full(n, schedule["nfe"], np.int64)
    for name, value in feed.items():
        request.set_tensor(name, ov.Tensor(np.ascontiguousarray(value)))
    return request.infer, feed


def bare_onnxruntime(engine: Path, precision: str, pipe: Pipeline, feed: dict, threads: int):
    """The same network call through ONNX Runtime's Python API (its C++ session; inputs made once)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(engine / pipe.manifest["files"][precision]["path"]), options,
                                   providers=["CPUExecutionProvider"])
    return lambda: session.run(None, feed)


def measure(engine: Path, lib_path: Path, precisions: list[str], batches: list[int], threads: int,
            seconds: float) -> list[dict]:
    os.environ["FEWSTEP_THREADS"] = str(threads)  # the Python runtime's OpenVINO threads
    lib = ctypes.CDLL(str(lib_path))
    lib.fewstep_open.restype = ctypes.c_void_p
    lib.fewstep_open.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int32]
    lib.fewstep_generate.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    lib.fewstep_last_error.restype = ctypes.c_char_p
    lib.fewstep_close.argtypes = [ctypes.c_void_p]
    rows = []
    for precision in precisions:
        pipe = Pipeline.load(engine, "openvino-cpu", precision, threads=threads)
        ctx = lib.fewstep_open(str(engine).encode(), b"openvino-cpu", precision.encode(), threads)
        if not ctx:
            raise UserError(f"libfewstep: {lib.fewstep_last_error().decode()}")
        size = int(np.prod(pipe.x_shape))
        for n in batches:
            labels = np.arange(n) % pipe.num_classes if pipe.num_classes else None
            native, images = native_request(lib, ctx, labels, n, size)
            conditions = None if labels is None else labels.tolist()

            def python(n=n, conditions=conditions, pipe=pipe):
                return pipe.generate(conditions, n=None if conditions is not None else n, seed=0, batch_size=n)

            bare, feed = bare_call(engine, precision, pipe, labels, n, threads)
            ort_n = bare_onnxruntime(engine, precision, pipe, feed, threads)
            ort_1 = bare_onnxruntime(engine, precision, pipe, feed, 1)
            native()  # warm-up: compiles this batch size
            want = python().images
            assert images.tobytes() == want.tobytes(), "the native library and the Python runtime disagree"
            times = time_interleaved([native, python, bare, ort_n, ort_1], seconds)
            ms = {k: float(np.median(t)) for k, t in zip(("native", "python", "bare", "ort", "ort_1thread"), times)}
            rows.append({"precision": precision, "batch": n, **{f"{k}_ms": round(v, 4) for k, v in ms.items()},
                         "native_per_image_ms": round(ms["native"] / n, 4),
                         "native_vs_bare": round(ms["native"] / ms["bare"] - 1, 4),
                         "python_vs_bare": round(ms["python"] / ms["bare"] - 1, 4)})
            print(json.dumps(rows[-1]), flush=True)
        lib.fewstep_close(ctx)
    return rows


def markdown(result: dict) -> str:
    lines = [f"Machine: {result['cpu']}; threads: {result['threads']}. Command: `{result['command']}`", "",
             "p50 latency of one request (ms); the native library and the Python runtime make the whole request "
             "(noise, loop, uint8), the bare calls are one network call with its inputs already set.", "",
             "| precision | batch | libfewstep | Python runtime | bare OpenVINO call | bare ONNX Runtime call | "
             "same, 1 thread | libfewstep per image | libfewstep vs bare OpenVINO | Python vs bare OpenVINO |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['precision']} | {r['batch']} | {r['native_ms']:.3f} | {r['python_ms']:.3f} | "
                     f"{r['bare_ms']:.3f} | {r['ort_ms']:.3f} | {r['ort_1thread_ms']:.3f} | "
                     f"{r['native_per_image_ms']:.3f} | {100 * r['native_vs_bare']:+.1f} % | "
                     f"{100 * r['python_vs_bare']:+.1f} % |")
    return "\n".join(lines) + "\n"


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.native_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", type=Path, required=True, help="an engine folder with OpenVINO-servable files")
    p.add_argument("--lib", type=Path, default=Path("build/capi/libfewstep.so"), help="libfewstep (make native)")
    p.add_argument("--precisions", default="fp32", help="comma-separated files of the engine (fp32, int8-cpu, ...)")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seconds", type=float, default=3.0, help="timing budget per cell")
    p.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.json")
    args = p.parse_args(argv)
    if not args.lib.exists():
        raise UserError(f"{args.lib} does not exist: build it with make native (or pass --lib)")
    rows = measure(args.engine, args.lib, args.precisions.split(","), [int(b) for b in args.batches.split(",")],
                   args.threads, args.seconds)
    result = {"cpu": cpu_name(), "threads": args.threads, "rows": rows, "time": time.strftime("%Y-%m-%d %H:%M"),
              "command": "python -m benchmarks.native_bench " + " ".join(sys.argv[1:] if argv is None else argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(markdown(result))
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
