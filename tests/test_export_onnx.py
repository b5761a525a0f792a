"""ONNX export of student bundles: parity with PyTorch (part of the export), the engine manifest being enough to
sample, a dynamic batch axis, and clear errors that leave nothing half-written. Tiny models only."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the [onnx] extra (onnx, onnxruntime) is not installed")

from distill.bundle import load_bundle  # noqa: E402
from distill.dmd2 import DMD2Config, train_dmd2  # noqa: E402
from distill.errors import UserError  # noqa: E402
from distill.sfd import SFDConfig, train_sfd  # noqa: E402
from distill.teachers import load_teacher  # noqa: E402
from export import int8 as export_int8  # noqa: E402
from export import onnx as export_onnx  # noqa: E402
from export import parity as export_parity  # noqa: E402
from runtime.convention import x0_from_output  # noqa: E402

from .conftest import make_tiny_pixel_dir  # noqa: E402
from .test_dmd2 import run_main  # noqa: E402


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    teacher_dir = make_tiny_pixel_dir(root / "teacher", num_classes=3)
    dmd2 = train_dmd2(DMD2Config(steps=1, batch_size=2, student_timesteps=(999, 499), use_gan=False, warmup=0,
                                 lr_generator=1e-3, lr_fake=1e-3), load_teacher(teacher_dir), None, root / "dmd2",
                      progress=False)
    sfdv = train_sfd(SFDConfig(nfes=(2, 3), steps=2, batch_size=2, lr=1e-3), load_teacher(teacher_dir), root / "sfdv",
                     progress=False)
    return {"dmd2": dmd2, "sfd-v": sfdv}


def ort_sample(engine_dir: Path, noise: np.ndarray, labels: np.ndarray, fresh: np.ndarray | None) -> np.ndarray:
    """The few-step loop from the engine folder alone (runtime.Pipeline: manifest + ONNX Runtime, no torch), as
    floats: x0 in [-1, 1] before the uint8 conversion."""
    from runtime import Pipeline

    pipe = Pipeline.load(engine_dir, "onnxruntime-cpu")
    schedule = pipe.schedule(None)
    draws = np.concatenate([noise[:, None], fresh.transpose(1, 0, 2, 3, 4)], axis=1)[:, :pipe.draws(schedule["nfe"])]
    return pipe.sample(schedule, draws, {"class_labels": labels.astype(np.int64)})[0]


@pytest.mark.parametrize("kind,nfe", [("dmd2", 2), ("dmd2", 1), ("sfd-v", 3)])
def test_export_parity_and_sampling_from_the_engine_folder(bundles, tmp_path, kind, nfe):
    out = export_onnx.export_onnx(bundles[kind], tmp_path / "engine", nfe=nfe)
    manifest = json.loads((out / export_onnx.ENGINE_MANIFEST).read_text())
    entry = manifest["files"]["fp32"]
    assert entry["max_abs_err"] <= 1e-4 and entry["calls_checked"] == nfe
    assert ("nfe" in [i["name"] for i in manifest["inputs"]]) == (kind == "sfd-v")
    assert not (tmp_path / "engine.tmp").exists()

    bundle = load_bundle(bundles[kind])
    for batch in (1, 5):  # the batch axis is dynamic
        g = torch.Generator().manual_seed(batch)
        noise = torch.randn((batch, *bundle.x_shape), generator=g)
        labels = torch.arange(batch) % 3
        fresh = torch.randn((nfe, batch, *bundle.x_shape), generator=g)
        want = bundle.generate(noise, bundle.cond(labels), nfe, fresh_noise=fresh).numpy()
        got = ort_sample(out, noise.numpy(), labels.numpy(), fresh.numpy())
        # images in [-1, 1]: 1e-3 is a fifth of one uint8 level (x0 at sigma ~150 scales graph rounding by sigma)
        assert np.abs(got - want).max() < 1e-3, np.abs(got - want).max()


def test_bad_input_is_one_clear_line_and_writes_nothing(bundles, tmp_path, capsys):
    cases = {
        "no_manifest": (["--bundle", str(tmp_path)], "no fewstep_student.json"),
        "nfe": (["--bundle", str(bundles["sfd-v"]), "--nfe", "4"], "serves NFE 2, 3"),
        "precision": (["--bundle", str(bundles["dmd2"]), "--precision", "fp8"], "not exported yet"),
    }
    for name, (argv, expected) in cases.items():
        code, out, err = run_main(export_onnx.main, argv + ["--out", str(tmp_path / name)], capsys)
        assert code == 2 and err.startswith("error: ") and expected in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / name).exists() and not (tmp_path / f"{name}.tmp").exists()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, out, err = run_main(export_onnx.main, ["--bundle", str(bundles["dmd2"]), "--out", str(blocker / "engine")],
                              capsys)
    assert code == 2 and "cannot write the engine folder" in err


def test_parity_failure_stops_the_export(bundles, tmp_path, monkeypatch):
    monkeypatch.setitem(export_parity.TOLERANCE, "fp32", 0.0)  # no file can meet a zero tolerance
    with pytest.raises(UserError, match="differs from PyTorch"):
        export_onnx.export_onnx(bundles["dmd2"], tmp_path / "engine")
    assert not (tmp_path / "engine").exists() and not (tmp_path / "engine.tmp").exists()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_runtime_x0_matches_the_denoiser_convention(prediction_type):
    from distill.teachers.denoiser import vp_output_to_x0

    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64) * 5, torch.randn(3, 1, 4, 4, generator=g)
    sigma = torch.tensor([0.01, 1.0, 150.0], dtype=torch.float64)
    want = vp_output_to_x0(out.double(), x, sigma.reshape(-1, 1, 1, 1), prediction_type).numpy()
    got = x0_from_output(out.numpy(), x.numpy(), sigma.numpy(), prediction_type)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_int8_is_symmetric_per_channel_qdq(bundles, tmp_path, monkeypatch):
    """TensorRT's explicit quantization needs Q/DQ pairs with zero point 0 and per-channel weight scales."""
    import sys

    import onnx
    from onnx import numpy_helper

    # The structure, on the tiny random student (whose int8 accuracy means nothing: the digits students' FD gate
    # is in the README); export_onnx itself would refuse it on parity, which the next test relies on.
    out = export_onnx.export_onnx(bundles["dmd2"], tmp_path / "engine")
    bundle = load_bundle(bundles["dmd2"])
    monkeypatch.setitem(sys.modules, "modelopt.onnx.quantization", None)  # ONNX Runtime's path, even with ModelOpt
    made_by = export_int8.to_int8(out / "student_fp32.onnx", tmp_path / "q.onnx",
                                  export_int8.calibration_inputs(bundle, [2]))
    assert made_by.startswith("onnxruntime ")
    model = onnx.load(str(tmp_path / "q.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq, "no Q/DQ nodes"
    zero_points = [inits[n.input[2]] for n in qdq if len(n.input) > 2 and n.input[2] in inits]
    assert zero_points and all((z == 0).all() and z.dtype == np.int8 for z in zero_points)
    scales = [inits[n.input[1]] for n in qdq if n.input[1] in inits]
    assert any(s.ndim == 1 and s.size > 1 for s in scales)  # per-channel weights
    import onnxruntime as ort

    feed = export_onnx.loop_inputs(bundle, 2, 3)[0]
    assert ort.InferenceSession(str(tmp_path / "q.onnx")).run(["prediction"], feed)[0].shape == feed["x"].shape


def test_int8_by_modelopt_is_symmetric_per_channel_qdq(bundles, tmp_path):
    """Where NVIDIA ModelOpt is installed, to_int8 uses it: every Q/DQ with an int8 zero point of 0 (a missing zero
    point would mean uint8), int8 weights behind DequantizeLinear with one scale per output channel, the
    embeddings float; and the file runs."""
    pytest.importorskip("modelopt.onnx.quantization", reason="nvidia-modelopt (the [quant] extra) is not installed")
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    out = export_onnx.export_onnx(bundles["dmd2"], tmp_path / "engine")
    bundle = load_bundle(bundles["dmd2"])
    made_by = export_int8.to_int8(out / "student_fp32.onnx", tmp_path / "q.onnx",
                                  export_int8.calibration_inputs(bundle, [2]))
    assert made_by.startswith("modelopt ")
    model = onnx.load(str(tmp_path / "q.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(len(n.input) == 3 and n.input[2] in inits for n in qdq)
    assert all(inits[n.input[2]].dtype == np.int8 and (inits[n.input[2]] == 0).all() for n in qdq)
    weights = [n for n in qdq if n.input[0] in inits]
    assert weights and all(n.op_type == "DequantizeLinear" and inits[n.input[0]].dtype == np.int8 for n in weights)
    for n in weights:
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        assert inits[n.input[1]].size in (1, inits[n.input[0]].shape[axis]), n.name  # 1: a single output channel
    assert any(inits[n.input[1]].size > 1 for n in weights)
    dq_outputs = {n.output[0] for n in qdq if n.op_type == "DequantizeLinear"}
    quantized = [n for n in model.graph.node if dq_outputs.intersection(n.input)]
    assert {"Conv", "Gemm"} <= {n.op_type for n in quantized}
    assert not [n.name for n in quantized if any(k in n.name for k in export_int8.EMBEDDING_NODES)]
    feed = export_onnx.loop_inputs(bundle, 2, 3)[0]
    assert ort.InferenceSession(str(tmp_path / "q.onnx")).run(["prediction"], feed)[0].shape == feed["x"].shape


@pytest.mark.parametrize("kind,nfe", [("dmd2", 2), ("sfd-v", 3)])
def test_fp16_is_half_weights_and_compute_with_fp32_io(bundles, tmp_path, kind, nfe):
    import onnx
    from onnx import TensorProto

    from runtime import Pipeline

    out = export_onnx.export_onnx(bundles[kind], tmp_path / "engine", nfe=nfe, precisions=("fp32", "fp16"))
    manifest = json.loads((out / export_onnx.ENGINE_MANIFEST).read_text())
    assert manifest["files"]["fp16"]["max_abs_err"] <= 1e-2
    model = onnx.load(str(out / "student_fp16.onnx"))
    weights = [i for i in model.graph.initializer if len(i.dims) >= 2]  # conv / linear weights
    assert weights and all(i.data_type == TensorProto.FLOAT16 for i in weights)
    io = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert io["x"] == io["sigma"] == io["timestep"] == io["prediction"] == TensorProto.FLOAT
    labels = [0, 1, 2, 0]
    half = Pipeline.load(out, "onnxruntime-cpu", "fp16").generate(labels, nfe=nfe, seed=5).images
    full = Pipeline.load(out, "onnxruntime-cpu", "fp32").generate(labels, nfe=nfe, seed=5).images
    diff = np.abs(half.astype(int) - full)
    # uint8 levels; a random tiny net amplifies the 2-step loop's fp16 error more than a trained student (whose
    # FD through the fp16 file is the quality gate: +0.03 % on the digits DMD2 student)
    assert diff.mean() <= 1.0 and diff.max() <= 8, (diff.mean(), diff.max())
