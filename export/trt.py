"""Build TensorRT plans of a student bundle, with parity against PyTorch as part of the build:
`python -m export.trt --bundle DIR --nfe K --out ENGINE_DIR [--precision fp16] [--batch 1:1:16] [--timing-cache FILE]
[--version-compatible]`.

Two stages, each complete on its own (docs/design.md §5):

1. `export.onnx` writes the engine folder: `student_<precision>.onnx` and `fewstep_engine.json`, checked against
   PyTorch with ONNX Runtime and written atomically. Nothing below changes the graph.
2. TensorRT (its 10/11 Python API) builds one plan per precision from that ONNX file. The network is strongly typed,
   so the precision is the ONNX graph's own (the fp16 file, or the int8 file's Q/DQ nodes): no FP16/INT8 builder flag
   and no calibrator, which TensorRT 11 removed. One optimization profile spans the batch axis (`--batch MIN:OPT:MAX`);
   a persistent timing cache (`--timing-cache`) makes later builds skip the kernel timing they already did;
   `--version-compatible` embeds a lean runtime so later TensorRT versions can load the plan. Each plan is run with
   TensorRT on the same calls of the student's own loop that export.onnx checks and compared with the PyTorch graph at
   export.onnx's tolerances; the errors go into the manifest as `files["trt_<precision>"]`.

Plans are built under temporary names; they are renamed, and the manifest rewritten, only once every plan has passed.
A failure leaves the folder as stage 1 wrote it, with `manifest["tensorrt"] = {"built": false, "reason": ...}`.
Where `import tensorrt` fails (it cannot be installed on the development machine), stage 1 still runs, the manifest
records why no plan was built, and the command exits with status 2 and one line saying how to install TensorRT.
"""

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from fewstep.errors import UserError, cli_main

from .graph import GraphStudent, loop_inputs
from .manifest import ENGINE_MANIFEST
from .onnx import chosen_bundle, export_onnx
from .parity import within_tolerance

TRT_PRECISIONS = ("fp32", "fp16", "int8")  # the ONNX files a strongly typed TensorRT network takes as they are

DEFAULT_BATCH = "1:1:16"  # latency at batch 1, with room for small batches of requests
ONNX_CHECK_BATCH = 4  # export.onnx's parity batch: the plans are checked on the same calls where the profile allows
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default; 4-5 search longer for faster kernels
DEFAULT_WORKSPACE_GIB = 4.0
INSTALL_HINT = ('on a machine with an NVIDIA GPU and driver: pip install "fewstep[trt]" '
                "(or: pip install tensorrt --extra-index-url https://pypi.nvidia.com), then rerun this command")


def parse_batch_range(text: str) -> tuple[int, int, int]:
    """`MIN:OPT:MAX` (or one size N, meaning N:N:N) -> (min, opt, max), checked 1 <= MIN <= OPT <= MAX."""
    parts = text.strip().split(":")
    if len(parts) not in (1, 3) or not all(p.strip().isdigit() for p in parts):
        raise UserError(f"--batch {text!r}: expected MIN:OPT:MAX batch sizes (e.g. 1:4:16) or one size")
    sizes = [int(p) for p in parts] * (3 if len(parts) == 1 else 1)
    lo, opt, hi = sizes
    if lo < 1:
        raise UserError(f"--batch {text!r}: the smallest batch must be at least 1")
    if not lo <= opt <= hi:
        raise UserError(f"--batch {text!r}: needs MIN <= OPT <= MAX")
    return lo, opt, hi


def tensorrt_missing_reason() -> str | None:
    """None when a TensorRT with the 10/11 API imports; otherwise why not, in a few words."""
    try:
        import tensorrt as trt
    except ImportError as e:  # also covers NVIDIA's stub packages whose libraries were never fetched
        return f"TensorRT is not installed ({e})"
    if int(trt.__version__.split(".")[0]) < 10:
        return f"TensorRT {trt.__version__} is too old (this build uses the TensorRT 10/11 API)"
    return None


_LOGGER = None


