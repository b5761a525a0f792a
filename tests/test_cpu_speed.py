"""CPU fast paths on the committed digits student (1.2 M parameters, seconds to export): the int8-cpu export
(parity, and the structure ONNX Runtime fuses into integer kernels), the OpenVINO backend against ONNX Runtime, the
bf16 entry, benchmarks.cpu_profile (its tables sum to the total, its MAC count matches the network's) and
benchmarks.runtime_bench's quality columns. Timings are not asserted here: they are in docs/cpu_profile.md and the
README's "CPU speed" section."""

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime", reason="the [onnx] extra (onnx, onnxruntime) is not installed")
onnx = pytest.importorskip("onnx", reason="the [onnx] extra (onnx, onnxruntime) is not installed")

from benchmarks import cpu_profile as profile  # noqa: E402
from benchmarks import runtime_bench as bench  # noqa: E402
from distill.bundle import load_bundle  # noqa: E402
from distill.digits import TEACHER_DIR  # noqa: E402
from export import onnx as export_onnx  # noqa: E402
from export import parity as export_parity  # noqa: E402
from runtime import Pipeline, UserError, native  # noqa: E402
from runtime.openvino import openvino_available  # noqa: E402

STUDENT_DIR = TEACHER_DIR.parent / "digits_student"
needs_openvino = pytest.mark.skipif(not openvino_available(), reason="openvino is not installed (the [cpu] extra)")


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """The committed digits student (SFD-v, 16x16, 1 NFE) and its engine with fp32 and int8-cpu files: a trained
    network, because a random tiny one does not survive per-tensor activation quantization (its up blocks'
    shortcut convolutions see skip and deep features of very different scales), so int8 parity would fail."""
    engine = export_onnx.export_onnx(STUDENT_DIR, tmp_path_factory.mktemp("cpu") / "engine",
                                     precisions=("fp32", "int8-cpu"), quality_samples=False)
    return STUDENT_DIR, engine


