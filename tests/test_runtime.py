"""The torch-free runtime: the loop over an engine folder against the PyTorch student, its documented noise,
determinism across batching, backends and threads, the CLI, and bad input that leaves the pipeline serving."""

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the [onnx] extra (onnx, onnxruntime) is not installed")

from distill.bundle import load_bundle  # noqa: E402
from distill.data import to_uint8  # noqa: E402
from distill.dmd2 import DMD2Config, train_dmd2  # noqa: E402
from distill.sfd import SFDConfig, train_sfd  # noqa: E402
from distill.teachers import load_teacher  # noqa: E402
from export.onnx import ENGINE_MANIFEST, export_onnx  # noqa: E402
from runtime import Pipeline, UserError  # noqa: E402
from runtime import generate as generate_cli  # noqa: E402
from runtime.noise import gaussian, request_noise, splitmix64  # noqa: E402

from .conftest import make_tiny_pixel_dir  # noqa: E402
from .test_dmd2 import run_main  # noqa: E402


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    teacher_dir = make_tiny_pixel_dir(root / "teacher", num_classes=3)
    dmd2 = train_dmd2(DMD2Config(steps=1, batch_size=2, student_timesteps=(999, 499), use_gan=False, warmup=0,
                                 lr_generator=1e-3, lr_fake=1e-3), load_teacher(teacher_dir), None, root / "dmd2",
                      progress=False)
    sfdv = train_sfd(SFDConfig(nfes=(2, 3), steps=2, batch_size=2, lr=1e-3), load_teacher(teacher_dir), root / "sfdv",
                     progress=False)
    return {"dmd2": (dmd2, export_onnx(dmd2, root / "dmd2_engine", nfe=2, quality_samples=False)),
            "sfd-v": (sfdv, export_onnx(sfdv, root / "sfdv_engine", nfe=3, quality_samples=False))}


def test_import_runtime_loads_no_torch():
    code = "import sys, runtime, runtime.generate; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_for_one_sigma_is_the_per_sample_formula_bit_for_bit(prediction_type):
    from runtime.convention import x0_from_output

    rng = np.random.default_rng(0)
    for s in (153.9, 3.7, 0.01):
        x = rng.standard_normal((4, 1, 16, 16)) * s
        out = rng.standard_normal((4, 1, 16, 16)).astype(np.float32)
        sigma = np.full(4, s, np.float32)
        per_sample = x0_from_output(out, x, sigma, prediction_type)
        one = x0_from_output(out, x, sigma[0], prediction_type)
        assert one.dtype == np.float64 and np.array_equal(one, per_sample)


def test_noise_is_the_documented_generator():
    # splitmix64 reference values (Vigna's splitmix64.c seeded with 0: the first outputs)
    state = np.uint64(0)
    first = [int(splitmix64(state + np.uint64(k * 0x9E3779B97F4A7C15 % 2**64))) for k in range(2)]
    assert first == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    # Box-Muller by hand for element 0 and 1 of (seed 7, image 2, draw 1)
    key = int(splitmix64(splitmix64(np.uint64(7)) ^ np.uint64(2 * 256 + 1)))
    u = [((int(splitmix64(np.uint64((key + i) % 2**64))) >> 11) + 0.5) / 2**53 for i in range(2)]
    r = np.sqrt(-2 * np.log(u[0]))
    z = gaussian(7, 2, 1, (3,))
    np.testing.assert_allclose(z[:2], [r * np.cos(2 * np.pi * u[1]), r * np.sin(2 * np.pi * u[1])], rtol=1e-6)
    big = request_noise(0, 0, 64, 2, (1, 16, 16))
    assert abs(big.mean()) < 0.02 and abs(big.std() - 1) < 0.02
    assert not np.allclose(big[:, 0], big[:, 1]) and not np.allclose(big[0], big[1])  # draws and images differ
    np.testing.assert_array_equal(request_noise(0, 5, 3, 2, (1, 16, 16)), big[5:8])  # per image, not per request


