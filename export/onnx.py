"""Export a student bundle's network to ONNX, with parity against PyTorch as part of the export:
`python -m export.onnx --bundle DIR --out ENGINE_DIR [--nfe K]`.

What goes into the graph (DESIGN.md §1, §5): the student backbone with its input scaling, in float32:
(x, sigma, timestep[, class_labels][, nfe]) -> the UNet's raw prediction at x_vp = x / sqrt(1 + sigma^2), x in VE
form (x = x0 + sigma * eps). What the runtime computes: x0 from that prediction (runtime/convention.py, closed
forms, float64: at sigma ~150 x0 = x - sigma * eps would multiply any graph error by sigma) and the sampling
loop, from the engine manifest's schedule (sigmas, matching timesteps, AFS, re-noising rule).

Every file written is run with ONNX Runtime (CPU here) on the inputs the student's own loop feeds it, and
export fails when the error against PyTorch exceeds the stated tolerance; the errors go in the manifest.
The engine folder is written to a temporary folder and renamed at the end, so a failed export leaves nothing
that looks complete. Precisions: fp32; fp16 (weights and compute, fp32 I/O, the timestep embedding and
normalisations kept in fp32); int8 (explicit Q/DQ, symmetric, per-channel weights, calibrated on the student's own
loop inputs). This version exports pixel-space students; TensorRT builds on these files.
"""

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distill.bundle import load_bundle
from distill.errors import UserError, cli_main

ENGINE_MANIFEST = "fewstep_engine.json"
ENGINE_FORMAT_VERSION = 1
# max |ONNX - PyTorch| on the graph's output (the UNet's prediction, unit scale); export fails above it
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
# int8 is judged by the FD gate (quality_gate); its parity bound is on the RMS error relative to the output's RMS
# and only catches a broken graph (quantizing the timestep embedding gave errors larger than the output itself)
INT8_MAX_REL_RMS = 0.3
PRECISIONS = ("fp32", "fp16", "int8")
# Kept in fp32 in the fp16 graph: the timestep embedding (t up to ~1000 times a frequency, then sin/cos: fp16's
# 11-bit mantissa would put the phase off by up to half a radian) and the normalisations' reductions.
FP16_KEEP_OPS = ["Sin", "Cos", "Exp", "Pow", "Sqrt", "ReduceMean", "InstanceNormalization", "GroupNormalization"]
FP16_KEEP_NODES = ("time_proj", "time_embedding", "class_embedding", "embedding")
CALIBRATION_BATCHES = 8  # int8: calibration batches of the student's own loop inputs (all classes cycling)
OPSET = 17


class GraphStudent(nn.Module):
    """The exported computation: the UNet's raw prediction at x / sqrt(1 + sigma^2), in float32 ops."""

    def __init__(self, bundle):
        super().__init__()
        self.net = bundle.denoiser.net
        self.prediction_type = bundle.denoiser.prediction_type
        self.input_names = ["x", "sigma", "timestep"]
        if bundle.num_classes is not None:
            self.input_names.append("class_labels")
        if "nfe_condition" in bundle.manifest:
            self.input_names.append("nfe")

    def forward(self, x, sigma, timestep, *extra):
        cond = dict(zip(self.input_names[3:], extra))
        s = sigma.reshape(-1, 1, 1, 1)
        return self.net(x / torch.sqrt(1 + s * s), timestep, **cond)


def loop_inputs(bundle, nfe: int, batch: int, seed: int = 0) -> list[dict]:
    """The inputs the student's own loop feeds its network at each call (numpy, named as the graph's)."""
    from distill.bundle import sample_dmd2, sample_sfd

    entry = bundle.manifest["nfe"][str(nfe)]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((batch, *bundle.x_shape), generator=g)
    cond = bundle.cond(torch.arange(batch) % bundle.num_classes if bundle.num_classes else None)
    if "nfe_condition" in bundle.manifest:
        cond = cond | {"nfe": torch.full((batch,), nfe, dtype=torch.long)}
    calls = []

    def recorder(x, sigma, c):
        calls.append((x.clone(), sigma.clone()))
        return bundle.denoiser(x, sigma, c)

    sigmas = bundle.sigmas(nfe)
    with torch.no_grad():
        if bundle.manifest["renoise"] == "none":
            sample_sfd(recorder, noise * sigmas[0].item(), sigmas, cond, afs=entry.get("afs", False))
        else:
            fresh = torch.randn((nfe, batch, *bundle.x_shape), generator=g)
            sample_dmd2(recorder, noise * sigmas[0].item(), sigmas, cond, fresh)
    schedule = bundle.denoiser.schedule
    feeds = []
    for x, sigma in calls:
        feed = {"x": x.numpy().astype(np.float32), "sigma": sigma.float().numpy(),
                "timestep": schedule.sigma_to_t(sigma.double()).float().numpy()}
        if "class_labels" in cond:
            feed["class_labels"] = cond["class_labels"].numpy().astype(np.int64)
        if "nfe" in cond:
            feed["nfe"] = cond["nfe"].numpy().astype(np.int64)
        feeds.append(feed)
    return feeds


