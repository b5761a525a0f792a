"""The whole sampler as one ONNX graph (export/sampler.py): the same images as the runtime's step loop for the same
noise, one copy of the weights for K calls, servable by ONNX Runtime and OpenVINO alike."""

import json

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime", reason="the [onnx] extra (onnx, onnxruntime) is not installed")
onnx = pytest.importorskip("onnx")

from export import sampler as sampler_cli  # noqa: E402
from export.onnx import ENGINE_MANIFEST  # noqa: E402
from export.sampler import write_sampler  # noqa: E402
from fewstep.errors import UserError  # noqa: E402
from runtime import Pipeline  # noqa: E402
from runtime.noise import request_noise  # noqa: E402

from .test_dmd2 import run_main  # noqa: E402
from .test_golden import export_tiny_engines  # noqa: E402


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    return export_tiny_engines(tmp_path_factory.mktemp("sampler"), unconditional=True)


def sampler_feed(pipe: Pipeline, labels, n: int, seed: int, nfe: int) -> dict:
    feed = {"noise": request_noise(seed, 0, n, pipe.draws(nfe), pipe.x_shape)}
    if labels is not None:
        feed["class_labels"] = np.array(labels, np.int64)
    return feed


def level_differences(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    """(largest difference in uint8 levels, fraction of values that differ)."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(diff.max()), float((diff > 0).mean())


@pytest.mark.parametrize("kind,nfe", [("dmd2", 2), ("dmd2", 1), ("sfd-v", 3), ("sfd-v", 2), ("uncond", 1)])
def test_sampler_graph_gives_the_runtime_loops_images(engines, kind, nfe):
    engine = engines[kind]
    path = write_sampler(engine, nfe)
    manifest = json.loads((engine / ENGINE_MANIFEST).read_text())
    entry = manifest["samplers"][str(nfe)]["fp32"]
    assert entry["path"] == path.name and entry["network_calls"] == nfe
    pipe = Pipeline.load(engine, "onnxruntime-cpu")
    labels = None if kind == "uncond" else [2, 0, 1, 1, 2, 0, 1, 2]
    feed = sampler_feed(pipe, labels, 8, seed=321, nfe=nfe)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [i["name"] for i in entry["inputs"]]
    images = session.run(["images"], feed)[0]
    want = pipe.generate(labels, n=None if labels else 8, noise=feed["noise"], nfe=nfe).images
    assert images.dtype == np.uint8 and images.shape == want.shape
    assert want.std() > 10  # not a blank batch, where any loop would agree
    # float32 arithmetic between calls vs the runtime's float64: at most one level, on rounding boundaries
    worst, share = level_differences(images, want)
    assert worst <= 1 and share < 0.01, (worst, share)
    # a different noise gives different images: the graph reads its noise input
    other = session.run(["images"], feed | {"noise": feed["noise"][::-1].copy()})[0]
    assert level_differences(other, images)[1] > 0.5


def test_the_calls_share_one_copy_of_the_weights(engines):
    engine = engines["sfd-v"]
    path = write_sampler(engine, 3)
    manifest = json.loads((engine / ENGINE_MANIFEST).read_text())
    network = onnx.load(str(engine / manifest["files"]["fp32"]["path"]))
    sampler = onnx.load(str(path))
    weights = sum(t.ByteSize() for t in network.graph.initializer)
    assert weights > 100_000
    constants = sum(n.ByteSize() for n in network.graph.node if n.op_type == "Constant")
    shared = sum(t.ByteSize() for t in sampler.graph.initializer)
    assert weights <= shared < weights + constants + 10_000  # the network's weights once, plus a few per-step scalars
    calls = sum(n.name.startswith("call") for n in sampler.graph.node)
    assert calls == 3 * sum(n.op_type != "Constant" for n in network.graph.node)


def test_openvino_serves_the_sampler_graph(engines):
    ov = pytest.importorskip("openvino", reason="openvino (the [cpu] extra) is not installed")
    engine = engines["dmd2"]
    path = write_sampler(engine, 2)
    pipe = Pipeline.load(engine, "onnxruntime-cpu")
    feed = sampler_feed(pipe, [0, 1, 2], 3, seed=5, nfe=2)
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    images = compiled(feed)["images"]
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["images"], feed)[0]
    worst, share = level_differences(images, want)
    assert worst <= 1 and share < 0.01, (worst, share)


def test_bad_requests_are_clear_errors(engines, tmp_path, capsys):
    with pytest.raises(UserError, match="serves NFE 2, 3, not 5"):
        write_sampler(engines["sfd-v"], 5)
    with pytest.raises(UserError, match="no int8 network file"):
        write_sampler(engines["dmd2"], 2, "int8")
    code, _, err = run_main(sampler_cli.main, ["--engine", str(tmp_path)], capsys)
    assert code == 2 and "not an engine folder" in err and len(err.strip().splitlines()) == 1
    code, out, _ = run_main(sampler_cli.main, ["--engine", str(engines["dmd2"]), "--nfe", "1,2"], capsys)
    assert code == 0 and "sampler_nfe1_fp32.onnx" in out and "sampler_nfe2_fp32.onnx" in out


def test_export_onnx_writes_the_sampler_graph_on_request(engines, tmp_path, capsys):
    from export import onnx as export_cli

    bundle = json.loads((engines["dmd2"] / ENGINE_MANIFEST).read_text())["student"]["bundle"]
    out = tmp_path / "engine"
    code, stdout, err = run_main(export_cli.main, ["--bundle", bundle, "--out", str(out), "--sampler-graph"], capsys)
    assert code == 0, err
    manifest = json.loads((out / ENGINE_MANIFEST).read_text())
    assert manifest["samplers"]["2"]["fp32"]["path"] == "sampler_nfe2_fp32.onnx"
    assert (out / "sampler_nfe2_fp32.onnx").is_file() and "the whole sampler in one graph" in stdout


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_text_to_image_sampler_graph_takes_prompt_embeddings_and_decodes(tmp_path, layout):
    """A latent engine: the prompt embeddings the runtime's text encoders make, and the noise, in; the K UNet calls,
    then the VAE decoder (its weights under their own names), then uint8, out."""
    from export.onnx import export_onnx

    from .test_export_latent import train_student

    engine = export_onnx(train_student(tmp_path, layout), tmp_path / "engine")
    manifest = json.loads((engine / ENGINE_MANIFEST).read_text())
    nfe = manifest["schedule"]["nfe"]
    path = write_sampler(engine, nfe)
    pipe = Pipeline.load(engine, "onnxruntime-cpu")
    prompts = ["a photo of a cat", "blue noise", ""]
    noise = request_noise(9, 0, len(prompts), pipe.draws(nfe), pipe.x_shape)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    entry = json.loads((engine / ENGINE_MANIFEST).read_text())["samplers"][str(nfe)]["fp32"]
    assert [i.name for i in session.get_inputs()] == [i["name"] for i in entry["inputs"]]
    feed = {k: v for k, v in pipe.text.encode(prompts).items() if k in {i["name"] for i in entry["inputs"]}}
    images = session.run(["images"], feed | {"noise": noise})[0]
    want = pipe.generate(prompts, noise=noise, nfe=nfe).images
    assert images.shape == want.shape and want.std() > 5
    worst, share = level_differences(images, want)
    assert worst <= 1 and share < 0.01, (worst, share)
