"""Parity as part of the export: every file run on the calls of the student's own loop and compared with PyTorch;
the errors go in the manifest, and a file past its tolerance fails the export."""

from pathlib import Path

import numpy as np

from fewstep.errors import UserError

# max |ONNX - PyTorch| on the graph's output (the UNet's prediction, unit scale); export fails above it
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
# int8 is judged by the FD gate (quality_gate); its parity bound is on the RMS error relative to the output's RMS
# and only catches a broken graph (quantizing the timestep embedding gave errors larger than the output itself)
INT8_MAX_REL_RMS = 0.3
# int8-cpu: int8 laid out for ONNX Runtime's CPU provider (to_int8_cpu); bf16: the fp32 file run by OpenVINO in bf16
# (ONNX Runtime's CPU provider has no bf16 convolutions). Both are judged like int8: parity on the relative RMS
# error, quality by the FD gate.
PRECISIONS = ("fp32", "fp16", "int8", "int8-cpu", "bf16")
REL_RMS_PRECISIONS = ("int8", "int8-cpu", "bf16")


def error_stats(pairs, calls: int) -> dict:
    """Errors of (got, want) array pairs: max abs, max rel (1e-3 floor on |want|), RMS relative to want's RMS (the
    worst pair), and `ref_max_abs`, the largest |want| (what a scaled tolerance is relative to)."""
    max_abs, max_rel, rel_rms, scale = 0.0, 0.0, 0.0, 0.0
    for got, want in pairs:
        err = np.abs(got - want)
        max_abs = max(max_abs, float(err.max()))
        max_rel = max(max_rel, float((err / np.maximum(np.abs(want), 1e-3)).max()))
        rel_rms = max(rel_rms, float(np.sqrt((err**2).mean() / max((want**2).mean(), 1e-12))))
        scale = max(scale, float(np.abs(want).max()))
    return {"max_abs_err": max_abs, "max_rel_err": max_rel, "rel_rms_err": rel_rms, "ref_max_abs": scale,
            "calls_checked": calls}


def onnxruntime_runner(path: Path):
    """feed -> every output of the file, run by ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, feed)


def openvino_runner(path: Path, inference_precision: str = "f32"):
    """feed -> [the file's first output], run by OpenVINO's CPU plugin with this inference precision hint (always
    explicit: OpenVINO's own default on bf16-capable CPUs is bf16). The graph is compiled once per batch size (a
    dynamic batch ran two to three times slower)."""
    try:
        import openvino as ov
    except ImportError:
        raise UserError("OpenVINO is needed for this check: pip install openvino (or the [cpu] extra)") from None
    core = ov.Core()
    if inference_precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise UserError("this CPU has no bf16 instructions (avx512_bf16 or AMX); leave bf16 out of --precision")
    model = core.read_model(str(path))
    shapes = {p.get_any_name(): p.get_partial_shape() for p in model.inputs}
    compiled = {}

    def run(feed):
        batch = len(feed["x"])
        if batch not in compiled:
            sized = model.clone()
            sized.reshape({name: [batch, *(d.get_length() for d in shape[1:])] for name, shape in shapes.items()})
            compiled[batch] = core.compile_model(sized, "CPU", {"INFERENCE_PRECISION_HINT": inference_precision})
        out = compiled[batch]({k: np.ascontiguousarray(v) for k, v in feed.items()})
        return [np.array(out[0], dtype=np.float32)]

    return run


def parity(path: Path, feeds: list[dict], wants: list[list[np.ndarray]], runner=None) -> dict:
    """The file (run by `runner`, default ONNX Runtime's CPU provider) against PyTorch's outputs `wants` (one list
    per feed, in the graph's output order) over every feed, e.g. every call of the student's loop (error_stats)."""
    run = (runner or onnxruntime_runner)(path)
    pairs = (pair for feed, want_all in zip(feeds, wants, strict=True)
             for pair in zip(run(feed), want_all, strict=True))
    return error_stats(pairs, len(feeds))


def within_tolerance(precision: str, errors: dict, scaled: bool = False, base: float | None = None) -> tuple[bool, str]:
    """(ok, what was checked) for a file's parity errors. `base`: a component's own max abs bound instead of
    TOLERANCE's; `scaled`: the bound is relative to the reference's largest magnitude where that exceeds 1, for
    outputs that are not unit-scale (text encoders' hidden states)."""
    if precision in REL_RMS_PRECISIONS:
        return errors["rel_rms_err"] <= INT8_MAX_REL_RMS, f"relative RMS error {errors['rel_rms_err']:.2e} " \
                                                          f"(tolerance {INT8_MAX_REL_RMS})"
    base = TOLERANCE[precision] if base is None else base
    bound = base * (max(1.0, errors["ref_max_abs"]) if scaled else 1.0)
    how = f" = {base:.0e} x max |output| {errors['ref_max_abs']:.3g}" if bound > base else ""
    return errors["max_abs_err"] <= bound, f"max abs error {errors['max_abs_err']:.2e} (tolerance {bound:.1e}{how})"


def checked_file(path: Path, feeds: list[dict], wants: list[list[np.ndarray]], precision: str, component: str,
                 seconds: float, scaled: bool = False, base: float | None = None) -> dict:
    """The manifest entry of one exported file after its parity check (within_tolerance); UserError when it
    misses the tolerance."""
    errors = parity(path, feeds, wants)
    ok, checked = within_tolerance(precision, errors, scaled, base)
    if not ok:
        raise UserError(f"{precision} ONNX of the {component} differs from PyTorch: {checked}; nothing was written")
    entry = {"path": path.name, "component": component, "precision": precision, **errors, "parity": checked,
             "export_seconds": round(seconds, 1)}
    if (path.parent / (path.name + ".data")).exists():
        entry["external_data"] = path.name + ".data"
    return entry
