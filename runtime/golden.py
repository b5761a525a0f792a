"""Golden vectors for hosts that reimplement the sampling loop (docs/engine_spec.md) in another language: one
request's inputs, the noise runtime.noise draws for it, every network call's feed and output, and the images, as
.npy files plus an index (golden.json) that states the tolerance a host should meet.

    python -m runtime.golden --engine runs/quickstart/engine --out runs/quickstart/golden --labels 0,1,2,3 --seed 0
    python -m runtime.golden --check runs/quickstart/golden        # reproduce them with this runtime

Files (call k counts network calls from 0; AFS's first step makes none):
    labels.npy (N,) int64 (class engines)       noise.npy (N, draws, C, H, W) float32: runtime.noise's draws
    call<k>_<input>.npy: the graph's feed        call<k>_prediction.npy: its output (float32)
    call<k>_state.npy: the loop's x (float64) before the call (the feed's x is it rounded to float32)
    call<k>_x0.npy: x0 from the prediction (float64)
    final.npy (N, C, H, W) float64: the loop's result    images.npy (N, H, W, C) uint8: the result as uint8
"""

import argparse
import copy
import hashlib
import json
import math
from pathlib import Path

import numpy as np

from . import noise as noise_gen
from .convention import x0_from_output
from .errors import UserError, cli_main
from .generate import parse_labels
from .pipeline import Pipeline

GOLDEN_INDEX = "golden.json"
GOLDEN_VERSION = 1
# What a host should meet, per precision. prediction: its network's output on the golden feed (fp32: the export's
# own parity bound against PyTorch, which covers other ONNX Runtime builds and providers). loop: its own loop's
# states, x0s and result; this bound is raised where x0's formula multiplies prediction errors by sigma (epsilon).
PREDICTION_MAX_ABS = {"fp32": 1e-4, "fp16": 1e-2, "int8": 1e-1}
NOISE_MAX_ABS = 1e-6  # float64 Box-Muller rounded to float32: another libm can move the last bit
X0_MAX_ABS = 1e-9  # x0 from the golden state and prediction: float64 arithmetic only


def tolerance(pipe: Pipeline, schedule: dict) -> dict:
    """The bounds a host should meet for this engine and schedule (see PREDICTION_MAX_ABS)."""
    predict = PREDICTION_MAX_ABS.get(pipe.precision, PREDICTION_MAX_ABS["int8"])
    # |d x0 / d prediction| per call: sigma (epsilon), sigma / sqrt(1 + sigma^2) (v_prediction), 1 (sample)
    m = pipe.manifest
    gain = max(abs(float(x0_from_output(np.ones(1), np.zeros(1), np.array([s]), m["prediction_type"],
                                        m.get("parameterization", "vp"), m.get("sigma_data", 0.5))[0]))
               for s in schedule["sigmas"])
    loop = predict * max(10.0, 2.0 * gain)
    return {"noise_max_abs": NOISE_MAX_ABS, "prediction_max_abs": predict, "x0_max_abs": X0_MAX_ABS,
            "loop_max_abs": loop, "images_max_abs": math.ceil(127.5 * loop)}


