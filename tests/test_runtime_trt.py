"""The runtime's TensorRT backend (runtime/tensorrt.py) on a tiny plan built by export.trt: images against ONNX Runtime
on the CPU, CUDA-graph replay against plain calls, a batch above the plan's profile refused while the pipeline keeps
serving, four threads at once, plans from another TensorRT version or damaged, and close().

TensorRT cannot be installed on the development machine, so there this whole file is skipped; nothing here stands in
for TensorRT or CUDA."""

import json
import threading

import numpy as np
import pytest

pytest.importorskip("tensorrt", reason="TensorRT is not installed (it cannot be installed on the development machine: "
                                       "its wheels fetch the libraries from NVIDIA's index)")
try:
    import cuda.bindings.runtime  # noqa: F401 - cuda-python 12.6 and later
except ImportError:
    pytest.importorskip("cuda.cudart", reason="cuda-python is not installed (pip install cuda-python)")
pytest.importorskip("onnxruntime", reason="the [onnx] extra (onnx, onnxruntime) is not installed")
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("TensorRT is installed but no CUDA GPU is visible", allow_module_level=True)

from distill.bundle import load_bundle  # noqa: E402
from distill.dmd2 import DMD2Config, train_dmd2  # noqa: E402
from distill.teachers import load_teacher  # noqa: E402
from export.onnx import loop_inputs  # noqa: E402
from export.trt import export_trt  # noqa: E402
from runtime import Pipeline, UserError  # noqa: E402
from runtime.manifest import read_manifest  # noqa: E402
from runtime.tensorrt import TensorRTBackend  # noqa: E402