def test_native_arithmetic_matches_numpy(engines, monkeypatch):
    """runtime._native (C) against the numpy formulas it replaces: noise, x0 and uint8, and whole requests."""
    import os
    import shutil
    import sysconfig

    from runtime import convention, native, pipeline
    if native.lib is None:
        if os.environ.get("FEWSTEP_NATIVE") == "0":
            pytest.skip("FEWSTEP_NATIVE=0: the runtime uses numpy")
        # pip -e builds it wherever a C compiler and Python's headers are present (setup.py), as on the CI machine,
        # so there it must not skip
        can_build = (shutil.which("cc") or shutil.which("gcc")) and \
            Path(sysconfig.get_paths()["include"], "Python.h").exists()
        assert not can_build, "runtime._native was not built although a C compiler and Python's headers are " \
                              "present: pip install -e . builds it"
        pytest.skip("runtime._native is not built (no C compiler or Python headers): the runtime uses numpy")
    lib, rng = native.lib, np.random.default_rng(3)

    def both(f, *args):
        fast = f(*args)
        monkeypatch.setattr(native, "lib", None)
        slow = f(*args)
        monkeypatch.setattr(native, "lib", lib)
        return fast, slow

    for seed, start, count, draws, shape in [(0, 0, 1, 1, (1, 16, 16)), (2**63 - 1, 5, 7, 4, (3, 5, 7)),
                                             (2**64 + 9, 2**40, 2, 3, (1,))]:  # odd element counts: Box-Muller tail
        fast, slow = both(request_noise, seed, start, count, draws, shape)
        assert fast.dtype == slow.dtype == np.float32 and fast.shape == slow.shape
        np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-6)  # the engine spec's bound: another libm
    for prediction_type in ["epsilon", "v_prediction", "sample"]:
        for s in [0.002, 1.0, 153.9]:
            out, x = rng.standard_normal((3, 2, 4, 4)).astype(np.float32), rng.standard_normal((3, 2, 4, 4)) * s
            fast, slow = both(convention.x0_from_output, out, x, np.float32(s), prediction_type)
            assert fast.dtype == np.float64 and np.array_equal(fast, slow)  # the same operations: bit for bit
    x = rng.standard_normal((4, 3, 5, 6)) * 1.3
    x[0, 0, 0, :5] = [-1, 1, 0.5 / 127.5 - 1, 1.5 / 127.5 - 1, 2.5 / 127.5 - 1]  # clip edges and half-way ties
    fast, slow = both(pipeline.to_uint8, x)
    assert fast.shape == (4, 5, 6, 3) and np.array_equal(fast, slow)
    with pytest.raises(ValueError, match="type 'd'"):  # the C side checks item types, not only sizes
        lib.to_uint8(x.astype(np.int64), *x.shape, np.empty((4, 5, 6, 3), np.uint8))
    with pytest.raises(ValueError, match="fit memory"):
        lib.noise(0, 0, 2**62, 256, 2**20, np.empty(1, np.float32))
    pipe = Pipeline.load(engines["dmd2"][1], backend="onnxruntime-cpu")
    fast, slow = both(lambda: pipe.generate([0, 2, 1], seed=5, nfe=2).images)
    assert np.abs(fast.astype(int) - slow).max() <= 1


@pytest.mark.parametrize("kind,nfe", [("dmd2", 2), ("dmd2", 1), ("sfd-v", 3), ("sfd-v", 2)])
def test_pipeline_runs_the_students_loop(engines, kind, nfe):
    bundle_dir, engine = engines[kind]
    pipe = Pipeline.load(engine, backend="onnxruntime-cpu")
    labels = np.array([0, 2, 1, 1, 0])
    noise = np.random.default_rng(nfe).standard_normal((5, pipe.draws(nfe), 1, 8, 8)).astype(np.float32)
    out = pipe.generate(labels, nfe=nfe, noise=noise)
    bundle = load_bundle(bundle_dir)
    fresh = torch.from_numpy(noise[:, 1:]).transpose(0, 1) if kind == "dmd2" else None
    want = to_uint8(bundle.generate(torch.from_numpy(noise[:, 0]), bundle.cond(torch.from_numpy(labels)), nfe,
                                    fresh_noise=fresh)).numpy()
    assert out.images.shape == (5, 8, 8, 1) and out.images.dtype == np.uint8
    assert np.abs(out.images.astype(int) - want).max() <= 1  # a rounding boundary at most
    t = out.timings
    assert len(t["step_ms"]) == nfe and t["backend_ms"] <= t["total_ms"] and t["images"] == 5