def export_fp32(model: GraphStudent, feed: dict, path: Path) -> None:
    import warnings

    args = tuple(torch.from_numpy(feed[name]) for name in model.input_names)
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # diffusers' shape asserts, all static here
    dynamic = {name: {0: "batch"} for name in [*model.input_names, "prediction"]}
    # The TorchScript exporter: diffusers UNets trace cleanly through it, and it needs no onnxscript.
    torch.onnx.export(model, args, str(path), input_names=model.input_names, output_names=["prediction"],
                      dynamic_axes=dynamic, opset_version=OPSET, dynamo=False, do_constant_folding=True)
    import onnx

    onnx.checker.check_model(str(path))


def to_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and compute, fp32 inputs/outputs, with FP16_KEEP_* left in fp32 (ONNX Runtime's converter)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    keep = [n.name for n in model.graph.node if any(k in n.name for k in FP16_KEEP_NODES)]
    fp16 = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP16_KEEP_OPS, node_block_list=keep)
    sort_nodes(fp16.graph)  # the converter appends its input casts at the end; the checker wants graph order
    onnx.save(fp16, str(dst))
    onnx.checker.check_model(str(dst))


def sort_nodes(graph) -> None:
    """Topologically sort a graph's nodes in place (stable: nodes keep their order where they can)."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise ValueError("the graph has a cycle or an undefined input")
        for n in ready:
            known.update(n.output)
        ordered += ready
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(ordered)


def to_int8(src: Path, dst: Path, calibration: list[dict]) -> None:
    """Explicit Q/DQ int8 from post-training calibration on the student's own loop inputs, in the form TensorRT
    accepts: symmetric (zero point 0) int8 activations and per-channel symmetric int8 weights."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calibration)

        def get_next(self):
            return next(self.items, None)

    prepared = dst.with_suffix(".prep.onnx")
    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
    import onnx

    # Only the heavy ops get Q/DQ (what TensorRT runs in int8); the timestep / class / NFE embeddings stay float:
    # their inputs span 0..1000, which one symmetric int8 scale cannot hold.
    graph = onnx.load(str(prepared)).graph
    exclude = [n.name for n in graph.node if any(k in n.name for k in FP16_KEEP_NODES)]
    quantize_static(str(prepared), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"], nodes_to_exclude=exclude,
                    # biases stay float: TensorRT fuses them itself and does not take int32-quantized biases
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})
    prepared.unlink()


def calibration_inputs(bundle, nfes: list[int], batch: int = 16) -> list[dict]:
    """Every call the student's loop makes, for CALIBRATION_BATCHES seeds per served NFE (classes cycling)."""
    return [feed for nfe in nfes for seed in range(CALIBRATION_BATCHES) for feed in loop_inputs(bundle, nfe, batch,
                                                                                                 seed=100 + seed)]


def parity(path: Path, model: GraphStudent, feeds: list[dict]) -> dict:
    """Max abs / rel error of ONNX Runtime (CPU) against PyTorch over every call of the student's loop (on the
    graph's output, the UNet's prediction)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    max_abs, max_rel, rel_rms = 0.0, 0.0, 0.0
    for feed in feeds:
        got = session.run(["prediction"], feed)[0]
        with torch.no_grad():
            want = model(*(torch.from_numpy(feed[n]) for n in model.input_names)).numpy()
        err = np.abs(got - want)
        max_abs = max(max_abs, float(err.max()))
        max_rel = max(max_rel, float((err / np.maximum(np.abs(want), 1e-3)).max()))
        rel_rms = max(rel_rms, float(np.sqrt((err**2).mean() / max((want**2).mean(), 1e-12))))
    return {"max_abs_err": max_abs, "max_rel_err": max_rel, "rel_rms_err": rel_rms, "calls_checked": len(feeds)}


def within_tolerance(precision: str, errors: dict) -> tuple[bool, str]:
    """(ok, what was checked) for a file's parity errors."""
    if precision == "int8":
        return errors["rel_rms_err"] <= INT8_MAX_REL_RMS, f"relative RMS error {errors['rel_rms_err']:.2e} " \
                                                          f"(tolerance {INT8_MAX_REL_RMS})"
    return errors["max_abs_err"] <= TOLERANCE[precision], f"max abs error {errors['max_abs_err']:.2e} " \
                                                          f"(tolerance {TOLERANCE[precision]:.0e})"