def record(pipe: Pipeline, labels: np.ndarray | None, n: int, nfe: int | None, seed: int) -> dict:
    """Run one request through `pipe` as one batch and keep every network call's feed, state, prediction and x0,
    the loop's result and the images. Wraps a copy of the pipeline (its `backend.run`, `denoise` and `sample`)."""
    if pipe.max_batch and n > pipe.max_batch:
        raise UserError(f"golden vectors take one batch: at most {pipe.max_batch} images for this engine")
    calls, finals = [], []
    rec = copy.copy(pipe)
    backend, denoise, sample = pipe.backend, rec.denoise, rec.sample

    class Recorder:
        name = backend.name

        def run(self, feed):
            out = backend.run(feed)
            calls.append({"feed": {k: np.array(v, copy=True) for k, v in feed.items()},
                          "prediction": np.array(out, np.float32, copy=True)})
            return out

    def recording_denoise(x, sigma, timestep, labels, nfe):
        x0, ms = denoise(x, sigma, timestep, labels, nfe)
        calls[-1].update(state=np.array(x, np.float64, copy=True), x0=np.array(x0, np.float64, copy=True),
                         sigma=float(sigma), timestep=float(timestep))
        return x0, ms

    def recording_sample(schedule, noise, labels):
        x, step_ms, backend_ms = sample(schedule, noise, labels)
        finals.append(np.array(x, np.float64, copy=True))
        return x, step_ms, backend_ms

    rec.backend, rec.denoise, rec.sample = Recorder(), recording_denoise, recording_sample
    out = rec.generate(labels, n=n if labels is None else None, nfe=nfe, seed=seed, batch_size=n)
    noise = noise_gen.request_noise(seed, 0, n, pipe.draws(out.nfe), pipe.x_shape)
    return {"nfe": out.nfe, "noise": noise, "calls": calls, "final": finals[0], "images": out.images}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_golden(engine_dir: str | Path, out_dir: str | Path, labels=None, n: int = 4, seed: int = 0,
                 nfe: int | None = None, precision: str = "fp32", backend: str = "onnxruntime-cpu") -> dict:
    """Write golden vectors for one request to out_dir; returns the index (also out_dir/golden.json)."""
    engine_dir, out_dir = Path(engine_dir), Path(out_dir)
    pipe = Pipeline.load(engine_dir, backend, precision)
    labels = pipe.check_labels(labels, n) if labels is not None or pipe.num_classes else None
    n = len(labels) if labels is not None else n
    got = record(pipe, labels, n, nfe, seed)
    schedule = pipe.schedule(got["nfe"])
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {out_dir} ({e.strerror}); choose another --out") from None

    def save(name: str, array: np.ndarray) -> str:
        np.save(out_dir / f"{name}.npy", array)
        return f"{name}.npy"

    calls = []
    for k, call in enumerate(got["calls"]):
        calls.append({"call": k, "step": schedule["sigmas"].index(call["sigma"]), "sigma": call["sigma"],
                      "timestep": call["timestep"],
                      "feed": {name: save(f"call{k}_{name}", value) for name, value in call["feed"].items()},
                      "prediction": save(f"call{k}_prediction", call["prediction"]),
                      "state": save(f"call{k}_state", call["state"]), "x0": save(f"call{k}_x0", call["x0"])})
    import onnxruntime

    entry = pipe.manifest["files"][precision]
    index = {
        "golden_version": GOLDEN_VERSION,
        "engine": {"dir": str(engine_dir.resolve()), "format_version": pipe.manifest["format_version"],
                   "method": pipe.manifest.get("method"), "prediction_type": pipe.manifest["prediction_type"],
                   "precision": precision, "file": entry["path"], "sha256": file_sha256(engine_dir / entry["path"])},
        "request": {"labels": None if labels is None else labels.tolist(), "n": n, "seed": seed, "nfe": got["nfe"]},
        "schedule": schedule,
        "produced_with": {"backend": pipe.backend.name, "onnxruntime": onnxruntime.__version__,
                          "numpy": np.__version__},
        "labels": None if labels is None else save("labels", labels),
        "noise": save("noise", got["noise"]),
        "calls": calls,
        "final": save("final", got["final"]),
        "images": save("images", got["images"]),
        "tolerance": tolerance(pipe, schedule),
        "notes": "max abs differences a host should stay within; with the same ONNX Runtime build on the CPU the "
                 "runtime reproduces every file exactly. loop_max_abs bounds the host's own loop (its states, feeds, "
                 "x0s and final.npy) run from the seed; prediction_max_abs and x0_max_abs bound one call on the "
                 "golden feed and state.",
    }
    (out_dir / GOLDEN_INDEX).write_text(json.dumps(index, indent=2))
    return index