def test_same_seed_same_images_whatever_the_batching_and_threads(engines):
    pipe = Pipeline.load(engines["dmd2"][1], backend="onnxruntime-cpu")
    labels = np.arange(7) % 3
    ref = pipe.generate(labels, seed=11).images
    assert np.array_equal(ref, pipe.generate(labels, seed=11, batch_size=2).images)
    assert not np.array_equal(ref, pipe.generate(labels, seed=12).images)
    assert np.array_equal(ref[3:4], pipe.generate(labels, seed=11, batch_size=1).images[3:4])
    results, errors = {}, []

    def work(k):
        try:
            for _ in range(5):
                results.setdefault(k, []).append(pipe.generate(labels, seed=11 + k % 2).images)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    other = pipe.generate(labels, seed=12).images
    for k, images in results.items():
        assert all(np.array_equal(im, ref if k % 2 == 0 else other) for im in images)


def test_backends_agree(engines):
    engine = engines["sfd-v"][1]
    onnx = Pipeline.load(engine, backend="onnxruntime-cpu").generate([0, 1, 2], seed=3).images
    from verify.reference import reference_pipeline

    torch_ref = reference_pipeline(engine)  # the PyTorch student behind the runtime's loop
    assert torch_ref.backend.name == ("pytorch-cuda" if torch.cuda.is_available() else "pytorch-cpu")
    assert np.abs(torch_ref.generate([0, 1, 2], seed=3).images.astype(int) - onnx).max() <= 1
    auto = Pipeline.load(engine)  # no GPU and no TensorRT here: auto means ONNX Runtime on the CPU
    assert "onnxruntime" in auto.describe()


def test_bad_input_is_a_clear_error_and_the_pipeline_keeps_serving(engines, tmp_path):
    engine = engines["dmd2"][1]
    pipe = Pipeline.load(engine, backend="onnxruntime-cpu")
    ref = pipe.generate([1, 2], seed=0).images
    bad = {
        "prompt": (lambda: pipe.generate(["a red car"]), "not prompts"),
        "label": (lambda: pipe.generate([0, 3]), "must lie in 0..2"),
        "nan": (lambda: pipe.generate([0], noise=np.full((1, 2, 1, 8, 8), np.nan, np.float32)), "NaN"),
        "shape": (lambda: pipe.generate([0], noise=np.zeros((1, 1, 1, 8, 8), np.float32)), "shape"),
        "nfe": (lambda: pipe.generate([0], nfe=4), "serves NFE 1, 2"),
        "seed": (lambda: pipe.generate([0], seed=-1), "seed must be"),
    }
    for call, expected in bad.values():
        with pytest.raises(UserError, match=expected):
            call()
    assert np.array_equal(pipe.generate([1, 2], seed=0).images, ref)

    newer = tmp_path / "newer"
    newer.mkdir()
    manifest = json.loads((engine / ENGINE_MANIFEST).read_text())
    (newer / ENGINE_MANIFEST).write_text(json.dumps(manifest | {"format_version": 99}))
    with pytest.raises(UserError, match="newer fewstep"):
        Pipeline.load(newer)
    limited = tmp_path / "limited"
    limited.mkdir()
    for f in engine.iterdir():
        (limited / f.name).write_bytes(f.read_bytes())
    (limited / ENGINE_MANIFEST).write_text(json.dumps(manifest | {"max_batch": 2}))
    with pytest.raises(UserError, match="batch_size must lie in 1..2"):
        Pipeline.load(limited).generate([0, 1, 2], batch_size=3)
    with pytest.raises(UserError, match="no fp16 ONNX"):
        Pipeline.load(engine, precision="fp16")


def test_generate_cli_writes_the_sample_layout(engines, tmp_path, capsys):
    out = tmp_path / "s.npz"
    code, stdout, err = run_main(generate_cli.main, ["--engine", str(engines["dmd2"][1]), "--n", "6", "--labels",
                                                     "2,0", "--seed", "4", "--out", str(out)], capsys)
    assert code == 0, err
    data = np.load(out)
    assert data["images"].shape == (6, 8, 8, 1) and data["labels"].tolist() == [2, 0, 2, 0, 2, 0]
    assert Path(tmp_path / "s.png").stat().st_size > 0
    want = Pipeline.load(engines["dmd2"][1]).generate([2, 0, 2, 0, 2, 0], seed=4).images
    assert np.array_equal(data["images"], want)
    code, _, err = run_main(generate_cli.main, ["--engine", str(tmp_path / "none"), "--out", str(out)], capsys)
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
