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
that looks complete. Precisions: fp32; fp16 (the module exported in half: fp16 weights and compute, fp32 I/O,
input scaling and timestep embedding in fp32, HalfGraph); int8 (explicit Q/DQ, symmetric, per-channel weights,
calibrated on the student's own loop inputs). Latent text-to-image students (SD 1.5 / SDXL layouts) also get their
teacher's text encoder(s), VAE decoder and tokenizers (export/latent.py), in fp32 so far.
TensorRT builds on these files.
"""

import argparse
import contextlib
import copy
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
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
# int8-cpu: int8 laid out for ONNX Runtime's CPU provider (to_int8_cpu); bf16: the fp32 file run by OpenVINO in bf16
# (ONNX Runtime's CPU provider has no bf16 convolutions). Both are judged like int8: parity on the relative RMS
# error, quality by the FD gate.
PRECISIONS = ("fp32", "fp16", "int8", "int8-cpu", "bf16")
REL_RMS_PRECISIONS = ("int8", "int8-cpu", "bf16")
# int8-cpu keeps the UNet's first and last convolution in float: the last one's output is the prediction itself,
# which a uint8 grid would round to steps of ~2.5 image levels; each is well under 1 % of the multiply-adds.
FLOAT_ENDS = ("conv_in", "conv_out")
# The backend a precision's quality gate samples through (the one it is served by), where not ONNX Runtime's CPU
BACKEND_OF = {"bf16": "openvino-cpu"}
# The embeddings of the timestep, class and step count: left out of int8 quantization (their inputs span 0..1000,
# which one symmetric int8 scale cannot hold).
EMBEDDING_NODES = ("time_proj", "time_embedding", "class_embedding", "embedding")
CALIBRATION_BATCHES = 8  # int8: calibration batches of the student's own loop inputs (all classes cycling)
OPSET = 17
# Weights past this many bytes go to an external data file next to the graph: a protobuf cannot exceed 2 GB, and
# constant folding adds tensors to the weights (SD 1.5's UNet is 3.4 GB in fp32, SDXL's 10 GB).
EXTERNAL_DATA_BYTES = 1.5 * 2**30


def condition_names(manifest: dict) -> list[str]:
    """The graph inputs after (x, sigma, timestep) that carry a student's conditioning, in order."""
    cond = manifest["conditioning"]
    # a text student's manifest names its backbone's condition inputs; older SD / SDXL bundles said only "sdxl"
    text = cond.get("inputs") or ["encoder_hidden_states", *(["text_embeds", "time_ids"] if cond.get("sdxl") else [])]
    names = {"class": ["class_labels"], "text": list(text)}
    return names.get(cond["kind"], []) + (["nfe"] if "nfe_condition" in manifest else [])


class GraphStudent(nn.Module):
    """The exported computation: the UNet's raw prediction at x / sqrt(1 + sigma^2), in float32 ops."""

    output_names = ["prediction"]

    def __init__(self, bundle):
        super().__init__()
        self.denoiser = bundle.denoiser
        self.net = bundle.denoiser.net
        self.prediction_type = bundle.denoiser.prediction_type
        self.input_names = ["x", "sigma", "timestep", *condition_names(bundle.manifest)]

    def forward(self, x, sigma, timestep, *extra):
        cond = dict(zip(self.input_names[3:], extra))
        s = sigma.reshape(-1, 1, 1, 1)
        # the family's input scaling (x / sqrt(1 + sigma^2), EDM's c_in, x / (1 + sigma)), in float32
        return self.net(self.denoiser.scale_input(x, s), self.denoiser.graph_time(timestep), **cond)


def loop_inputs(bundle, nfe: int, batch: int, seed: int = 0, cond: dict | None = None) -> list[dict]:
    """The inputs the student's own loop feeds its network at each call (numpy, named as the graph's)."""
    return run_loop(bundle, nfe, batch, seed, cond)[0]


def run_loop(bundle, nfe: int, batch: int, seed: int = 0, cond: dict | None = None) -> tuple[list[dict], torch.Tensor]:
    """The student's own loop on seeded noise: (the graph's feed at each call, the final x0 (batch, C, H, W)).
    `cond`: the condition tensors (text students: the encoded prompts); default: classes cycling, or none."""
    from distill.bundle import sample_dmd2, sample_sfd

    entry = bundle.manifest["nfe"][str(nfe)]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((batch, *bundle.x_shape), generator=g)
    if cond is None:
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
            x0 = sample_sfd(recorder, noise * sigmas[0].item(), sigmas, cond, afs=entry.get("afs", False))
        else:
            fresh = torch.randn((nfe, batch, *bundle.x_shape), generator=g)
            x0 = sample_dmd2(recorder, noise * sigmas[0].item(), sigmas, cond, fresh)
    # floats as float32, ids (class labels, the step count) as int64: the graph's input types
    cond_feed = {k: v.numpy().astype(np.float32 if v.is_floating_point() else np.int64) for k, v in cond.items()}
    feeds = [{"x": x.numpy().astype(np.float32), "sigma": sigma.float().numpy(),
              "timestep": bundle.denoiser.net_time(sigma.double()).float().numpy(), **cond_feed}
             for x, sigma in calls]
    return feeds, x0


def needs_external_data(weight_bytes: float) -> bool:
    """Whether a graph with this many bytes of weights must keep them outside the protobuf (2 GB limit)."""
    return weight_bytes > EXTERNAL_DATA_BYTES


@contextlib.contextmanager
def constant_attention_scale():
    """Attention's softmax scale as a constant in the graph. Without an explicit `scale`, the exporter computes
    1/sqrt(head_dim) from the query's runtime shape (Shape -> Sqrt); ONNX Runtime puts those shape ops on the CPU,
    so on CUDA every attention block waited for a host-to-device copy, and the copies ruled out CUDA graphs. The
    head dimension is static, so the scale is too."""
    sdpa = F.scaled_dot_product_attention

    def with_scale(query, key, value, *args, scale=None, **kwargs):
        if len(args) > 3:  # attn_mask, dropout_p, is_causal, then scale
            raise TypeError("pass scaled_dot_product_attention's scale by keyword")
        scale = float(query.shape[-1]) ** -0.5 if scale is None else scale
        return sdpa(query, key, value, *args, scale=scale, **kwargs)

    F.scaled_dot_product_attention = with_scale
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def export_graph(model: nn.Module, feed: dict, path: Path) -> None:
    """Trace `model` (with `input_names` / `output_names`, batch first everywhere) on `feed` into `path`; weights
    past EXTERNAL_DATA_BYTES go to one external file, `path.name + ".data"`, beside it."""
    import warnings

    import onnx

    args = tuple(torch.from_numpy(feed[name]) for name in model.input_names)
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # diffusers' shape asserts, all static here
    dynamic = {name: {0: "batch"} for name in [*model.input_names, *model.output_names]}
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    large = needs_external_data(weight_bytes)
    # Past 2 GB the exporter writes one file per tensor: export into a scratch folder, then gather them into one.
    target = path.parent / f"{path.stem}.export" / path.name if large else path
    target.parent.mkdir(exist_ok=True)
    # The TorchScript exporter: diffusers UNets and CLIP trace cleanly through it, it needs no onnxscript, and at
    # opset 17 it decomposes scaled_dot_product_attention into MatMul / Softmax (it does from opset 14 on).
    with constant_attention_scale():
        torch.onnx.export(model, args, str(target), input_names=model.input_names,
                          output_names=model.output_names, dynamic_axes=dynamic, opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)
    if large:
        onnx.save_model(onnx.load(str(target)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
        shutil.rmtree(target.parent)
    onnx.checker.check_model(str(path))  # the path form: the in-memory form refuses models past 2 GB


class HalfGraph(nn.Module):
    """GraphStudent in fp16 (weights and compute) with fp32 inputs and output, for a strongly typed engine.

    Kept in fp32: the input scaling x / sqrt(1 + sigma^2) (x reaches ~600 at the top sigma, where fp16's spacing is
    0.5) and the timestep fed to the sinusoidal embedding (diffusers computes it in fp32 from an fp32 timestep and
    casts the result: t ~ 1000 times a frequency in fp16 would put the phase off by up to a radian). Exporting the
    module in half, rather than converting the fp32 graph, keeps every op PyTorch's fp16 op: converting the graph
    rounds every edge between the decomposed GroupNorm / SiLU / attention ops to fp16 and gave 10x the error
    (2.9e-2 against 1.0e-3 on the digits DMD2 student)."""

    def __init__(self, model: GraphStudent):
        super().__init__()
        self.denoiser = model.denoiser
        self.net = copy.deepcopy(model.net).half()
        self.input_names, self.output_names = model.input_names, model.output_names

    def forward(self, x, sigma, timestep, *extra):
        s = sigma.reshape(-1, 1, 1, 1)
        x_vp = self.denoiser.scale_input(x, s).half()
        cond = {k: v.half() if v.is_floating_point() else v for k, v in zip(self.input_names[3:], extra)}
        return self.net(x_vp, self.denoiser.graph_time(timestep), **cond).float()


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


def to_int8(src: Path, dst: Path, calibration: list[dict]) -> str:
    """Explicit Q/DQ int8 from post-training calibration on the student's own loop inputs, in the form TensorRT
    accepts: symmetric (zero point 0) int8 activations and per-channel symmetric int8 weights. Made by NVIDIA
    ModelOpt where it is installed (the [quant] extra; the quantizer TensorRT's documentation recommends), else by
    ONNX Runtime's static quantizer; returns which, with its version ("modelopt 0.47.0", "onnxruntime 1.32.0")."""
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except ImportError:
        pass
    else:
        return to_int8_modelopt(src, dst, calibration)
    import onnxruntime
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
    exclude = [n.name for n in graph.node if any(k in n.name for k in EMBEDDING_NODES)]
    quantize_static(str(prepared), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"], nodes_to_exclude=exclude,
                    # biases stay float: TensorRT fuses them itself and does not take int32-quantized biases
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})
    prepared.unlink()
    return f"onnxruntime {onnxruntime.__version__}"


def to_int8_modelopt(src: Path, dst: Path, calibration: list[dict]) -> str:
    """to_int8 by NVIDIA ModelOpt's ONNX PTQ (`python -m modelopt.onnx.quantization`), which places Q/DQ by
    TensorRT's fusion rules: on Conv / MatMul / Gemm and also where TensorRT fuses int8 further (residual Adds, the
    upsampling Resize). Its defaults: symmetric int8 (zero points 0), per-channel weights, entropy calibration.
    Set here: calibration on ONNX Runtime's CPU provider (the same scales on any machine); the unquantized rest kept
    in fp32 (ModelOpt would convert it to fp16; the TensorRT build is strongly typed, so the file decides); weights
    stored in int8 behind DequantizeLinear only; the timestep / class / NFE embeddings left float, as in to_int8.
    Its graph is opset 19. Run in a subprocess: ModelOpt patches ONNX Runtime's quantization classes for the rest
    of the process, which would change any later quantize_static here (int8-cpu, to_int8's fallback)."""
    import importlib.metadata
    import re
    import subprocess
    import sys
    import tempfile

    import onnx

    exclude = [re.escape(n.name) + "$" for n in onnx.load(str(src), load_external_data=False).graph.node
               if any(k in n.name for k in EMBEDDING_NODES)]  # regular expressions, matched from the name's start
    # the feeds stacked, and one feed's shapes: ModelOpt splits the stack back into one calibration step per feed
    shapes = ",".join(f"{name}:{'x'.join(map(str, a.shape))}" for name, a in calibration[0].items())
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "calibration.npz"
        np.savez(data, **{name: np.concatenate([feed[name] for feed in calibration]) for name in calibration[0]})
        run = subprocess.run([sys.executable, "-m", "modelopt.onnx.quantization", "--onnx_path", str(src),
                              "--output_path", str(dst), "--quantize_mode", "int8", "--calibration_data_path",
                              str(data), "--calibration_shapes", shapes, "--calibration_eps", "cpu",
                              "--high_precision_dtype", "fp32", "--dq_only", "--log_level", "WARNING",
                              *(["--nodes_to_exclude", *exclude] if exclude else [])], capture_output=True, text=True)
    if run.returncode != 0 or not dst.exists():
        tail = "\n".join((run.stdout + run.stderr).strip().splitlines()[-20:])
        raise UserError(f"NVIDIA ModelOpt's int8 quantization of {src.name} failed (exit {run.returncode}); "
                        f"without nvidia-modelopt installed, export uses ONNX Runtime's quantizer:\n{tail}")
    return f"modelopt {importlib.metadata.version('nvidia-modelopt')}"


def to_int8_cpu(src: Path, dst: Path, calibration: list[dict]) -> None:
    """int8 laid out for ONNX Runtime's CPU provider (the "int8-cpu" precision; the int8 file stays as TensorRT takes
    it), calibrated like int8. Each choice measured on the digits student (docs/cpu_profile.md):
    - uint8 activations with a zero point x int8 symmetric per-channel weights (U8S8), int32 biases: what ORT's x86
      kernels (MLAS, AVX-512 VNNI) take directly, and what its QDQ fusions turn into QLinearConv, QLinearMatMul
      and QGemm for every weighted layer (the S8S8 int8 file leaves 10 of the digits UNet's 35 Conv in float, with
      their weights dequantized on every call);
    - only layers with weights: the attention's activation x activation MatMuls and its Softmax stay float
      (quantized, ORT runs them as QLinearMatMul / QLinearSoftmax, slower than in float), and so do the
      elementwise ops (QLinearAdd / QLinearMul are no faster than float Add / Mul);
    - the timestep / class / NFE embeddings stay float, as in int8, and so do the first and last convolution
      (FLOAT_ENDS): the parity error drops from 2.3 % to 1.5 % relative RMS at no measurable cost."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calibration)

        def get_next(self):
            return next(self.items, None)

    prepared = dst.with_suffix(".prep.onnx")
    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
    graph = onnx.load(str(prepared)).graph
    weights = {i.name for i in graph.initializer}
    exclude = [n.name for n in graph.node if any(k in n.name for k in EMBEDDING_NODES + FLOAT_ENDS)
               or n.op_type == "MatMul" and not weights.intersection(n.input)]
    quantize_static(str(prepared), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"], nodes_to_exclude=exclude,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    prepared.unlink()


def checked_bf16(fp32: Path, feeds: list[dict], wants: list[list[np.ndarray]], seconds: float) -> dict:
    """The "bf16" manifest entry: the fp32 file, run by OpenVINO with a bf16 inference precision (oneDNN's
    avx512_bf16 / AMX kernels), after its parity check through OpenVINO; UserError without OpenVINO or bf16."""
    from runtime.openvino import OpenVinoBackend

    t0 = time.perf_counter()
    backend = OpenVinoBackend(fp32, "bf16", threads=None)
    errors = error_stats(((backend.run(feed), want[0]) for feed, want in zip(feeds, wants, strict=True)), len(feeds))
    ok, checked = within_tolerance("bf16", errors)
    if not ok:
        raise UserError(f"bf16 (OpenVINO) of the unet differs from PyTorch: {checked}; nothing was written")
    return {"path": fp32.name, "component": "unet", "precision": "bf16", "backend": "openvino-cpu",
            "inference_precision": "bf16", **errors, "parity": f"{checked}, through OpenVINO",
            "export_seconds": round(seconds + time.perf_counter() - t0, 1)}


def calibration_inputs(bundle, nfes: list[int], batch: int = 16) -> list[dict]:
    """Every call the student's loop makes, for CALIBRATION_BATCHES seeds per served NFE (classes cycling)."""
    return [feed for nfe in nfes for seed in range(CALIBRATION_BATCHES) for feed in loop_inputs(bundle, nfe, batch,
                                                                                                 seed=100 + seed)]


def module_outputs(model: nn.Module, feeds: list[dict]) -> list[list[np.ndarray]]:
    """PyTorch's outputs of a graph module (`input_names`; one tensor or a tuple out) for each feed."""
    outs = []
    with torch.no_grad():
        for feed in feeds:
            out = model(*(torch.from_numpy(feed[n]) for n in model.input_names))
            outs.append([o.numpy() for o in (out if isinstance(out, tuple) else (out,))])
    return outs


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


def parity(path: Path, feeds: list[dict], wants: list[list[np.ndarray]]) -> dict:
    """ONNX Runtime (CPU) against PyTorch's outputs `wants` (one list per feed, in the graph's output order) over
    every feed, e.g. every call of the student's loop (error_stats)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pairs = (pair for feed, want_all in zip(feeds, wants, strict=True)
             for pair in zip(session.run(None, feed), want_all, strict=True))
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


def io_specs(names: list[str], feed: dict) -> list[dict]:
    """Name, dtype and shape (batch first) of graph inputs or outputs, read off one feed."""
    return [{"name": n, "dtype": str(feed[n].dtype), "shape": ["batch", *feed[n].shape[1:]]} for n in names]


def step_coefficients(schedule: dict, prediction_type: str, denoiser=None) -> list[dict]:
    """Per step of a schedule, the scalars a host's loop needs (docs/engine_spec.md), so it need not derive them.
    The runtime computes them itself (runtime/pipeline.py); tests/test_golden.py checks that both agree.

    x0 = x0_from_x * x + x0_from_prediction * prediction, with sigma as fed to the graph (float32);
    SFD ("renoise": "none"): x += euler_dt * (x - x0) / sigma, or with AFS on step 0 (no network call)
    x += euler_dt * input_scale * x; DMD2 ("fresh_noise"): x = x0 + renoise_sigma * the next noise draw."""
    sigmas, timesteps, renoise = schedule["sigmas"], schedule["timesteps"], schedule["renoise"]
    steps = []
    for i in range(len(sigmas) - 1 if renoise == "none" else len(sigmas)):
        s = float(np.float32(sigmas[i]))  # the x0 closed forms use the sigma the graph was fed
        if denoiser is None or denoiser.parameterization == "vp":
            x0_coefficients = {"epsilon": (1.0, -s), "v_prediction": (1 / (1 + s * s), -s / np.sqrt(1 + s * s)),
                               "sample": (0.0, 1.0)}[prediction_type]
            input_scale = 1 / float(np.sqrt(1 + sigmas[i] ** 2))
        else:  # the family's own (c_skip, c_out) and c_in
            sig = torch.tensor([s], dtype=torch.float64)
            x0_coefficients = [float(c) for c in denoiser.scalings(sig)]
            input_scale = float(denoiser.scale_input(torch.ones(1, dtype=torch.float64),
                                                     torch.tensor([float(sigmas[i])], dtype=torch.float64)))
        step = {"sigma": sigmas[i], "timestep": timesteps[i],
                "network_call": not (renoise == "none" and schedule["afs"] and i == 0),
                "input_scale": input_scale,
                "x0_from_x": float(x0_coefficients[0]), "x0_from_prediction": float(x0_coefficients[1])}
        if renoise == "none":
            step["euler_dt"] = sigmas[i + 1] - sigmas[i]
        else:
            step["renoise_sigma"] = sigmas[i + 1] if i + 1 < len(sigmas) else 0.0
        steps.append(step)
    return steps


def engine_manifest(bundle, nfe: int, model: GraphStudent, files: dict, feed: dict | None = None) -> dict:
    """The engine manifest of the student's network; `feed`: one of its loop inputs (default: a pixel student's)."""
    m = bundle.manifest
    feed = loop_inputs(bundle, nfe, 1)[0] if feed is None else feed
    inputs = io_specs(model.input_names, feed)
    extra = {"class_labels": {"range": [0, (bundle.num_classes or 0) - 1]}, "nfe": {"value": nfe},
             "time_ids": {"value": feed["time_ids"][0].tolist() if "time_ids" in feed else None}}
    for spec in inputs:
        spec.update(extra.get(spec["name"], {}))

    def schedule(k: int) -> dict:
        sig = bundle.sigmas(k)
        entry = {"nfe": k, "sigmas": [float(s) for s in sig],
                 "timesteps": [float(t) for t in bundle.denoiser.net_time(sig)],
                 "afs": bool(m["nfe"][str(k)].get("afs", False)), "renoise": m["renoise"],
                 "first_input": "noise * sigmas[0]"}
        return entry | {"steps": step_coefficients(entry, m["prediction_type"], bundle.denoiser)}

    return {"format_version": ENGINE_FORMAT_VERSION, "method": m["method"], "family": m["family"],
            "graph": "prediction = network(c_in(sigma) x, timestep, ...): x in VE form (x = x0 + sigma * eps), c_in "
                     "the parameterization's input scaling; feed timestep = the schedule's timestep for each sigma; "
                     "x0 from prediction_type and parameterization (runtime/convention.py)",
            "prediction_type": m["prediction_type"],
            **{k: v for k, v in bundle.denoiser.spec().items() if k in ("parameterization", "sigma_data")},
            "inputs": inputs,
            "outputs": io_specs(model.output_names, {"prediction": feed["x"]}),
            # `schedule`: the NFE export checked (parity, quality gate) and the runtime's default; `schedules`: every
            # NFE the network serves (an SFD-v network takes the step count as an input)
            "schedule": schedule(nfe), "schedules": {str(k): schedule(k) for k in bundle.nfes},
            "conditioning": m["conditioning"], "image": m["image"], "files": files,
            "student": {"bundle": str(Path(bundle.source).resolve()), "metrics": m.get("metrics", {}),
                        "teacher": m.get("teacher")}}


def is_digits_student(bundle) -> bool:
    image, cond = bundle.manifest["image"], bundle.manifest["conditioning"]
    return (image["channels"], image["height"], image["width"]) == (1, 16, 16) and cond.get("num_classes") == 10


def quality_gate(bundle, engine_dir: Path, nfe: int, precisions: list[str], n: int = 1000,
                 backend: str | None = None) -> dict:
    """Digits students: FD / class accuracy of the loop run through each exported file (runtime.Pipeline) against
    the PyTorch student on the same noise; {} for other students (no metric for them here)."""
    if not is_digits_student(bundle):
        return {}
    from distill.data import to_uint8
    from distill.metrics import digits_metric
    from distill.sample import noise_for
    from runtime import Pipeline

    metric = digits_metric()
    labels = torch.arange(n) % 10
    draws = noise_for(1, 0, n, (nfe, *bundle.x_shape))  # (N, nfe, C, H, W): start noise, then re-noising draws
    noise, fresh = draws[:, 0], draws[:, 1:].transpose(0, 1)
    with torch.no_grad():
        ref = metric(to_uint8(bundle.generate(noise, bundle.cond(labels), nfe, fresh_noise=fresh)).numpy(),
                     labels.numpy())
    out = {}
    for precision in precisions:
        pipe = Pipeline.load(engine_dir, backend or BACKEND_OF.get(precision, "onnxruntime-cpu"), precision)
        got = metric(pipe.generate(labels.numpy(), noise=draws[:, :pipe.draws(nfe)].numpy()).images, labels.numpy())
        out[precision] = {"n": n, "fd": got["fd"], "accuracy": got["accuracy"], "fd_pytorch_fp32": ref["fd"],
                          "fd_change": got["fd"] / ref["fd"] - 1}
    return out


def openvino_serves(files: dict) -> bool:
    """Whether the openvino-cpu backend is installed and this engine has int8 files for it to run (their FD
    through OpenVINO differs from ONNX Runtime's, so the quality gate measures it too)."""
    from runtime.openvino import openvino_available

    return openvino_available() and any(p in files for p in ("int8", "int8-cpu"))


def open_engine_folder(out_dir: Path) -> Path:
    """A fresh `out_dir.tmp` to write the engine into (finish_engine_folder renames it over out_dir)."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"cannot write the engine folder next to {out_dir} ({e.strerror}); "
                        "choose another --out") from None
    return tmp


def finish_engine_folder(tmp: Path, out_dir: Path) -> None:
    """Replace a previous engine folder only once the new one is complete (two renames)."""
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)


def export_onnx(bundle_dir: str | Path, out_dir: str | Path, nfe: int | None = None,
                precisions: tuple[str, ...] = ("fp32",), check_batch: int = 4, quality_samples: bool = True,
                teacher: str | Path | None = None) -> Path:
    """Write out_dir/{student_<precision>.onnx, fewstep_engine.json} (latent students: also their text encoder(s),
    VAE decoder and tokenizers, export/latent.py; `teacher` overrides the teacher folder the bundle names);
    returns out_dir. Fails (UserError) on parity, leaving nothing behind."""
    out_dir = Path(out_dir)
    bundle = load_bundle(bundle_dir)
    nfe = bundle.nfes[-1] if nfe is None else nfe
    if str(nfe) not in bundle.manifest["nfe"]:
        raise UserError(f"--nfe {nfe}: this {bundle.manifest['method']} student serves NFE "
                        f"{', '.join(map(str, bundle.nfes))}")
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise UserError(f"precision {unknown[0]!r} is not exported yet; available: {', '.join(PRECISIONS)}")
    latent = bundle.manifest["family"] == "latent"
    if latent:
        from . import latent as latent_parts

        latent_parts.check_precisions(precisions)
        text_teacher = latent_parts.load_teacher_parts(bundle, teacher)
    tmp = open_engine_folder(out_dir)
    try:
        model = GraphStudent(bundle).eval()
        cond = latent_parts.loop_condition(text_teacher, check_batch) if latent else None
        feeds, x0 = run_loop(bundle, nfe, check_batch, cond=cond)
        wants = module_outputs(model, feeds)
        files, sections = {}, {}
        fp32 = tmp / "student_fp32.onnx"
        for precision in ("fp32", *[p for p in precisions if p != "fp32"]):
            path = tmp / f"student_{precision}.onnx"
            t0 = time.perf_counter()
            made_by = {}  # int8: which quantizer made the file
            if precision == "fp32":
                export_graph(model, feeds[0], path)
            elif precision == "fp16":
                export_graph(HalfGraph(model).eval(), feeds[0], path)
            elif precision == "bf16":
                files[precision] = checked_bf16(fp32, feeds, wants, time.perf_counter() - t0)
                continue
            elif precision == "int8-cpu":
                to_int8_cpu(fp32, path, calibration_inputs(bundle, [nfe]))
            else:
                made_by = {"quantizer": to_int8(fp32, path, calibration_inputs(bundle, [nfe]))}
            files[precision] = checked_file(path, feeds, wants, precision, "unet", time.perf_counter() - t0) | made_by
        if latent:
            more, sections = latent_parts.export_parts(text_teacher, x0, tmp)
            files |= more
            sections["guidance"] = latent_parts.guidance(bundle, text_teacher)

        def write_manifest():
            manifest = engine_manifest(bundle, nfe, model, files, feeds[0]) | sections
            (tmp / ENGINE_MANIFEST).write_text(json.dumps(manifest, indent=2))

        write_manifest()
        gate = quality_gate(bundle, tmp, nfe, list(files)) if quality_samples else {}
        for precision, result in gate.items():
            files[precision]["quality"] = result
        if quality_samples and openvino_serves(files):  # OpenVINO's int8 rounds its own way: its own FD
            ov = [p for p in files if p in ("fp32", "int8", "int8-cpu")]
            for precision, result in quality_gate(bundle, tmp, nfe, ov, backend="openvino-cpu").items():
                files[precision]["quality_openvino"] = result
        if "fp32" not in precisions and "bf16" not in precisions:  # it was the source of the others
            fp32.unlink()
            del files["fp32"]
        write_manifest()
    except BaseException:  # a failed export leaves nothing that looks complete
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finish_engine_folder(tmp, out_dir)
    return out_dir


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="a student bundle folder (…/student)")
    p.add_argument("--out", type=Path, help="engine folder (default: BUNDLE/../engine)")
    p.add_argument("--nfe", type=int, help="the schedule the engine serves (default: the most the student serves)")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32, fp16, int8, int8-cpu, bf16 "
                                                        "(fp32 is always built first)")
    p.add_argument("--teacher", type=Path, help="latent students: the teacher folder whose text encoders, VAE and "
                                                "tokenizers go into the engine (default: the one the bundle names)")
    args = p.parse_args(argv)
    out = args.out or args.bundle.parent / "engine"
    precisions = tuple(s.strip() for s in args.precision.split(",") if s.strip())
    out = export_onnx(args.bundle, out, args.nfe, precisions, teacher=args.teacher)
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