def engine_manifest(bundle, nfe: int, model: GraphStudent, files: dict) -> dict:
    m = bundle.manifest
    inputs = [{"name": "x", "dtype": "float32", "shape": ["batch", *bundle.x_shape]},
              {"name": "sigma", "dtype": "float32", "shape": ["batch"]},
              {"name": "timestep", "dtype": "float32", "shape": ["batch"]}]
    if "class_labels" in model.input_names:
        inputs.append({"name": "class_labels", "dtype": "int64", "shape": ["batch"],
                       "range": [0, bundle.num_classes - 1]})
    if "nfe" in model.input_names:
        inputs.append({"name": "nfe", "dtype": "int64", "shape": ["batch"], "value": nfe})
    def schedule(k: int) -> dict:
        sig = bundle.sigmas(k)
        return {"nfe": k, "sigmas": [float(s) for s in sig],
                "timesteps": [float(t) for t in bundle.denoiser.schedule.sigma_to_t(sig)],
                "afs": bool(m["nfe"][str(k)].get("afs", False)), "renoise": m["renoise"],
                "first_input": "noise * sigmas[0]"}

    return {"format_version": ENGINE_FORMAT_VERSION, "method": m["method"], "family": m["family"],
            "graph": "prediction = UNet(x / sqrt(1 + sigma^2), timestep, ...): x in VE form (x = x0 + sigma * eps); "
                     "feed timestep = the schedule's timestep for each sigma; x0 from prediction_type "
                     "(runtime/convention.py)",
            "prediction_type": m["prediction_type"],
            "inputs": inputs,
            "outputs": [{"name": "prediction", "dtype": "float32", "shape": ["batch", *bundle.x_shape]}],
            # `schedule`: the NFE export checked (parity, quality gate) and the runtime's default; `schedules`: every
            # NFE the network serves (an SFD-v network takes the step count as an input)
            "schedule": schedule(nfe), "schedules": {str(k): schedule(k) for k in bundle.nfes},
            "conditioning": m["conditioning"], "image": m["image"], "files": files,
            "student": {"bundle": str(Path(bundle.source).resolve()), "metrics": m.get("metrics", {}),
                        "teacher": m.get("teacher")}}


def is_digits_student(bundle) -> bool:
    image, cond = bundle.manifest["image"], bundle.manifest["conditioning"]
    return (image["channels"], image["height"], image["width"]) == (1, 16, 16) and cond.get("num_classes") == 10


def quality_gate(bundle, engine_dir: Path, nfe: int, precisions: list[str], n: int = 1000) -> dict:
    """Digits students: FD / class accuracy of the loop run through each exported file (runtime.engine) against
    the PyTorch student on the same noise; {} for other students (no metric for them here)."""
    if not is_digits_student(bundle):
        return {}
    from distill.data import to_uint8
    from distill.metrics import digits_metric
    from distill.sample import noise_for
    from runtime.engine import EngineSampler

    metric = digits_metric()
    labels = torch.arange(n) % 10
    draws = noise_for(1, 0, n, (nfe, *bundle.x_shape))  # (N, nfe, C, H, W): start noise, then re-noising draws
    noise, fresh = draws[:, 0], draws[:, 1:].transpose(0, 1)
    with torch.no_grad():
        ref = metric(to_uint8(bundle.generate(noise, bundle.cond(labels), nfe, fresh_noise=fresh)).numpy(),
                     labels.numpy())
    out = {}
    for precision in precisions:
        images = EngineSampler(engine_dir, precision).sample(noise.numpy(), labels.numpy(), fresh.numpy())
        got = metric(to_uint8(torch.from_numpy(images).float()).numpy(), labels.numpy())
        out[precision] = {"n": n, "fd": got["fd"], "accuracy": got["accuracy"], "fd_pytorch_fp32": ref["fd"],
                          "fd_change": got["fd"] / ref["fd"] - 1}
    return out


