"""ONNX export of latent text-to-image students (SD 1.5 and SDXL layouts): the UNet, the text encoder(s) and the
VAE decoder each pass parity, the batch axis is dynamic, and a whole sample run through ONNX Runtime from the engine
folder alone (tokenizers, text encoders, UNet loop, VAE) matches the PyTorch student. Tiny random models only."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the [onnx] extra (onnx, onnxruntime) is not installed")

from distill.bundle import MANIFEST_NAME, load_bundle  # noqa: E402
from distill.data import to_uint8  # noqa: E402
from distill.dmd2 import train_dmd2  # noqa: E402
from distill.run import PRESETS  # noqa: E402
from distill.teachers.latent import load_latent_teacher  # noqa: E402
from export import graph as export_graph  # noqa: E402
from export import onnx as export_onnx  # noqa: E402
from export.latent import VAE_TOLERANCE  # noqa: E402
from runtime.convention import x0_from_output  # noqa: E402

from .test_dmd2 import run_main  # noqa: E402
from .tiny_sd import IMAGE_SIZE, make_tiny_sd_dir  # noqa: E402

LAYOUTS = ["sd15", "sdxl"]
PROMPTS = ["a photo of a cat", "", "blue noise"]
# Whole samples, images in [-1, 1] (measured: ~7e-7 for both layouts): the UNet's rounding is scaled by sigma (up to
# 14.6 here) in x0 = x - sigma * eps and then goes through the VAE; 1e-4 is 1/80 of one uint8 level.
IMAGE_TOLERANCE = 1e-4


def bound(key: str, entry: dict) -> float:
    """The fp32 parity bound of each file: the UNet's 1e-4, relative to the output's scale for the text encoders
    (their hidden states are not unit-scale), VAE_TOLERANCE on the decoder's images."""
    if key.startswith("vae_decoder"):
        return VAE_TOLERANCE
    return 1e-4 * (max(1.0, entry["ref_max_abs"]) if key.startswith("text_encoder") else 1.0)


def train_student(root: Path, layout: str) -> Path:
    """One DMD2 step of the layout's preset on a tiny random teacher (SDXL: LoRA rank 64, 4 steps)."""
    teacher_dir = make_tiny_sd_dir(root / "teacher", xl=layout == "sdxl")
    cfg = dataclasses.replace(PRESETS[layout].config, steps=1, batch_size=2, use_gan=False, warmup=0,
                              lr_generator=1e-3, lr_fake=1e-3)
    images = torch.rand((3, 3, IMAGE_SIZE, IMAGE_SIZE), generator=torch.Generator().manual_seed(0)) * 2 - 1
    return train_dmd2(cfg, load_latent_teacher(teacher_dir), (images, ["a red square", "a photo of a cat", "noise"]),
                      root / "run", progress=False)


@pytest.fixture(scope="module", params=LAYOUTS)
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    bundle_dir = train_student(root, request.param)
    engine = export_onnx.export_onnx(bundle_dir, root / "engine")
    return request.param, bundle_dir, engine, json.loads((engine / export_onnx.ENGINE_MANIFEST).read_text())


def test_every_file_is_exported_checked_and_within_tolerance(exported):
    import onnx

    layout, _, engine, m = exported
    encoders = ["text_encoder", "text_encoder_2"] if layout == "sdxl" else ["text_encoder"]
    assert set(m["files"]) == {"fp32", "vae_decoder_fp32", *(f"{e}_fp32" for e in encoders)}
    assert m["family"] == "latent" and [e["component"] for e in m["text"]["encoders"]] == encoders
    for key, entry in m["files"].items():
        path = engine / entry["path"]
        onnx.checker.check_model(str(path))
        # attention is decomposed into standard ops (SDPA at opset 17): no custom domains in the graph
        assert {n.domain for n in onnx.load(str(path)).graph.node} <= {"", "ai.onnx"}, key
        assert entry["max_abs_err"] <= bound(key, entry) and "max_rel_err" in entry, (key, entry)
        assert entry["calls_checked"] >= 1 and entry["precision"] == "fp32" and "external_data" not in entry
    assert m["files"]["fp32"]["component"] == "unet" and m["files"]["fp32"]["calls_checked"] == m["schedule"]["nfe"]
    for e in m["text"]["encoders"]:
        assert (engine / e["tokenizer"] / "vocab.json").exists() and e["max_length"] == 77
    inputs = [i["name"] for i in m["inputs"]]
    assert inputs == ["x", "sigma", "timestep", "encoder_hidden_states",
                      *(["text_embeds", "time_ids"] if layout == "sdxl" else [])]
    assert m["guidance"]["unconditional_pass"] is False
    assert m["vae_decoder"]["outputs"][0]["shape"] == ["batch", 3, IMAGE_SIZE, IMAGE_SIZE]
    assert not (engine.parent / "engine.tmp").exists()