def trt_logger():
    """One TensorRT logger for every builder and runtime: TensorRT wants it to outlive all the objects made with it."""
    global _LOGGER
    if _LOGGER is None:
        import tensorrt as trt

        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def write_atomic(path: Path, data) -> None:
    """Write bytes (or a buffer such as TensorRT's IHostMemory) under a temporary name, then rename over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def batch_profile(builder, network, batch: tuple[int, int, int]):
    """One optimization profile: every input whose axis 0 is dynamic gets batch min/opt/max, other axes as exported."""
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if shape and shape[0] == -1:
            if -1 in shape[1:]:
                raise UserError(f"input {tensor.name!r} has dynamic axes besides the batch ({shape}); "
                                "the engine folder's graph should only have a dynamic batch axis")
            profile.set_shape(tensor.name, *[(b, *shape[1:]) for b in batch])
    return profile


def build_engine(onnx_path: Path, plan_path: Path, batch: tuple[int, int, int], timing_cache: Path | None = None,
                 version_compatible: bool = False, optimization_level: int = DEFAULT_OPT_LEVEL,
                 workspace_gib: float = DEFAULT_WORKSPACE_GIB, exact_fp32: bool = False) -> dict:
    """Parse `onnx_path` into a strongly typed network and write the serialized plan to `plan_path`; the timing cache
    file, when given, is read first and written back (atomically) after the build. Returns what the build used."""
    import tensorrt as trt

    logger = trt_logger()
    builder = trt.Builder(logger)
    # Strongly typed: every tensor has the type the ONNX graph gives it, so the fp16 file runs in fp16 and the int8
    # file's Q/DQ pairs in int8 with no builder precision flags. TensorRT 11 always works so and ignores the flag;
    # 10.x needs it.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if version_compatible:
        # A version-compatible plan cannot call TensorRT's plugin library; the GroupNorms of the UNet arrive as
        # ONNX InstanceNormalization, which must then be built from native layers.
        parser.set_flag(trt.OnnxParserFlag.NATIVE_INSTANCENORM)
    if not parser.parse_from_file(str(onnx_path)):
        errors = " | ".join(" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors))
        raise UserError(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: {errors or 'no detail given'}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.builder_optimization_level = optimization_level
    if exact_fp32:
        # TF32 (on by default) rounds fp32 conv/matmul inputs to 10-bit mantissas: ~1e-3 relative error, ten times
        # the fp32 tolerance. The fp32 plan is the exact reference; speed comes from the fp16 and int8 files.
        config.clear_flag(trt.BuilderFlag.TF32)
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    config.add_optimization_profile(batch_profile(builder, network, batch))

    blob = timing_cache.read_bytes() if timing_cache is not None and timing_cache.exists() else b""
    cache = config.create_timing_cache(blob)
    # ignore_mismatch=False: timings measured on another GPU or TensorRT version would pick wrong kernels.
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        if timing_cache is None:
            raise UserError(f"TensorRT {trt.__version__} could not create a timing cache (its log above says why)")
        raise UserError(f"--timing-cache {timing_cache}: TensorRT {trt.__version__} cannot use this file (made by "
                        "another TensorRT version or GPU?); delete it or choose another file")

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT {trt.__version__} could not build a plan from {onnx_path.name} at batch "
                        f"{':'.join(map(str, batch))} (its log above says why)")
    seconds = time.perf_counter() - t0
    write_atomic(plan_path, plan)
    if timing_cache is not None:
        write_atomic(timing_cache, config.get_timing_cache().serialize())
    return {"build_seconds": round(seconds, 1), "timing_cache": str(timing_cache) if timing_cache else None,
            "timing_cache_bytes_loaded": len(blob)}


def run_plan(plan_path: Path, feeds: list[dict], host_code_allowed: bool = False) -> list[np.ndarray]:
    """Run a plan on each feed (numpy, named as the graph's inputs); returns the "prediction" of each, in numpy.
    Buffers are torch CUDA tensors; the plan runs on its own stream."""
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt_logger())
    # A version-compatible plan carries its lean runtime as host code; we built this one ourselves, so we trust it.
    runtime.engine_host_code_allowed = host_code_allowed
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise UserError(f"TensorRT {trt.__version__} cannot load {plan_path.name} (its log above says why)")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if n not in inputs]

    def dtype(name):
        return np.dtype(trt.nptype(engine.get_tensor_dtype(name)))

    # Not the default stream: enqueueing on it makes TensorRT add synchronisations of its own.
    stream = torch.cuda.Stream()
    results = []
    for feed in feeds:
        buffers = {}
        with torch.cuda.stream(stream):
            for name in inputs:
                host = np.ascontiguousarray(feed[name], dtype=dtype(name))
                buffers[name] = torch.from_numpy(host).cuda()
                if not context.set_input_shape(name, host.shape):
                    raise UserError(f"{plan_path.name}: input {name!r} of shape {host.shape} is outside the plan's "
                                    "batch profile")
            for name in outputs:  # output shapes are known once every input shape is set
                shape = tuple(context.get_tensor_shape(name))
                torch_dtype = torch.from_numpy(np.empty(0, dtype(name))).dtype
                buffers[name] = torch.empty(shape, dtype=torch_dtype, device="cuda")
            for name, tensor in buffers.items():
                context.set_tensor_address(name, tensor.data_ptr())
            if not context.execute_async_v3(stream.cuda_stream):
                raise UserError(f"TensorRT could not run {plan_path.name} (its log above says why)")
        stream.synchronize()
        results.append(buffers["prediction"].cpu().numpy().astype(np.float32))
    return results


def plan_parity(plan_path: Path, model: GraphStudent, feeds: list[dict], host_code_allowed: bool = False) -> dict:
    """The plan against PyTorch over every call of the student's loop: the same numbers as export.onnx.parity (max
    abs, max rel with a 1e-3 floor, RMS relative to the output's RMS, largest |output|), so `within_tolerance` judges
    both alike."""
    import torch

    got = run_plan(plan_path, feeds, host_code_allowed)
    max_abs, max_rel, rel_rms, scale = 0.0, 0.0, 0.0, 0.0
    for out, feed in zip(got, feeds):
        with torch.no_grad():
            want = model(*(torch.from_numpy(feed[n]) for n in model.input_names)).numpy()
        err = np.abs(out - want)
        max_abs = max(max_abs, float(err.max()))
        max_rel = max(max_rel, float((err / np.maximum(np.abs(want), 1e-3)).max()))
        rel_rms = max(rel_rms, float(np.sqrt((err**2).mean() / max((want**2).mean(), 1e-12))))
        scale = max(scale, float(np.abs(want).max()))
    return {"max_abs_err": max_abs, "max_rel_err": max_rel, "rel_rms_err": rel_rms, "ref_max_abs": scale,
            "calls_checked": len(feeds)}


def read_manifest(engine_dir: Path) -> dict:
    return json.loads((engine_dir / ENGINE_MANIFEST).read_text())


def write_manifest(engine_dir: Path, manifest: dict) -> None:
    write_atomic(engine_dir / ENGINE_MANIFEST, json.dumps(manifest, indent=2).encode())


def record_not_built(engine_dir: Path, reason: str) -> None:
    manifest = read_manifest(engine_dir)
    manifest["tensorrt"] = {"built": False, "reason": reason}
    write_manifest(engine_dir, manifest)


def export_trt(bundle_dir: str | Path, out_dir: str | Path, nfe: int | None = None,
               precisions: tuple[str, ...] = ("fp32",), batch: tuple[int, int, int] = (1, 1, 16),
               timing_cache: Path | None = None, version_compatible: bool = False,
               optimization_level: int = DEFAULT_OPT_LEVEL, workspace_gib: float = DEFAULT_WORKSPACE_GIB) -> Path:
    """Write out_dir/{student_<p>.onnx, student_<p>.plan, fewstep_engine.json}; returns out_dir. UserError when
    TensorRT or a GPU is missing (the ONNX files and manifest are written all the same) or a plan fails parity."""
    from distill.bundle import load_bundle

    out_dir = Path(out_dir)
    precisions = tuple(dict.fromkeys(precisions))  # "fp16,fp16" builds one plan
    other = [p for p in precisions if p not in TRT_PRECISIONS]
    if other:  # int8-cpu and bf16 are CPU files (ONNX Runtime's U8S8 layout, OpenVINO's bf16 mode)
        raise UserError(f"TensorRT plans are built from the {', '.join(TRT_PRECISIONS)} files, not {', '.join(other)} "
                        "(CPU variants: make them with python -m export.onnx)")
    export_onnx(bundle_dir, out_dir, nfe, precisions)
    missing = tensorrt_missing_reason()
    if missing is not None:
        record_not_built(out_dir, missing)
        raise UserError(f"{missing}; wrote the ONNX files and manifest to {out_dir} but no TensorRT plan. To build "
                        f"the plans, {INSTALL_HINT}")
    import tensorrt as trt
    import torch

    if not torch.cuda.is_available():
        reason = "TensorRT is installed but PyTorch sees no CUDA GPU"
        record_not_built(out_dir, reason)
        raise UserError(f"{reason}; wrote the ONNX files and manifest to {out_dir} but no TensorRT plan. Run this "
                        "command on a machine with an NVIDIA GPU and a CUDA build of PyTorch")

    manifest = read_manifest(out_dir)
    bundle = load_bundle(bundle_dir)
    model = GraphStudent(bundle).eval()
    check_batch = min(max(ONNX_CHECK_BATCH, batch[0]), batch[2])
    feeds = loop_inputs(bundle, manifest["schedule"]["nfe"], check_batch)
    built, temporaries = {}, []
    try:
        for precision in precisions:
            onnx_name = manifest["files"][precision]["path"]
            tmp = out_dir / f"student_{precision}.plan.tmp"
            temporaries.append(tmp)
            info = build_engine(out_dir / onnx_name, tmp, batch, timing_cache, version_compatible,
                                optimization_level, workspace_gib, exact_fp32=precision == "fp32")
            errors = plan_parity(tmp, model, feeds, host_code_allowed=version_compatible)
            ok, checked = within_tolerance(precision, errors)
            if not ok:
                raise UserError(f"{precision} TensorRT plan differs from PyTorch: {checked}; no plan was written "
                                f"(the ONNX files and manifest in {out_dir} are complete)")
            built[precision] = {"path": f"student_{precision}.plan", "precision": precision, "onnx": onnx_name,
                                "tensorrt_version": trt.__version__, "device": torch.cuda.get_device_name(),
                                "batch_profile": list(batch), "version_compatible": version_compatible,
                                "builder_optimization_level": optimization_level, "tf32": precision != "fp32",
                                **errors, "parity": checked, "check_batch": check_batch, **info}
    except BaseException as e:  # every plan passes and is renamed below, or none is kept
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)
        if isinstance(e, UserError):
            record_not_built(out_dir, str(e))
        raise
    for precision, entry in built.items():
        os.replace(out_dir / f"student_{precision}.plan.tmp", out_dir / entry["path"])
        manifest["files"][f"trt_{precision}"] = entry
    manifest["tensorrt"] = {"built": True, "version": trt.__version__, "plans": [f"trt_{p}" for p in built]}
    write_manifest(out_dir, manifest)  # last: the manifest names only files that exist
    return out_dir


def check_timing_cache_path(path: Path | None) -> None:
    if path is None:
        return
    if path.is_dir():
        raise UserError(f"--timing-cache {path} is a folder; give a file name (it is created on the first build)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--timing-cache {path}: cannot create its folder ({e.strerror})") from None


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m export.trt", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="a student bundle folder (…/student; default: the quickstart "
                                               "student runs/quickstart/student, else the embedded digits student)")
    p.add_argument("--out", type=Path, help="engine folder (default: BUNDLE/../engine; runs/embedded/engine for the "
                                            "embedded student)")
    p.add_argument("--nfe", type=int, help="the schedule the engine serves (default: the most the student serves)")
    p.add_argument("--precision", default="fp32",
                   help=f"comma-separated, from {', '.join(TRT_PRECISIONS)}: which ONNX file each plan is built from")
    p.add_argument("--batch", default=DEFAULT_BATCH,
                   help=f"MIN:OPT:MAX batch sizes of the plan, or one size (default {DEFAULT_BATCH})")
    p.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file, read before and updated after each "
                                                     "build (same GPU and TensorRT version only)")
    p.add_argument("--version-compatible", action="store_true",
                   help="plans that later TensorRT versions can load (embeds a lean runtime; may run slower)")
    p.add_argument("--opt-level", type=int, default=DEFAULT_OPT_LEVEL, choices=range(6),
                   help=f"TensorRT builder optimization level 0-5 (default {DEFAULT_OPT_LEVEL})")
    p.add_argument("--workspace-gib", type=float, default=DEFAULT_WORKSPACE_GIB,
                   help=f"GPU scratch memory TensorRT may use (default {DEFAULT_WORKSPACE_GIB})")
    args = p.parse_args(argv)
    batch = parse_batch_range(args.batch)  # before any export work: a typo here should cost nothing
    check_timing_cache_path(args.timing_cache)
    bundle, out = chosen_bundle(args.bundle, args.out)
    precisions = tuple(s.strip() for s in args.precision.split(",") if s.strip())
    out = export_trt(bundle, out, args.nfe, precisions, batch, args.timing_cache, args.version_compatible,
                     args.opt_level, args.workspace_gib)
    manifest = read_manifest(out)
    for f in manifest["files"].values():
        where = f"TensorRT {f['tensorrt_version']}" if "tensorrt_version" in f else "ONNX Runtime"
        print(f"{out / f['path']}: max abs err {f['max_abs_err']:.2e}, max rel err {f['max_rel_err']:.2e} vs PyTorch "
              f"over {f['calls_checked']} calls ({where}); checked: {f['parity']}")
    print(f"engine manifest: {out / ENGINE_MANIFEST} (NFE {manifest['schedule']['nfe']}, batch {args.batch})")


if __name__ == "__main__":
    main()