def optimized_graph(path, tmp_path) -> "onnx.ModelProto":
    """The graph ONNX Runtime's CPU provider runs, as it saves it (SessionOptions.optimized_model_filepath)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3  # the NCHWc warning: this saved graph is for this machine only
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "optimized.onnx"))


def test_int8_cpu_passes_parity_and_runs_every_conv_in_integer_kernels(student, tmp_path):
    _, engine = student
    manifest = json.loads((engine / export_onnx.ENGINE_MANIFEST).read_text())
    entry = manifest["files"]["int8-cpu"]
    assert entry["path"] == "student_int8-cpu.onnx" and entry["calls_checked"] == 1
    assert entry["rel_rms_err"] <= export_parity.INT8_MAX_REL_RMS and "relative RMS" in entry["parity"]

    source = onnx.load(str(engine / entry["path"]))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in source.graph.initializer}
    q = [n for n in source.graph.node if n.op_type == "QuantizeLinear"]
    assert q and all(inits[n.input[2]].dtype == np.uint8 for n in q)  # U8 activations: MLAS's fast x86 path
    assert any(inits[n.input[2]].any() for n in q)  # asymmetric: real zero points

    fp32_convs = Counter(n.op_type for n in onnx.load(str(engine / "student_fp32.onnx")).graph.node)["Conv"]
    ops = Counter(n.op_type for n in optimized_graph(engine / entry["path"], tmp_path).graph.node)
    # every Conv an integer kernel but the first and last (export_int8.FLOAT_ENDS), no weight dequantized per call
    assert ops["QLinearConv"] == fp32_convs - 2, ops
    assert sum(ops[k] for k in ("Conv", "FusedConv")) == 2, ops
    float_convs = [n.name for n in source.graph.node if n.op_type == "Conv" and n.input[1] in inits]
    assert sorted(float_convs) == ["/net/backbone/unet/conv_in/Conv", "/net/backbone/unet/conv_out/Conv"]
    assert ops["QLinearMatMul"] > 0 and not ops["QLinearSoftmax"], ops  # projections int8, attention scores float

    # The runtime serves it, close to fp32 (the quickstart student's FD through it is in the README)
    labels = [0, 1, 2, 9]
    got = Pipeline.load(engine, "onnxruntime-cpu", "int8-cpu", threads=1).generate(labels, seed=3).images
    want = Pipeline.load(engine, "onnxruntime-cpu", "fp32", threads=1).generate(labels, seed=3).images
    assert np.abs(got.astype(int) - want).mean() < 2


@needs_openvino
@pytest.mark.parametrize("precision", ["fp32", "int8-cpu"])
def test_openvino_matches_onnxruntime(student, precision):
    _, engine = student
    ov = Pipeline.load(engine, "openvino-cpu", precision, threads=1)
    ref = Pipeline.load(engine, "onnxruntime-cpu", precision, threads=1)
    assert ov.backend.name == "openvino-cpu" and ov.backend.inference_precision == "f32"
    fp32 = Pipeline.load(engine, "onnxruntime-cpu", "fp32", threads=1)
    labels = list(np.arange(20) % 10)
    want, full = ref.generate(labels, seed=7).images.astype(int), fp32.generate(labels, seed=7).images.astype(int)
    for batch_size in (5, 2, 1):  # a compiled model per batch size
        got = ov.generate(labels, seed=7, batch_size=batch_size).images.astype(int)
        if precision == "fp32":  # the same arithmetic up to summation order
            assert np.abs(got - want).max() <= 1, np.abs(got - want).max()
        else:
            # Two int8 executions of one Q/DQ graph (OpenVINO's FakeQuantize vs ONNX Runtime's QLinear kernels)
            # round differently at level boundaries and the differences travel through 30 layers: on 200
            # quickstart-student images they differ by 1.0 levels on average, each 0.85 from the fp32 file's.
            assert np.abs(got - want).mean() <= 1.5, np.abs(got - want).mean()
            assert abs(np.abs(got - full).mean() - np.abs(want - full).mean()) <= 0.5
    assert sorted(ov.backend.compiled) == [1, 2, 5]  # each size compiled once, then kept


@needs_openvino
def test_bf16_entry_runs_on_openvino_only(student, tmp_path):
    from runtime.openvino import cpu_supports_bf16

    if not cpu_supports_bf16():
        pytest.skip("this CPU has no bf16 instructions")
    bundle_dir, _ = student
    engine = export_onnx.export_onnx(bundle_dir, tmp_path / "engine", precisions=("bf16",), quality_samples=False)
    entry = json.loads((engine / export_onnx.ENGINE_MANIFEST).read_text())["files"]["bf16"]
    assert entry["path"] == "student_fp32.onnx" and (engine / entry["path"]).exists()  # kept: bf16 runs it
    assert entry["backend"] == "openvino-cpu" and entry["inference_precision"] == "bf16"
    assert entry["rel_rms_err"] <= export_parity.INT8_MAX_REL_RMS
    pipe = Pipeline.load(engine, "openvino-cpu", "bf16", threads=1)
    assert pipe.backend.inference_precision == "bf16" and pipe.generate([0, 1], seed=0).images.shape == (2, 16, 16, 1)
    with pytest.raises(UserError, match="runs on backend openvino-cpu"):
        Pipeline.load(engine, "onnxruntime-cpu", "bf16")


def conv_macs_by_hooks(bundle_dir) -> int:
    """Conv multiply-accumulates per image counted on the PyTorch network itself (forward hooks)."""
    bundle = load_bundle(bundle_dir)
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        total += output.numel() * module.in_channels // module.groups * int(np.prod(module.kernel_size))

    model = export_onnx.GraphStudent(bundle)
    feed = export_onnx.loop_inputs(bundle, 1, 1)[0]  # (runs the network itself: before the hooks)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(*(torch.from_numpy(feed[n]) for n in model.input_names))
    for h in handles:
        h.remove()
    return total


def test_profile_tables_sum_to_the_total_and_count_the_network(student, tmp_path):
    bundle_dir, engine = student
    out = tmp_path / "profile.md"
    profile.main(["--engine", str(engine), "--batches", "1,3", "--threads", "1", "--runs", "3", "--no-peak",
                  "--openvino", "no", "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    assert [(v["label"], v["batch"]) for v in result["variants"]] == [
        ("onnxruntime fp32", 1), ("onnxruntime fp32", 3), ("onnxruntime int8-cpu", 1), ("onnxruntime int8-cpu", 3)]
    for v in result["variants"]:
        assert sum(r["us"] for r in v["ops"]) == pytest.approx(v["total_us"], rel=1e-9)
        assert sum(r["share"] for r in v["ops"]) == pytest.approx(1.0)
        assert v["ops"][-1]["op"] == "outside kernels" and v["unprofiled_ms"] > 0
    assert result["macs"]["Conv"] == conv_macs_by_hooks(bundle_dir)
    assert result["macs"]["MatMul"] > 0 and result["macs_per_image"] == sum(result["macs"].values())
    text = out.read_text()
    assert "| **total** |" in text and "onnxruntime int8-cpu, batch 3" in text and "by kind" in text
    for v in result["variants"]:
        assert sum(k["us"] for k in v["kinds"].values()) == pytest.approx(v["total_us"], rel=1e-9)
    assert set(result["session_start"]) == {"fp32", "int8-cpu"}


def test_gemm_peak_measures_each_arithmetic():
    peak = profile.gemm_peak(threads=1, n=128)
    assert peak["fp32"]["gops"] > 0 and peak["int8"]["gops"] > 0 and "MatMulInteger" in peak["int8"]["how"]


def test_bench_shows_each_variants_fd_beside_its_speed(student, tmp_path, capsys):
    engine = shutil.copytree(student[1], tmp_path / "engine")
    # the tiny student is not a digits student, so export ran no quality gate: give its files one
    manifest_path = engine / export_onnx.ENGINE_MANIFEST
    manifest = json.loads(manifest_path.read_text())
    for precision, change in (("fp32", 0.0), ("int8-cpu", -0.007)):
        manifest["files"][precision]["quality"] = {"n": 1000, "fd": 0.094 * (1 + change), "accuracy": 1.0,
                                                   "fd_pytorch_fp32": 0.094, "fd_change": change}
    # OpenVINO's own run of the int8-cpu file (export measures it when OpenVINO is installed)
    manifest["files"]["int8-cpu"]["quality_openvino"] = dict(manifest["files"]["int8-cpu"]["quality"],
                                                             fd_change=-0.004)
    manifest_path.write_text(json.dumps(manifest))
    out = tmp_path / "bench"
    backends = "onnxruntime-cpu,openvino-cpu" if openvino_available() else "onnxruntime-cpu"
    bench.main(["--engine", str(engine), "--batches", "1", "--backends", backends, "--teacher", "none",
                "--seconds", "0.05", "--threads", "1", "--interleave", "--overhead-repeats", "3", "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    rows, series = result["rows"], result["overhead_series"]
    # the overhead series: numpy always, the compiled arithmetic where it was built; the headline is a median run
    assert len(series["numpy"]["runs"]) == 3 and ("compiled" in series) == (native.lib is not None)
    headline = series.get("compiled", series["numpy"])
    assert result["overhead"] == headline["median_run"] and headline["min"] <= headline["median"] <= headline["max"]
    got = {(r["backend"], r["precision"]): r.get("fd_change") for r in rows}
    assert got[("onnxruntime-cpu", "fp32")] == 0.0 and got[("onnxruntime-cpu", "int8-cpu")] == -0.007
    if openvino_available():
        assert got[("openvino-cpu", "int8-cpu")] == -0.004
    text = out.with_suffix(".md").read_text()
    assert "| FD | FD vs PyTorch |" in text and "-0.7 %" in text and "variants interleaved" in text
    assert [(r["backend"], r["precision"]) for r in rows][:2] == [("onnxruntime-cpu", "fp32"),
                                                                  ("onnxruntime-cpu", "int8-cpu")]