def check_golden(golden_dir: str | Path, engine_dir: str | Path | None = None,
                 backend: str = "onnxruntime-cpu") -> dict:
    """Reproduce golden vectors with this runtime: {quantity: {"max_abs_err", "tolerance", "ok"}}."""
    golden_dir = Path(golden_dir)
    try:
        index = json.loads((golden_dir / GOLDEN_INDEX).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{golden_dir} holds no readable {GOLDEN_INDEX} ({e}); "
                        "write one with python -m runtime.golden") from None
    if index.get("golden_version", 0) > GOLDEN_VERSION:
        raise UserError(f"{golden_dir} was written by a newer fewstep (golden version {index['golden_version']})")
    engine_dir = Path(engine_dir or index["engine"]["dir"])
    pipe = Pipeline.load(engine_dir, backend, index["engine"]["precision"])
    tol, request = index["tolerance"], index["request"]

    def load(name: str) -> np.ndarray:
        return np.load(golden_dir / name)

    results = {}

    def compare(name: str, got, want, bound: float) -> None:
        got, want = np.asarray(got), np.asarray(want)
        err = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()) if got.shape == want.shape \
            else math.inf
        previous = results.get(name, {"max_abs_err": 0.0})["max_abs_err"]
        results[name] = {"max_abs_err": max(err, previous), "tolerance": bound}

    sha = file_sha256(engine_dir / pipe.manifest["files"][pipe.precision]["path"])
    results["engine_file"] = {"max_abs_err": 0.0 if sha == index["engine"]["sha256"] else math.inf, "tolerance": 0.0}
    labels = None if index["labels"] is None else load(index["labels"])
    got = record(pipe, labels, request["n"], request["nfe"], request["seed"])
    compare("noise", got["noise"], load(index["noise"]), tol["noise_max_abs"])
    if len(got["calls"]) != len(index["calls"]):
        results["calls"] = {"max_abs_err": math.inf, "tolerance": 0.0}
    for call, want in zip(got["calls"], index["calls"]):
        feed = {name: load(path) for name, path in want["feed"].items()}
        # one call on the golden feed and state
        compare("prediction", pipe.backend.run(feed), load(want["prediction"]), tol["prediction_max_abs"])
        x0 = x0_from_output(load(want["prediction"]), load(want["state"]), feed["sigma"],
                            index["engine"]["prediction_type"], pipe.manifest.get("parameterization", "vp"),
                            pipe.manifest.get("sigma_data", 0.5))
        compare("x0", x0, load(want["x0"]), tol["x0_max_abs"])
        # this runtime's own loop from the seed
        for name, value in call["feed"].items():
            compare("loop_feed", value, feed[name], tol["loop_max_abs"])
        compare("loop_state", call["state"], load(want["state"]), tol["loop_max_abs"])
        compare("loop_x0", call["x0"], load(want["x0"]), tol["loop_max_abs"])
    compare("final", got["final"], load(index["final"]), tol["loop_max_abs"])
    compare("images", got["images"], load(index["images"]), tol["images_max_abs"])
    for r in results.values():
        r["ok"] = r["max_abs_err"] <= r["tolerance"]
    return results


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m runtime.golden", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", type=Path, help="an engine folder (with --check: default, the one in golden.json)")
    p.add_argument("--out", type=Path, help="where to write the golden vectors")
    p.add_argument("--check", type=Path, metavar="DIR", help="reproduce the golden vectors in DIR instead")
    p.add_argument("--labels", default=None, help="'cycle' (default) or comma-separated class ids, repeated to --n")
    p.add_argument("--n", type=int, default=4, help="number of images (one batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nfe", type=int, help="network calls per image (default: the engine's default)")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--backend", default="onnxruntime-cpu", help="the backend that computes them (default: the CPU)")
    args = p.parse_args(argv)
    if args.check:
        results = check_golden(args.check, args.engine, args.backend)
        for name, r in results.items():
            print(f"{name:12s} max abs err {r['max_abs_err']:.3g} (tolerance {r['tolerance']:.3g})"
                  f"{'' if r['ok'] else '  FAILED'}")
        failed = [name for name, r in results.items() if not r["ok"]]
        if failed:
            raise UserError(f"the golden vectors in {args.check} do not reproduce: {', '.join(failed)}")
        print(f"the golden vectors in {args.check} reproduce")
        return
    if not args.engine or not args.out:
        raise UserError("give --engine and --out (or --check DIR)")
    if args.n < 1:
        raise UserError("--n must be at least 1")
    pipe = Pipeline.load(args.engine, args.backend, args.precision)
    labels = parse_labels(args.labels, args.n, pipe.num_classes)
    index = write_golden(args.engine, args.out, labels, args.n, args.seed, args.nfe, args.precision, args.backend)
    print(f"{len(index['calls'])} network calls, {index['request']['n']} images at NFE {index['request']['nfe']} "
          f"(seed {args.seed}) -> {args.out / GOLDEN_INDEX}; tolerance {json.dumps(index['tolerance'])}")


if __name__ == "__main__":
    main()
