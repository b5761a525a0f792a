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
that looks complete. This version exports fp32 pixel-space students; fp16, int8 and TensorRT build on it.
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
TOLERANCE = {"fp32": 1e-4}  # max |ONNX - PyTorch| on the graph's output (the UNet's prediction)
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


def parity(path: Path, model: GraphStudent, feeds: list[dict]) -> dict:
    """Max abs / rel error of ONNX Runtime (CPU) against PyTorch over every call of the student's loop (on the
    graph's output, the UNet's prediction)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    max_abs, max_rel = 0.0, 0.0
    for feed in feeds:
        got = session.run(["prediction"], feed)[0]
        with torch.no_grad():
            want = model(*(torch.from_numpy(feed[n]) for n in model.input_names)).numpy()
        err = np.abs(got - want)
        max_abs = max(max_abs, float(err.max()))
        max_rel = max(max_rel, float((err / np.maximum(np.abs(want), 1e-3)).max()))
    return {"max_abs_err": max_abs, "max_rel_err": max_rel, "calls_checked": len(feeds)}


def engine_manifest(bundle, nfe: int, model: GraphStudent, files: dict) -> dict:
    m = bundle.manifest
    entry = m["nfe"][str(nfe)]
    sigmas = bundle.sigmas(nfe)
    inputs = [{"name": "x", "dtype": "float32", "shape": ["batch", *bundle.x_shape]},
              {"name": "sigma", "dtype": "float32", "shape": ["batch"]},
              {"name": "timestep", "dtype": "float32", "shape": ["batch"]}]
    if "class_labels" in model.input_names:
        inputs.append({"name": "class_labels", "dtype": "int64", "shape": ["batch"],
                       "range": [0, bundle.num_classes - 1]})
    if "nfe" in model.input_names:
        inputs.append({"name": "nfe", "dtype": "int64", "shape": ["batch"], "value": nfe})
    return {"format_version": ENGINE_FORMAT_VERSION, "method": m["method"], "family": m["family"],
            "graph": "prediction = UNet(x / sqrt(1 + sigma^2), timestep, ...): x in VE form (x = x0 + sigma * eps); "
                     "feed timestep = the schedule's timestep for each sigma; x0 from prediction_type "
                     "(runtime/convention.py)",
            "prediction_type": m["prediction_type"],
            "inputs": inputs,
            "outputs": [{"name": "prediction", "dtype": "float32", "shape": ["batch", *bundle.x_shape]}],
            "schedule": {"nfe": nfe, "sigmas": [float(s) for s in sigmas],
                         "timesteps": [float(t) for t in bundle.denoiser.schedule.sigma_to_t(sigmas)],
                         "afs": bool(entry.get("afs", False)), "renoise": m["renoise"],
                         "first_input": "noise * sigmas[0]"},
            "conditioning": m["conditioning"], "image": m["image"], "files": files,
            "student": {"metrics": m.get("metrics", {}), "teacher": m.get("teacher")}}


def export_onnx(bundle_dir: str | Path, out_dir: str | Path, nfe: int | None = None,
                precisions: tuple[str, ...] = ("fp32",), check_batch: int = 4) -> Path:
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
    unknown = [p for p in precisions if p not in TOLERANCE]
    if unknown:
        raise UserError(f"precision {unknown[0]!r} is not exported yet; available: {', '.join(TOLERANCE)}")
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
    for precision in precisions:
        path = tmp / f"student_{precision}.onnx"
        t0 = time.perf_counter()
        export_fp32(model, feeds[0], path)
        errors = parity(path, model, feeds)
        files[precision] = {"path": path.name, "precision": precision, **errors,
                            "tolerance_abs": TOLERANCE[precision], "export_seconds": round(time.perf_counter() - t0, 1)}
        if errors["max_abs_err"] > TOLERANCE[precision]:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"{precision} ONNX differs from PyTorch by {errors['max_abs_err']:.2e} "
                            f"(tolerance {TOLERANCE[precision]:.0e}); nothing was written")
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
    p.add_argument("--precision", default="fp32", help="comma-separated; this version exports fp32")
    args = p.parse_args(argv)
    out = args.out or args.bundle.parent / "engine"
    precisions = tuple(s.strip() for s in args.precision.split(",") if s.strip())
    out = export_onnx(args.bundle, out, args.nfe, precisions)
    manifest = json.loads((out / ENGINE_MANIFEST).read_text())
    for f in manifest["files"].values():
        print(f"{out / f['path']}: max abs err {f['max_abs_err']:.2e}, max rel err {f['max_rel_err']:.2e} vs PyTorch "
              f"over {f['calls_checked']} calls (tolerance {f['tolerance_abs']:.0e})")
    print(f"engine manifest: {out / ENGINE_MANIFEST} (NFE {manifest['schedule']['nfe']})")


if __name__ == "__main__":
    main()