from .conftest import make_tiny_pixel_dir  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A 2-step class-conditional DMD2 student and its engine folder with an fp32 plan at batch 1:2:4."""
    root = tmp_path_factory.mktemp("runtime_trt")
    teacher_dir = make_tiny_pixel_dir(root / "teacher", num_classes=3)
    bundle = train_dmd2(DMD2Config(steps=1, batch_size=2, student_timesteps=(999, 499), use_gan=False, warmup=0,
                                   lr_generator=1e-3, lr_fake=1e-3), load_teacher(teacher_dir), None, root / "dmd2",
                        progress=False)
    engine = export_trt(bundle, root / "engine", nfe=2, precisions=("fp32",), batch=(1, 2, 4))
    return load_bundle(bundle), engine


def plan_of(engine):
    manifest = read_manifest(engine)
    return engine / manifest["files"]["trt_fp32"]["path"], manifest


def test_tensorrt_images_match_onnxruntime_cpu(built):
    _, engine = built
    pipe = Pipeline.load(engine, backend="tensorrt")
    assert pipe.backend.name == "tensorrt" and (pipe.backend.min_batch, pipe.max_batch) == (1, 4)
    cpu = Pipeline.load(engine, backend="onnxruntime-cpu")
    labels = np.arange(7) % 3  # chunks of 4 (the profile's max) and 3
    for nfe in (1, 2):
        want = cpu.generate(labels, nfe=nfe, seed=5).images
        got = pipe.generate(labels, nfe=nfe, seed=5)
        assert got.images.shape == want.shape and got.timings["backend"] == "tensorrt"
        assert np.abs(got.images.astype(int) - want).max() <= 1  # a rounding boundary at most
    assert Pipeline.load(engine).backend.name == "tensorrt"  # auto: TensorRT when a plan and TensorRT are here
    pipe.backend.close()


def test_cuda_graph_replay_equals_plain_calls(built):
    student, engine = built
    plan, manifest = plan_of(engine)
    plain = TensorRTBackend(plan, manifest)
    graphs = TensorRTBackend(plan, manifest, contexts=1, cuda_graphs=True)  # one slot: every call goes through it
    assert graphs.name == "tensorrt-cudagraphs"
    # warm-up and capture, replays, buffer growth (graphs dropped), a smaller batch, and back to a captured size
    for batch in (2, 2, 2, 4, 4, 1, 2, 2):
        for feed in loop_inputs(student, 2, batch, seed=batch):
            np.testing.assert_allclose(graphs.run(feed), plain.run(feed), rtol=0, atol=1e-6)
    assert graphs.graph_batches == [1, 2, 4]
    labels = [2, 0, 1]
    want = Pipeline(manifest, engine, plain, "fp32").generate(labels, seed=9).images
    replayed = Pipeline(manifest, engine, graphs, "fp32")
    for _ in range(3):
        assert np.array_equal(replayed.generate(labels, seed=9).images, want)
    graphs.clear_graphs()
    assert graphs.graph_batches == []
    assert np.array_equal(replayed.generate(labels, seed=9).images, want)
    plain.close()
    graphs.close()


def test_batch_above_the_profile_is_a_user_error_and_the_pipeline_keeps_serving(built):
    student, engine = built
    pipe = Pipeline.load(engine, backend="tensorrt")
    ref = pipe.generate([0, 1, 2], seed=1).images
    with pytest.raises(UserError, match=r"batch_size must lie in 1\.\.4"):
        pipe.generate([0] * 5, seed=1, batch_size=5)
    feed = loop_inputs(student, 2, 5)[0]
    with pytest.raises(UserError, match=r"batch 5 is outside this TensorRT plan's batch profile 1\.\.4"):
        pipe.backend.run(feed)
    with pytest.raises(UserError, match="needs input"):
        pipe.backend.run({k: v for k, v in feed.items() if k != "sigma"})
    assert np.array_equal(pipe.generate([0, 1, 2], seed=1).images, ref)
    # more images than the profile's max run in chunks of at most 4; another chunking gives the same images (up to
    # a rounding boundary: TensorRT's kernels may round differently at another batch size)
    many = pipe.generate([0, 1, 2, 0, 1, 2, 0], seed=1).images
    assert np.abs(many.astype(int) - pipe.generate([0, 1, 2, 0, 1, 2, 0], seed=1, batch_size=2).images).max() <= 1
    assert np.abs(many[:3].astype(int) - ref).max() <= 1
    pipe.backend.close()


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_four_threads_get_the_same_images(built, cuda_graphs):
    _, engine = built
    plan, manifest = plan_of(engine)
    pipe = Pipeline(manifest, engine, TensorRTBackend(plan, manifest, cuda_graphs=cuda_graphs), "fp32")  # 2 slots
    labels = np.arange(6) % 3
    ref = {seed: pipe.generate(labels, seed=seed).images for seed in (11, 12)}
    start, results, errors = threading.Barrier(4), [], []

    def work(k):
        try:
            start.wait()
            for _ in range(5):
                seed = 11 + k % 2
                results.append((seed, pipe.generate(labels, seed=seed, batch_size=1 + k).images))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 20
    # each thread its own batch size (1..4), so up to a rounding boundary; a slot shared by mistake would be far off
    assert all(np.abs(images.astype(int) - ref[seed]).max() <= 1 for seed, images in results)
    pipe.backend.close()


def test_plan_from_another_tensorrt_version_or_damaged(built, tmp_path):
    _, engine = built
    plan, manifest = plan_of(engine)
    older = json.loads(json.dumps(manifest))
    older["files"]["trt_fp32"]["tensorrt_version"] = "8.6.1"
    with pytest.raises(UserError, match=r"built by TensorRT 8\.6\.1.*rebuild with python -m export\.trt"):
        TensorRTBackend(plan, older)
    damaged = tmp_path / plan.name
    damaged.write_bytes(b"not a TensorRT plan" * 64)
    with pytest.raises(UserError, match="cannot load"):
        TensorRTBackend(damaged, manifest)
    with pytest.raises(UserError, match="no TensorRT plan"):
        TensorRTBackend(tmp_path / "missing.plan", manifest)


def test_close_frees_and_later_calls_fail(built):
    student, engine = built
    plan, manifest = plan_of(engine)
    backend = TensorRTBackend(plan, manifest)
    feed = loop_inputs(student, 2, 3)[0]
    first = backend.run(feed)
    assert first.dtype == np.float32 and first.shape == feed["x"].shape
    backend.close()
    backend.close()  # twice is fine
    with pytest.raises(UserError, match="closed"):
        backend.run(feed)
