"""TensorRT plans of student bundles (`python -m export.trt`): --batch parsing and its one-line errors (checked before
any export work), the ONNX files and manifest written even where TensorRT is missing, and, where TensorRT and a CUDA
GPU are present, the real build: fp32 and fp16 plans at batch 1:2:4, parity with PyTorch, a timing cache written and
read back. Tiny models only; nothing here stands in for TensorRT."""

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the [onnx] extra (onnx, onnxruntime) is not installed")

from distill.bundle import load_bundle  # noqa: E402
from distill.dmd2 import DMD2Config, train_dmd2  # noqa: E402
from distill.errors import UserError  # noqa: E402
from distill.teachers import load_teacher  # noqa: E402
from export import trt as export_trt  # noqa: E402
from export.onnx import ENGINE_MANIFEST, GraphStudent, loop_inputs  # noqa: E402

from .conftest import make_tiny_pixel_dir  # noqa: E402
from .test_dmd2 import run_main  # noqa: E402

TENSORRT_MISSING = export_trt.tensorrt_missing_reason()
NO_TENSORRT_HERE = ("TensorRT is not installed (it cannot be installed on the development machine: its PyPI packages "
                    "fetch their libraries from NVIDIA's index); the build path is written against the TensorRT 10/11 "
                    "API and runs where TensorRT and a CUDA GPU are present")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A 2-step class-conditional DMD2 student (inputs x, sigma, timestep, class_labels: int64 included)."""
    root = tmp_path_factory.mktemp("trt")
    teacher_dir = make_tiny_pixel_dir(root / "teacher", num_classes=3)
    return train_dmd2(DMD2Config(steps=1, batch_size=2, student_timesteps=(999, 499), use_gan=False, warmup=0,
                                 lr_generator=1e-3, lr_fake=1e-3), load_teacher(teacher_dir), None, root / "dmd2",
                      progress=False)


@pytest.mark.parametrize("text,expected", [("1:4:16", (1, 4, 16)), ("8", (8, 8, 8)), (" 2:2:3 ", (2, 2, 3))])
def test_parse_batch_range_accepts(text, expected):
    assert export_trt.parse_batch_range(text) == expected


@pytest.mark.parametrize("text,message", [
    ("16:4:1", "needs MIN <= OPT <= MAX"),
    ("1:8:4", "needs MIN <= OPT <= MAX"),
    ("0:1:2", "at least 1"),
    ("a:b:c", "expected MIN:OPT:MAX"),
    ("1:2", "expected MIN:OPT:MAX"),
    ("-1:2:3", "expected MIN:OPT:MAX"),
    ("", "expected MIN:OPT:MAX"),
])
def test_parse_batch_range_rejects(text, message):
    with pytest.raises(UserError, match=message):
        export_trt.parse_batch_range(text)


def test_bad_batch_fails_first_in_one_line(tmp_path, capsys):
    """--batch is checked before the bundle is even read: the bundle here does not exist."""
    for batch, expected in [("16:4:1", "needs MIN <= OPT <= MAX"), ("x", "expected MIN:OPT:MAX")]:
        argv = ["--bundle", str(tmp_path / "nowhere"), "--out", str(tmp_path / "engine"), "--batch", batch]
        code, _, err = run_main(export_trt.main, argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --batch") and expected in lines[0], err
    assert not (tmp_path / "engine").exists() and not (tmp_path / "engine.tmp").exists()


def test_bad_bundle_or_nfe_is_one_line_and_writes_nothing(bundle, tmp_path, capsys):
    cases = {"no_manifest": (["--bundle", str(tmp_path)], "no fewstep_student.json"),
             "nfe": (["--bundle", str(bundle), "--nfe", "4"], "serves NFE 1, 2"),
             "cpu_precision": (["--bundle", str(bundle), "--precision", "fp16,int8-cpu"], "not int8-cpu")}
    for name, (argv, expected) in cases.items():
        code, _, err = run_main(export_trt.main, argv + ["--out", str(tmp_path / name)], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expected in lines[0], err
        assert not (tmp_path / name).exists() and not (tmp_path / f"{name}.tmp").exists()


@pytest.mark.skipif(TENSORRT_MISSING is None, reason="TensorRT is installed; this checks the command without it")
def test_without_tensorrt_writes_the_onnx_folder_and_says_how_to_install(bundle, tmp_path, capsys):
    out = tmp_path / "engine"
    argv = ["--bundle", str(bundle), "--nfe", "2", "--out", str(out), "--precision", "fp32,fp16", "--batch", "1:2:4"]
    code, _, err = run_main(export_trt.main, argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: TensorRT is not installed") and 'pip install "fewstep[trt]"' in lines[0]
    assert "NVIDIA GPU" in lines[0] and str(out) in lines[0]

    manifest = json.loads((out / ENGINE_MANIFEST).read_text())
    assert manifest["tensorrt"]["built"] is False and "not installed" in manifest["tensorrt"]["reason"]
    assert sorted(manifest["files"]) == ["fp16", "fp32"]  # the ONNX files, each with its parity vs PyTorch
    assert manifest["files"]["fp32"]["max_abs_err"] <= 1e-4 and manifest["files"]["fp16"]["max_abs_err"] <= 1e-2
    assert all((out / f["path"]).is_file() for f in manifest["files"].values())
    assert not list(out.glob("*.plan*")) and not list(out.glob("*.tmp"))
    assert not (tmp_path / "engine.tmp").exists()


@pytest.mark.skipif(TENSORRT_MISSING is None, reason="TensorRT is installed; this checks the command without it")
def test_without_bundle_it_exports_the_quickstart_or_the_embedded_student_and_says_which(tmp_path, monkeypatch,
                                                                                         capsys):
    """`python -m export.trt --nfe 4`, exactly as users type it: no --bundle takes runs/quickstart/student where
    `make quickstart` made one, else the embedded digits student (its engine under runs/, not in the package)."""
    from distill.digits import STUDENT_DIR

    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(export_trt.main, ["--nfe", "1"], capsys)
    assert code == 2 and "error: TensorRT is not installed" in err, err
    assert f"no --bundle: exporting the embedded digits student ({STUDENT_DIR}" in out
    assert (tmp_path / "runs" / "embedded" / "engine" / ENGINE_MANIFEST).exists()

    quickstart = tmp_path / "runs" / "quickstart" / "student"
    shutil.copytree(STUDENT_DIR, quickstart)  # a 1-NFE student standing in for the quickstart's
    code, out, err = run_main(export_trt.main, ["--nfe", "4"], capsys)
    assert "no --bundle: exporting the quickstart student (runs/quickstart/student" in out
    assert code == 2 and "--nfe 4: the sfd-1 student runs/quickstart/student serves NFE 1" in err, err
    assert "--preset digits-4step" in err and not (tmp_path / "runs" / "quickstart" / "engine").exists()


def tensorrt_with_gpu():
    pytest.importorskip("tensorrt", reason=NO_TENSORRT_HERE)
    if TENSORRT_MISSING is not None:
        pytest.skip(TENSORRT_MISSING)
    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but no CUDA GPU is visible to PyTorch")


def test_tensorrt_plans_match_pytorch_and_reuse_the_timing_cache(bundle, tmp_path):
    tensorrt_with_gpu()
    cache = tmp_path / "cache" / "timing.cache"
    out = export_trt.export_trt(bundle, tmp_path / "engine", nfe=2, precisions=("fp32", "fp16"), batch=(1, 2, 4),
                                timing_cache=cache)
    manifest = json.loads((out / ENGINE_MANIFEST).read_text())
    assert manifest["tensorrt"]["built"] is True and manifest["tensorrt"]["plans"] == ["trt_fp32", "trt_fp16"]
    for precision, bound in [("fp32", 1e-4), ("fp16", 1e-2)]:
        entry = manifest["files"][f"trt_{precision}"]
        assert (out / entry["path"]).is_file() and entry["onnx"] == f"student_{precision}.onnx"
        assert entry["batch_profile"] == [1, 2, 4] and entry["version_compatible"] is False
        assert entry["max_abs_err"] <= bound and entry["calls_checked"] == 2, entry
    assert not list(out.glob("*.tmp"))

    # The timing cache: created by the fp32 build, read by the fp16 one, and read again by a later export.
    assert manifest["files"]["trt_fp32"]["timing_cache_bytes_loaded"] == 0
    assert manifest["files"]["trt_fp16"]["timing_cache_bytes_loaded"] > 0
    size = cache.stat().st_size
    assert size > 0
    again = export_trt.export_trt(bundle, tmp_path / "engine2", nfe=2, precisions=("fp32",), batch=(1, 2, 4),
                                  timing_cache=cache)
    entry = json.loads((again / ENGINE_MANIFEST).read_text())["files"]["trt_fp32"]
    assert entry["timing_cache_bytes_loaded"] >= size and cache.stat().st_size >= size

    # Both ends of the batch profile, against the PyTorch graph.
    student = load_bundle(bundle)
    model = GraphStudent(student).eval()
    for batch in (1, 4):
        feeds = loop_inputs(student, 2, batch, seed=batch)
        got = export_trt.run_plan(out / "student_fp32.plan", feeds)
        for out_batch, feed in zip(got, feeds):
            with torch.no_grad():
                want = model(*(torch.from_numpy(feed[n]) for n in model.input_names)).numpy()
            assert out_batch.shape == want.shape and np.abs(out_batch - want).max() <= 1e-4


def test_tensorrt_version_compatible_plan(bundle, tmp_path):
    tensorrt_with_gpu()
    out = export_trt.export_trt(bundle, tmp_path / "engine", nfe=1, precisions=("fp32",), batch=(1, 1, 2),
                                version_compatible=True)
    entry = json.loads((out / ENGINE_MANIFEST).read_text())["files"]["trt_fp32"]
    assert entry["version_compatible"] is True and entry["max_abs_err"] <= 1e-4
    assert entry["check_batch"] == 2  # export.onnx's batch of 4 clamped into the profile