def export_onnx(bundle_dir: str | Path, out_dir: str | Path, nfe: int | None = None,
                precisions: tuple[str, ...] = ("fp32",), check_batch: int = 4, quality_samples: bool = True) -> Path:
    """Write out_dir/{student_fp32.onnx, fewstep_engine.json}; returns out_dir. Fails (UserError) on parity."""
    out_dir = Path(out_dir)
    bundle = load_bundle(bundle_dir)
    if bundle.manifest["family"] != "pixel":
        raise UserError(f"{bundle_dir} is a {bundle.manifest['family']} student; this export handles pixel-space "
                        "students so far (latent ones need the text encoders and VAE exported too)")
    nfe = bundle.nfes[-1] if nfe is None else nfe
    if str(nfe) not in bundle.manifest["nfe"]:
        raise UserError(f"--nfe {nfe}: this {bundle.manifest['method']} student serves NFE "
                        f"{', '.join(map(str, bundle.nfes))}")
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise UserError(f"precision {unknown[0]!r} is not exported yet; available: {', '.join(PRECISIONS)}")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"cannot write the engine folder next to {out_dir} ({e.strerror}); "
                        "choose another --out") from None
    model = GraphStudent(bundle).eval()
    feeds = loop_inputs(bundle, nfe, check_batch)
    files = {}
    fp32 = tmp / "student_fp32.onnx"
    for precision in ("fp32", *[p for p in precisions if p != "fp32"]):
        path = tmp / f"student_{precision}.onnx"
        t0 = time.perf_counter()
        if precision == "fp32":
            export_fp32(model, feeds[0], path)
        elif precision == "fp16":
            to_fp16(fp32, path)
        else:
            to_int8(fp32, path, calibration_inputs(bundle, [nfe]))
        errors = parity(path, model, feeds)
        ok, checked = within_tolerance(precision, errors)
        files[precision] = {"path": path.name, "precision": precision, **errors, "parity": checked,
                            "export_seconds": round(time.perf_counter() - t0, 1)}
        if not ok:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"{precision} ONNX differs from PyTorch: {checked}; nothing was written")
    (tmp / ENGINE_MANIFEST).write_text(json.dumps(engine_manifest(bundle, nfe, model, files), indent=2))
    gate = quality_gate(bundle, tmp, nfe, list(files)) if quality_samples else {}
    for precision, result in gate.items():
        files[precision]["quality"] = result
    if "fp32" not in precisions:  # it was the source of the others
        fp32.unlink()
        del files["fp32"]
    (tmp / ENGINE_MANIFEST).write_text(json.dumps(engine_manifest(bundle, nfe, model, files), indent=2))
    if out_dir.exists():  # replace a previous engine folder only once the new one is complete
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)
    return out_dir


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="a student bundle folder (…/student)")
    p.add_argument("--out", type=Path, help="engine folder (default: BUNDLE/../engine)")
    p.add_argument("--nfe", type=int, help="the schedule the engine serves (default: the most the student serves)")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32, fp16, int8 (fp32 is always built first)")
    args = p.parse_args(argv)
    out = args.out or args.bundle.parent / "engine"
    precisions = tuple(s.strip() for s in args.precision.split(",") if s.strip())
    out = export_onnx(args.bundle, out, args.nfe, precisions)
    manifest = json.loads((out / ENGINE_MANIFEST).read_text())
    for f in manifest["files"].values():
        print(f"{out / f['path']}: max abs err {f['max_abs_err']:.2e}, max rel err {f['max_rel_err']:.2e} vs PyTorch "
              f"over {f['calls_checked']} calls; checked: {f['parity']}")
        if "quality" in f:
            q = f["quality"]
            print(f"  sampled through it ({q['n']} digits): FD {q['fd']:.4f} vs PyTorch fp32 "
                  f"{q['fd_pytorch_fp32']:.4f} "
                  f"({100 * q['fd_change']:+.1f}%), class accuracy {100 * q['accuracy']:.1f}%")
    print(f"engine manifest: {out / ENGINE_MANIFEST} (NFE {manifest['schedule']['nfe']})")


if __name__ == "__main__":
    main()
