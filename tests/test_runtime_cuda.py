"""The runtime's GPU backends against the CPU reference (skipped without a GPU): the PyTorch student on CUDA (eager,
CUDA-graph replay, fp16) and ONNX Runtime's CUDA provider (skipped where onnxruntime-gpu is not installed)."""

import threading

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the [onnx] extra (onnx, onnxruntime) is not installed")
pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("exact_fp32_cuda")]  # conftest: TF32 off, true fp32 against the CPU

from runtime import Pipeline  # noqa: E402
from runtime.backends import onnxruntime_providers  # noqa: E402
from verify.reference import reference_pipeline  # noqa: E402

from .test_runtime import engines as engines  # noqa: E402  (the tiny DMD2 / SFD-v engines fixture)

LABELS = [0, 1, 2, 0, 1]


def cpu_images(engine, nfe=None):
    return Pipeline.load(engine, backend="onnxruntime-cpu").generate(LABELS, nfe=nfe, seed=7).images


def levels_apart(a, b):
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.parametrize("kind", ["dmd2", "sfd-v"])
def test_pytorch_on_cuda_eager_and_graph_replay_match_the_cpu(engines, kind):
    engine = engines[kind][1]
    ref = cpu_images(engine)
    for mode in ("eager", "cudagraph"):
        pipe = reference_pipeline(engine, mode)
        assert pipe.backend.name in ("pytorch-cuda", "pytorch-cudagraph")
        assert levels_apart(pipe.generate(LABELS, seed=7).images, ref) <= 1, mode
    half = reference_pipeline(engine, precision="fp16").generate(LABELS, seed=7).images
    assert levels_apart(half, ref) <= 8  # fp16 compute: a few levels at most on these tiny random networks


def test_cuda_graph_replay_per_batch_size_and_across_threads(engines):
    engine = engines["sfd-v"][1]
    pipe = reference_pipeline(engine, "cudagraph")
    one = pipe.generate(LABELS, seed=7, batch_size=1).images
    assert np.array_equal(pipe.generate(LABELS, seed=7, batch_size=5).images, one)  # a second captured shape
    assert len(pipe.backend.graphs) == 2
    results = [None] * 4

    def work(k):
        results[k] = pipe.generate(LABELS, seed=7 + k % 2).images

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert np.array_equal(results[0], one) and np.array_equal(results[2], one)
    assert np.array_equal(results[1], results[3]) and not np.array_equal(results[1], one)


@pytest.mark.skipif("CUDAExecutionProvider" not in onnxruntime_providers(),
                    reason="onnxruntime-gpu (the CUDA execution provider) is not installed")
@pytest.mark.parametrize("kind", ["dmd2", "sfd-v"])
def test_onnxruntime_cuda_matches_the_cpu(engines, kind):
    engine = engines[kind][1]
    pipe = Pipeline.load(engine, backend="onnxruntime-cuda")
    assert pipe.backend.name == "onnxruntime-cuda"
    assert levels_apart(pipe.generate(LABELS, seed=7).images, cpu_images(engine)) <= 1


@pytest.mark.skipif("CUDAExecutionProvider" not in onnxruntime_providers(),
                    reason="onnxruntime-gpu (the CUDA execution provider) is not installed")
def test_onnxruntime_cuda_graph_replays_per_batch_size(engines):
    engine = engines["dmd2"][1]
    pipe = Pipeline.load(engine, backend="onnxruntime-cudagraph")
    ref = cpu_images(engine)
    assert levels_apart(pipe.generate(LABELS, seed=7).images, ref) <= 1  # captured at batch 5
    assert levels_apart(pipe.generate(LABELS, seed=7).images, ref) <= 1  # replayed with new inputs
    assert levels_apart(pipe.generate(LABELS, seed=7, batch_size=2).images, ref) <= 1  # batches of 2 and 1
    assert sorted(pipe.backend.graphs) == [1, 2, 5]
    assert not np.array_equal(pipe.generate(LABELS, seed=8).images, ref)  # the replay reads the new noise
