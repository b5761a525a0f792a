"""The int8 precision paths, calibrated on the student's own loop inputs: "int8" (symmetric Q/DQ, the layout TensorRT
takes; NVIDIA ModelOpt where installed, else ONNX Runtime's quantizer) and "int8-cpu" (U8S8, the layout ONNX
Runtime's and OpenVINO's CPU integer kernels take)."""

from pathlib import Path

import numpy as np

from fewstep.errors import UserError

from .graph import loop_inputs

# int8-cpu keeps the UNet's first and last convolution in float: the last one's output is the prediction itself,
# which a uint8 grid would round to steps of ~2.5 image levels; each is well under 1 % of the multiply-adds.
FLOAT_ENDS = ("conv_in", "conv_out")
# The embeddings of the timestep, class and step count: left out of int8 quantization (their inputs span 0..1000,
# which one symmetric int8 scale cannot hold).
EMBEDDING_NODES = ("time_proj", "time_embedding", "class_embedding", "embedding")
CALIBRATION_BATCHES = 8  # int8: calibration batches of the student's own loop inputs (all classes cycling)


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
    from onnxruntime.quantization import QuantType

    # Only the heavy ops get Q/DQ (what TensorRT runs in int8); the timestep / class / NFE embeddings stay float:
    # their inputs span 0..1000, which one symmetric int8 scale cannot hold. Biases stay float: TensorRT fuses them
    # itself and does not take int32-quantized biases.
    ort_quantize(src, dst, calibration, QuantType.QInt8, lambda node, weights: any(k in node.name for k in
                 EMBEDDING_NODES), {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})
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
    from onnxruntime.quantization import QuantType

    def keep_float(node, weights):
        return (any(k in node.name for k in EMBEDDING_NODES + FLOAT_ENDS)
                or node.op_type == "MatMul" and not weights.intersection(node.input))

    ort_quantize(src, dst, calibration, QuantType.QUInt8, keep_float,
                 {"ActivationSymmetric": False, "WeightSymmetric": True})


def ort_quantize(src: Path, dst: Path, calibration: list[dict], activation_type, keep_float, options: dict) -> None:
    """ONNX Runtime's static Q/DQ quantizer, the one call both int8 layouts make: shape pre-processing, then Q/DQ on
    Conv / MatMul / Gemm with per-channel symmetric int8 weights and `activation_type` activations calibrated on
    `calibration` (feeds), except the nodes `keep_float(node, initializer names)` picks."""
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
    exclude = [n.name for n in graph.node if keep_float(n, weights)]
    try:
        quantize_static(str(prepared), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=activation_type, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "MatMul", "Gemm"], nodes_to_exclude=exclude,
                        extra_options=options)
    finally:
        prepared.unlink(missing_ok=True)


def calibration_inputs(bundle, nfes: list[int], batch: int = 16) -> list[dict]:
    """Every call the student's loop makes, for CALIBRATION_BATCHES seeds per served NFE (classes cycling)."""
    return [feed for nfe in nfes for seed in range(CALIBRATION_BATCHES) for feed in loop_inputs(bundle, nfe, batch,
                                                                                                 seed=100 + seed)]
