"""Serving on Triton Inference Server: `python -m runtime.serve` answers HTTP and gRPC with the runtime's images
for the same seeds, a wrong request gets its own error and the server keeps serving, dynamic batching stacks
concurrent requests; the repositories `python -m runtime.triton` writes parse as Triton model configs, match the
ONNX files, and their Python-backend model serves in the same tritonserver binary."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the [onnx] extra (onnx, onnxruntime) is not installed")
pytest.importorskip("pytriton", reason="NVIDIA PyTriton (the [serve] extra, Linux only) is not installed")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")

from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from export.sampler import write_sampler  # noqa: E402
from runtime import Pipeline  # noqa: E402
from runtime import triton as triton_cli  # noqa: E402
from runtime.serve import triton_server  # noqa: E402

from .test_dmd2 import run_main  # noqa: E402
from .test_golden import export_tiny_engines  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def wait_ready(url: str, process: subprocess.Popen | None = None, log=None, timeout: float = 60) -> None:
    client = httpclient.InferenceServerClient(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            log.seek(0)
            raise AssertionError(f"the server exited ({process.returncode}): {log.read()[-3000:]}")
        try:
            if client.is_server_ready() and client.is_model_ready("fewstep"):
                return
        except Exception:  # not listening yet
            pass
        time.sleep(0.5)
    if log is not None:
        log.seek(0)
    raise AssertionError(f"no server at {url} after {timeout} s" + (f": {log.read()[-3000:]}" if log else ""))


def infer(client, module, labels, seeds, label_dtype="INT64"):
    """images (N, H, W, C) for rows (label, seed) through `client` (tritonclient.http or .grpc)."""
    n = len(seeds)
    inputs = []
    if labels is not None:
        lab = module.InferInput("class_labels", [n, 1], label_dtype)
        lab.set_data_from_numpy(np.asarray(labels).reshape(n, 1).astype(np.float32 if label_dtype == "FP32"
                                                                         else np.int64))
        inputs.append(lab)
    seed = module.InferInput("seed", [n, 1], "INT64")
    seed.set_data_from_numpy(np.asarray(seeds, np.int64).reshape(n, 1))
    inputs.append(seed)
    return client.infer("fewstep", inputs).as_numpy("images")


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    return export_tiny_engines(tmp_path_factory.mktemp("serve"), unconditional=True)


@contextlib.contextmanager
def serving(engine: Path, *flags: str):
    """python -m runtime.serve on `engine`, on free loopback ports: (http url, grpc url, metrics url)."""
    http, grpc, metrics = free_ports(3)
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: nobody reads tritonserver's log while it serves
    process = subprocess.Popen(
        [sys.executable, "-m", "runtime.serve", "--engine", str(engine), "--backend", "onnxruntime-cpu",
         "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), *flags],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    try:
        wait_ready(f"127.0.0.1:{http}", process, log)
        yield f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", f"http://127.0.0.1:{metrics}/metrics"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def server(engines):
    """runtime.serve on the tiny DMD2 engine, batches up to 16, the batcher waiting up to 20 ms."""
    with serving(engines["dmd2"], "--max-batch", "16", "--queue-delay-us", "20000") as urls:
        yield urls


def test_http_and_grpc_answer_the_runtimes_images(engines, server):
    http, grpc, _ = server
    pipe = Pipeline.load(engines["dmd2"], "onnxruntime-cpu")
    want = pipe.generate([2, 0, 1], seed=7).images
    assert want.std() > 10
    got = infer(httpclient.InferenceServerClient(http), httpclient, [2, 0, 1], [7, 7, 7])
    np.testing.assert_array_equal(got, want)
    got = infer(grpcclient.InferenceServerClient(grpc), grpcclient, [2, 0, 1], [7, 7, 7])
    np.testing.assert_array_equal(got, want)
    # a seed per row: row j is image j of its own seed's request
    got = infer(grpcclient.InferenceServerClient(grpc), grpcclient, [1, 1], [5, 9])
    np.testing.assert_array_equal(got[0], pipe.generate([1], seed=5).images[0])
    np.testing.assert_array_equal(got[1], pipe.generate([1, 1], seed=9).images[1])


def test_bad_requests_get_triton_errors_and_the_server_keeps_serving(engines, server):
    http, grpc, _ = server
    client = httpclient.InferenceServerClient(http)
    cases = [(dict(labels=[0, 7], seeds=[1, 1]), "class labels must lie in 0..2"),
             (dict(labels=[0], seeds=[-3]), "seed must lie in 0.."),
             (dict(labels=[0, 1], seeds=[1, 1], label_dtype="FP32"), "FP32"),
             (dict(labels=[0] * 17, seeds=[1] * 17), "batch")]
    want = Pipeline.load(engines["dmd2"], "onnxruntime-cpu").generate([1], seed=3).images
    for case, message in cases:
        with pytest.raises(InferenceServerException, match=message) as raised:
            infer(client, httpclient, **case)
        assert "Traceback" not in str(raised.value)
        np.testing.assert_array_equal(infer(client, httpclient, [1], [3]), want)  # still serving
    with pytest.raises(InferenceServerException, match="class labels must lie"):
        infer(grpcclient.InferenceServerClient(grpc), grpcclient, [3], [0])


def test_concurrent_requests_are_batched_and_each_gets_its_own_images(engines, server):
    http, _, metrics = server
    pipe = Pipeline.load(engines["dmd2"], "onnxruntime-cpu")
    before = metric(metrics, "nv_inference_exec_count"), metric(metrics, "nv_inference_count")

    def one(k: int) -> np.ndarray:
        return infer(httpclient.InferenceServerClient(http), httpclient, [k % 3, (k + 1) % 3], [k, k])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(16)))
    for k, images in enumerate(results):
        np.testing.assert_array_equal(images, pipe.generate([k % 3, (k + 1) % 3], seed=k).images)
    executions = metric(metrics, "nv_inference_exec_count") - before[0]
    images = metric(metrics, "nv_inference_count") - before[1]
    assert images == 32
    assert executions < 16  # the batcher put several requests into one execution


def metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and 'model="fewstep"' in line)


def test_health_and_metrics_endpoints(server):
    http, _, metrics = server
    client = httpclient.InferenceServerClient(http)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("fewstep")
    config = client.get_model_config("fewstep")
    assert config["max_batch_size"] == 16 and config["dynamic_batching"]["max_queue_delay_microseconds"] == 20000
    assert "nv_inference_request_success" in urllib.request.urlopen(metrics, timeout=10).read().decode()


def parsed(config: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())


def test_repository_configs_parse_and_match_the_onnx_files(engines, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    engine = engines["dmd2"]
    code, out, _ = run_main(triton_cli.main, ["--engine", str(engine), "--out", str(tmp_path / "bare")], capsys)
    assert code == 0 and "no sampler graph" in out and sorted(os.listdir(tmp_path / "bare")) == ["fewstep"]
    write_sampler(engine, 2)
    models = triton_cli.write_repository(engine, tmp_path / "repo", max_batch=32, queue_delay_us=500)
    assert [m.name for m in models] == ["fewstep", "fewstep_sampler_nfe2_onnx", "fewstep_sampler_nfe2_trt"]
    python = parsed(models[0] / "config.pbtxt")
    assert python.backend == "python" and python.max_batch_size == 32
    assert python.dynamic_batching.max_queue_delay_microseconds == 500
    assert [i.name for i in python.input] == ["class_labels", "seed"]
    assert list(python.output[0].dims) == [8, 8, 1] and python.parameters["engine"].string_value == "engine"
    assert (models[0] / "1" / "engine" / "fewstep_engine.json").is_file()
    graph = onnx.load(str(models[1] / "1" / "model.onnx")).graph
    for model, platform in zip(models[1:], ["onnxruntime_onnx", "tensorrt_plan"]):
        config = parsed(model / "config.pbtxt")
        assert config.platform == platform and config.max_batch_size == 32
        assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        for entries, tensors in ((config.input, graph.input), (config.output, graph.output)):
            assert [e.name for e in entries] == [t.name for t in tensors]
            for e, t in zip(entries, tensors):
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.type.tensor_type.shape.dim]
                assert dims[0] == -1  # the batch axis, which Triton leaves out of dims
                assert (list(e.reshape.shape) if e.HasField("reshape") else list(e.dims)) == dims[1:]
                want = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.FLOAT: "TYPE_FP32",
                        onnx.TensorProto.UINT8: "TYPE_UINT8"}[t.type.tensor_type.elem_type]
                assert model_config_pb2.DataType.Name(e.data_type) == want
    assert "trtexec --onnx=sampler_nfe2_fp32.onnx" in (models[2] / "README.txt").read_text()


def test_the_generated_python_model_serves_in_tritonserver(engines, tmp_path):
    """The repository as written (engine copied in) in PyTriton's tritonserver; the sampler models need Triton's
    onnxruntime / tensorrt backends, which this tritonserver does not ship, so only `fewstep` loads here."""
    engine = engines["uncond"]
    write_sampler(engine, 1)
    repo = tmp_path / "repo"
    triton_cli.write_repository(engine, repo, backend="onnxruntime-cpu", max_batch=8)
    http, grpc, metrics = free_ports(3)
    triton = triton_server(repo, "127.0.0.1", http, grpc, metrics, strict=False)  # the sampler models fail here
    with triton:
        triton.run()
        wait_ready(f"127.0.0.1:{http}")
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
        got = infer(client, httpclient, None, [4, 4, 4])
        np.testing.assert_array_equal(got, Pipeline.load(engine, "onnxruntime-cpu").generate(n=3, seed=4).images)
        assert not client.is_model_ready("fewstep_sampler_nfe1_onnx")


def test_text_to_image_engines_serve_prompts(tmp_path):
    """A tiny SD 1.5-layout engine: prompts as BYTES rows, the runtime's images for the same seeds."""
    from export.onnx import export_onnx

    from .test_export_latent import train_student

    engine = export_onnx(train_student(tmp_path, "sd15"), tmp_path / "engine")
    prompts = ["a photo of a cat", "blue noise"]
    want = Pipeline.load(engine, "onnxruntime-cpu").generate(prompts, seed=4).images
    with serving(engine) as (http, _, _):
        client = httpclient.InferenceServerClient(http)
        text = httpclient.InferInput("prompt", [2, 1], "BYTES")
        text.set_data_from_numpy(np.array([[p.encode()] for p in prompts], dtype=object))
        seed = httpclient.InferInput("seed", [2, 1], "INT64")
        seed.set_data_from_numpy(np.full((2, 1), 4, np.int64))
        np.testing.assert_array_equal(client.infer("fewstep", [text, seed]).as_numpy("images"), want)
        with pytest.raises(InferenceServerException, match="class_labels"):  # not an input of a text model
            infer(client, httpclient, [1], [4])


def test_bad_command_lines_are_one_line_errors(engines, tmp_path, capsys):
    from runtime import serve as serve_cli

    for main, argv, message in [
            (serve_cli.main, ["--engine", str(tmp_path / "missing")], "does not exist"),
            (serve_cli.main, ["--engine", str(engines["dmd2"]), "--nfe", "7"], "this engine serves NFE 1, 2"),
            (triton_cli.main, ["--engine", str(engines["dmd2"]), "--out", str(tmp_path / "r"), "--max-batch", "0"],
             "--max-batch must be at least 1")]:
        code, _, err = run_main(main, argv, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()