def test_unet_batch_axis_is_dynamic(exported):
    import onnxruntime as ort

    _, bundle_dir, engine, m = exported
    bundle = load_bundle(bundle_dir)
    teacher = load_latent_teacher(Path(m["conditioning"]["teacher"]))
    model = export_onnx.GraphStudent(bundle).eval()
    session = ort.InferenceSession(str(engine / m["files"]["fp32"]["path"]), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        with torch.no_grad():
            cond = teacher.cond(prompts=PROMPTS[:batch])
        feeds = export_onnx.loop_inputs(bundle, m["schedule"]["nfe"], batch, seed=batch, cond=cond)
        wants = export_graph.module_outputs(model, feeds)
        for feed, want in zip(feeds, wants):
            got = session.run(["prediction"], feed)[0]
            assert got.shape == (batch, 4, 8, 8) and np.abs(got - want[0]).max() <= 1e-4


def ort_text_to_image(engine: Path, prompts: list[str], noise: np.ndarray, fresh: np.ndarray) -> np.ndarray:
    """A whole sample from the engine folder alone: its tokenizers and manifest, ONNX Runtime, numpy (no torch)."""
    import onnxruntime as ort
    from transformers import CLIPTokenizer

    m = json.loads((engine / export_onnx.ENGINE_MANIFEST).read_text())

    def session(key):
        return ort.InferenceSession(str(engine / m["files"][key]["path"]), providers=["CPUExecutionProvider"])

    outs = []
    for e in m["text"]["encoders"]:
        tokenizer = CLIPTokenizer.from_pretrained(engine / e["tokenizer"], local_files_only=True)
        ids = tokenizer(prompts, padding="max_length", max_length=e["max_length"], truncation=True,
                        return_tensors="np").input_ids.astype(np.int64)
        names = [o["name"] for o in e["outputs"]]
        outs.append(dict(zip(names, session(e["files"]["fp32"]).run(None, {"input_ids": ids}))))
    # the manifest's layout rule: groups side by side (none padded here), the pooled projection, constant rows
    text = m["text"]
    cond = {"encoder_hidden_states": np.concatenate([np.concatenate([outs[i]["hidden_states"] for i in g], axis=-1)
                                                     for g in text["groups"]], axis=1)}
    if text["pooled"]:
        cond[text["pooled"]["name"]] = np.concatenate([outs[i]["text_embeds"] for i in text["pooled"]["from"]], -1)
    for name, row in text["constants"].items():
        cond[name] = np.tile(np.float32(row), (len(prompts), 1))
    unet, s = session("fp32"), m["schedule"]
    x = noise.astype(np.float64) * s["sigmas"][0]
    for i, (sigma, t) in enumerate(zip(s["sigmas"], s["timesteps"])):  # DMD2: x0, then fresh noise
        feed = {"x": x.astype(np.float32), "sigma": np.full(len(x), sigma, np.float32),
                "timestep": np.full(len(x), t, np.float32), **cond}
        x0 = x0_from_output(unet.run(["prediction"], feed)[0], x, feed["sigma"], m["prediction_type"])
        if i + 1 < len(s["sigmas"]):
            x = x0 + s["sigmas"][i + 1] * fresh[i]
    return session(m["vae_decoder"]["files"]["fp32"]).run(None, {"latents": x0.astype(np.float32)})[0]


def test_whole_sample_through_onnx_runtime_matches_the_pytorch_student(exported):
    _, bundle_dir, engine, m = exported
    bundle = load_bundle(bundle_dir)
    teacher = load_latent_teacher(Path(m["conditioning"]["teacher"]))
    nfe = m["schedule"]["nfe"]
    g = torch.Generator().manual_seed(7)
    noise = torch.randn((len(PROMPTS), *bundle.x_shape), generator=g)
    fresh = torch.randn((nfe, len(PROMPTS), *bundle.x_shape), generator=g)
    with torch.no_grad():
        x0 = bundle.generate(noise, teacher.cond(prompts=PROMPTS), nfe, fresh_noise=fresh)
        want = teacher.decode(x0).numpy()
    got = ort_text_to_image(engine, PROMPTS, noise.numpy(), fresh.numpy())
    assert got.shape == (len(PROMPTS), 3, IMAGE_SIZE, IMAGE_SIZE)
    assert np.abs(got - want).max() <= IMAGE_TOLERANCE, np.abs(got - want).max()
    assert np.abs(want[0] - want[2]).max() > 1e-3  # different prompts, different images: the check means something


def test_runtime_pipeline_samples_text_engines_from_prompts(exported):
    """runtime.Pipeline on the engine folder alone (no torch): prompts in, the PyTorch student's images out."""
    from runtime import Pipeline, UserError

    _, bundle_dir, engine, m = exported
    bundle = load_bundle(bundle_dir)
    teacher = load_latent_teacher(Path(m["conditioning"]["teacher"]))
    pipe = Pipeline.load(engine, "onnxruntime-cpu")
    nfe = m["schedule"]["nfe"]
    noise = np.random.default_rng(3).standard_normal((len(PROMPTS), pipe.draws(nfe), *bundle.x_shape))
    out = pipe.generate(PROMPTS, noise=noise.astype(np.float32), batch_size=2)
    fresh = torch.from_numpy(noise[:, 1:]).float().transpose(0, 1)
    with torch.no_grad():
        x0 = bundle.generate(torch.from_numpy(noise[:, 0]).float(), teacher.cond(prompts=PROMPTS), nfe,
                             fresh_noise=fresh)
        want = to_uint8(teacher.decode(x0)).numpy()
    assert out.images.shape == (len(PROMPTS), IMAGE_SIZE, IMAGE_SIZE, 3) and out.prompts == PROMPTS
    assert np.abs(out.images.astype(int) - want).max() <= 1
    assert np.array_equal(pipe.generate(PROMPTS[:1], seed=4).images, pipe.generate(PROMPTS[:1], seed=4).images)
    with pytest.raises(UserError, match="give a list of prompts"):
        pipe.generate([1, 2])


@pytest.fixture(scope="module")
def sd15_bundle(tmp_path_factory):
    return train_student(tmp_path_factory.mktemp("sd15_errors"), "sd15")


def test_missing_teacher_folder_is_one_clear_line(sd15_bundle, tmp_path, capsys):
    bundle = shutil.copytree(sd15_bundle, tmp_path / "student")
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    teacher = manifest["conditioning"]["teacher"]
    gone = str(tmp_path / "moved_away")
    manifest["conditioning"]["teacher"] = manifest["teacher"] = gone
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
    code, _, err = run_main(export_onnx.main, ["--bundle", str(bundle), "--out", str(tmp_path / "engine")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and gone in err and "--teacher" in err, err
    assert not (tmp_path / "engine").exists() and not (tmp_path / "engine.tmp").exists()
    # what the message says to do works
    code, out, err = run_main(export_onnx.main, ["--bundle", str(bundle), "--out", str(tmp_path / "engine"),
                                                 "--teacher", teacher], capsys)
    assert code == 0 and (tmp_path / "engine" / "vae_decoder_fp32.onnx").exists(), err
    assert "text_encoder_fp32.onnx" in out


def test_fp16_and_int8_are_refused_for_latent_bundles(sd15_bundle, tmp_path, capsys):
    for precision in ("fp16", "fp32,int8"):
        code, _, err = run_main(export_onnx.main, ["--bundle", str(sd15_bundle), "--out", str(tmp_path / "e"),
                                                   "--precision", precision], capsys)
        assert code == 2 and "not yet for latent bundles" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "e").exists() and not (tmp_path / "e.tmp").exists()


def test_external_data_decision():
    gib = 2**30
    assert not export_graph.needs_external_data(0.49e9)  # CLIP ViT-L text encoder (SD 1.5), fp32
    assert not export_graph.needs_external_data(1.4 * gib)
    assert export_graph.needs_external_data(1.6 * gib)  # past 1.5 GiB: constant folding could push it over 2 GB
    assert export_graph.needs_external_data(3.44e9)  # SD 1.5's UNet, fp32
    assert export_graph.needs_external_data(2.78e9)  # SDXL's OpenCLIP bigG text encoder, fp32


def test_external_data_files_load_check_and_pass_parity(sd15_bundle, tmp_path, monkeypatch):
    """The path big models take (every graph's weights in one .data file beside it), forced on the tiny student."""
    import onnx

    monkeypatch.setattr(export_graph, "EXTERNAL_DATA_BYTES", 0)
    engine = export_onnx.export_onnx(sd15_bundle, tmp_path / "engine")
    m = json.loads((engine / export_onnx.ENGINE_MANIFEST).read_text())
    for key, entry in m["files"].items():
        path = engine / entry["path"]
        assert entry["external_data"] == path.name + ".data" and (engine / entry["external_data"]).stat().st_size > 0
        graph = onnx.load(str(path), load_external_data=False).graph  # every tensor past 1 kB is in the .data file
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
        assert all(len(t.raw_data) < 1024 for t in graph.initializer)
        onnx.checker.check_model(str(path))
        assert entry["max_abs_err"] <= bound(key, entry)
    assert not list(engine.glob("*.export"))  # the exporter's scratch folders are gone
