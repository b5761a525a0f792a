"""SD3-layout flow-matching transformer teachers (SD3Transformer2DModel, two CLIPs + T5, shifted flow scheduler)
distil, bundle, export and serve through the same code as every other family. Tiny random models only; the
prompt encoder and the denoiser are checked against diffusers' own StableDiffusion3Pipeline and transformer."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from distill.bundle import load_bundle
from distill.data import to_uint8
from distill.dmd2 import DMD2Config, train_dmd2
from distill.errors import UserError
from distill.run import FLOW_4STEP, PRESETS, main
from distill.sfd import SFDConfig, train_sfd
from distill.teachers import load_teacher
from distill.teachers.sd3 import SD3TransformerBackbone

from .test_dmd2 import run_main
from .tiny_sd import IMAGE_SIZE, T5_TOKENS, make_tiny_sd3_dir

PROMPTS = ["a photo of a cat", "", "blue noise " * 30]  # the last one is truncated by every tokenizer
CAPTIONS = ["a red square", "a photo of a cat", "blue noise"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_sd3_dir(tmp_path_factory.mktemp("sd3") / "teacher")


@pytest.fixture(scope="module")
def teacher(folder):
    return load_teacher(folder)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red square\n\na photo of a cat\nblue noise\n")
    return path


def real_data(teacher):
    images = torch.rand((3, 3, IMAGE_SIZE, IMAGE_SIZE), generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        return teacher.encode(images), CAPTIONS


def small_dmd2(**kw):
    return DMD2Config(**({"steps": 2, "batch_size": 4, "warmup": 0, "dfake_gen_update_ratio": 1,
                          "lr_generator": 1e-3, "lr_fake": 1e-3, "checkpoint_every": 100} | kw))


def test_loads_as_a_flow_latent_teacher(teacher):
    assert teacher.family == "latent" and teacher.conditioning == "text"
    assert isinstance(teacher.denoiser.net, SD3TransformerBackbone)
    assert teacher.denoiser.parameterization == "flow" and teacher.denoiser.prediction_type == "flow"
    assert teacher.denoiser.schedule.shift == 3.0 and teacher.denoiser.time_scale == 1000
    assert teacher.x_shape == (4, 8, 8) and teacher.image_size == (IMAGE_SIZE, IMAGE_SIZE)
    assert teacher.guidance_scale == 7.0  # StableDiffusion3Pipeline's default
    frozen = [teacher.vae, *teacher.prompt_encoder.modules]
    assert not any(p.requires_grad for m in frozen for p in m.parameters())


def test_prompt_encoding_equals_the_diffusers_sd3_pipeline(teacher):
    """The condition is exactly StableDiffusion3Pipeline.encode_prompt's (CLIP pair penultimate, zero-padded,
    then T5 tokens; pooled projections side by side), and the null condition is its encoding of ""."""
    from diffusers import StableDiffusion3Pipeline

    parts = teacher.prompt_encoder.parts
    pipe = StableDiffusion3Pipeline(
        transformer=teacher.denoiser.net.transformer, scheduler=None, vae=teacher.vae,
        text_encoder=parts[0].encoder, tokenizer=parts[0].tokenizer, text_encoder_2=parts[1].encoder,
        tokenizer_2=parts[1].tokenizer, text_encoder_3=parts[2].encoder, tokenizer_3=parts[2].tokenizer)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=T5_TOKENS)
        cond = teacher.cond(prompts=PROMPTS)
    assert set(cond) == {"encoder_hidden_states", "pooled_projections"}
    assert cond["encoder_hidden_states"].shape == (3, 77 + T5_TOKENS, 32)
    assert cond["pooled_projections"].shape == (3, 24)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled_projections"], pooled, rtol=0, atol=0)
    assert (embeds[0] - embeds[1]).abs().max() > 1e-3  # different prompts differ
    assert (cond["encoder_hidden_states"][:, :77, 24:] == 0).all()  # CLIP features padded to the T5 width
    torch.testing.assert_close(teacher.uncond(2)["encoder_hidden_states"],
                               teacher.cond(prompts=["", ""])["encoder_hidden_states"])


def test_denoiser_is_x_t_minus_t_times_the_transformers_velocity(teacher):
    """x0 = x_t - t v with x_t = x / (1 + sigma), t = sigma / (1 + sigma) and the transformer fed 1000 t, as
    StableDiffusion3Pipeline feeds it; the velocity of an ideal model (eps - x0) gives x0 back."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g) * 3
    sigma = torch.tensor([0.5, 9.0])
    cond = teacher.cond(prompts=PROMPTS[:2])
    with torch.no_grad():
        got = teacher.denoiser(x, sigma, cond)
        t = (sigma / (1 + sigma)).reshape(-1, 1, 1, 1)
        x_t = x / (1 + sigma.reshape(-1, 1, 1, 1))
        v = teacher.denoiser.net.transformer(hidden_states=x_t, encoder_hidden_states=cond["encoder_hidden_states"],
                                             pooled_projections=cond["pooled_projections"],
                                             timestep=1000 * t.flatten()).sample
    torch.testing.assert_close(got, x_t - t * v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", ["one", "four"])
def test_dmd2_smoke_bundle_and_from_pretrained(teacher, steps, tmp_path):
    from diffusers import SD3Transformer2DModel

    extra = {} if steps == "one" else {"student_timesteps": FLOW_4STEP, "fake_per_step": True}
    bundle_dir = train_dmd2(small_dmd2(**extra), teacher, real_data(teacher), tmp_path / "run", progress=False)
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    assert m["network"] == {"format": "diffusers", "backbone": "SD3TransformerBackbone",
                            "class": "SD3Transformer2DModel", "folder": "transformer"}
    assert m["conditioning"]["inputs"] == ["encoder_hidden_states", "pooled_projections"]
    assert m["schedule"]["kind"] == "flow" and m["schedule"]["shift"] == 3.0
    if steps == "four":  # flow times, shifted by the scheduler's 3: t' = 3t / (1 + 2t), sigma = t' / (1 - t')
        t = np.array(FLOW_4STEP)
        shifted = np.minimum(3 * t / (1 + 2 * t), 0.999)
        assert m["nfe"]["4"]["timesteps"] == list(FLOW_4STEP)
        assert np.allclose(m["nfe"]["4"]["sigmas"], shifted / (1 - shifted))
    # the student's transformer is a diffusers model folder, loadable as users load any SD3 transformer
    plain = SD3Transformer2DModel.from_pretrained(bundle_dir / "transformer")
    base = teacher.denoiser.net.transformer.state_dict()
    state = plain.state_dict()
    assert all(torch.equal(v, bundle.denoiser.net.transformer.state_dict()[k]) for k, v in state.items())
    assert any(not torch.equal(v, base[k]) for k, v in state.items())  # training changed it
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    fresh = torch.randn(4, 2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = teacher.cond(prompts=PROMPTS[:2])
    a = bundle.generate(noise, cond, fresh_noise=fresh)
    assert torch.isfinite(a).all() and torch.equal(a, load_bundle(bundle_dir).generate(noise, cond, fresh_noise=fresh))


def test_gan_tap_lays_the_middle_blocks_image_tokens_on_the_latent_grid(teacher):
    from distill.dmd2.fake_score import BottleneckTap

    net = teacher.denoiser.net
    tap = BottleneckTap(net)
    raw = []
    handle = net.transformer.transformer_blocks[1].register_forward_hook(lambda m, i, out: raw.append(out[1]))
    try:
        with torch.no_grad():
            teacher.denoiser(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), teacher.cond(prompts=PROMPTS[:2]))
        features = tap.pop()
    finally:
        tap.remove()
        handle.remove()
    assert net.tap_name == "transformer_blocks.1"
    assert features.shape == (2, 16, 4, 4)  # (N, inner_dim 2 heads x 8, 8 / patch 2, 8 / patch 2)
    # token i * w + j is the patch at row i, column j (the patch embedding flattens rows first)
    torch.testing.assert_close(features[:, :, 2, 3], raw[0][:, 2 * 4 + 3])


def test_sfd_and_sfd_v_smoke_from_a_prompts_file(teacher, prompts_file, tmp_path):
    for name, cfg in {"sfd": SFDConfig(nfe=2, steps=1, batch_size=2, lr=1e-3, prompts=str(prompts_file)),
                      "sfdv": SFDConfig(nfes=(2, 3), steps=2, batch_size=2, lr=1e-3,
                                        prompts=str(prompts_file))}.items():
        bundle = load_bundle(train_sfd(cfg, teacher, tmp_path / name, progress=False))
        assert bundle.manifest["denoiser"]["parameterization"] == "flow"
        for nfe in bundle.nfes:
            x = bundle.generate(torch.randn(2, 4, 8, 8), teacher.cond(prompts=PROMPTS[:2]), nfe)
            assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()
    with pytest.raises(UserError, match="--prompts FILE"):
        train_sfd(SFDConfig(nfe=2, steps=1, batch_size=2), teacher, tmp_path / "none", progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="has no prompt"):
        train_sfd(SFDConfig(nfe=2, steps=1, prompts=str(empty)), teacher, tmp_path / "empty", progress=False)


@pytest.fixture(scope="module")
def engines(teacher, prompts_file, tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="the [onnx] extra (onnx, onnxruntime) is not installed")
    from export.onnx import export_onnx

    root = tmp_path_factory.mktemp("sd3_engines")
    students = {
        "dmd2": train_dmd2(small_dmd2(steps=1, use_gan=False, student_timesteps=FLOW_4STEP[:2]), teacher,
                           real_data(teacher), root / "dmd2", progress=False),
        "sfdv": train_sfd(SFDConfig(nfes=(2, 3), steps=1, batch_size=2, lr=1e-3, prompts=str(prompts_file)),
                          teacher, root / "sfdv", progress=False),
    }
    return {name: (bundle, export_onnx(bundle, root / f"{name}_engine", quality_samples=False))
            for name, bundle in students.items()}


@pytest.mark.parametrize("method", ["dmd2", "sfdv"])
def test_export_parity_and_runtime_match_pytorch(teacher, engines, method):
    """Every file within the fp32 bounds, and runtime.Pipeline on the engine folder alone (tokenizers, three text
    encoders, the transformer's loop, the VAE) gives the PyTorch student's images from prompts."""
    from runtime import Pipeline

    bundle_dir, engine = engines[method]
    m = json.loads((engine / "fewstep_engine.json").read_text())
    assert m["parameterization"] == "flow"
    assert set(m["files"]) == {"fp32", "text_encoder_fp32", "text_encoder_2_fp32", "text_encoder_3_fp32",
                               "vae_decoder_fp32"}
    assert m["files"]["fp32"]["max_abs_err"] <= 1e-4 and m["files"]["vae_decoder_fp32"]["max_abs_err"] <= 1e-3
    assert m["text"]["groups"] == [[0, 1], [2]] and m["text"]["width"] == 32
    assert m["text"]["pooled"] == {"name": "pooled_projections", "from": [0, 1]}
    assert [e["max_length"] for e in m["text"]["encoders"]] == [77, 77, T5_TOKENS]
    bundle = load_bundle(bundle_dir)
    pipe = Pipeline.load(engine, "onnxruntime-cpu")
    for nfe in pipe.nfes:
        noise = np.random.default_rng(nfe).standard_normal((len(PROMPTS), pipe.draws(nfe), *bundle.x_shape))
        out = pipe.generate(PROMPTS, noise=noise.astype(np.float32), nfe=nfe)
        with torch.no_grad():
            x0 = bundle.generate(torch.from_numpy(noise[:, 0]).float(), teacher.cond(prompts=PROMPTS), nfe,
                                 fresh_noise=torch.from_numpy(noise[:, 1:]).float().transpose(0, 1))
            want = to_uint8(teacher.decode(x0)).numpy()
        assert out.images.shape == (len(PROMPTS), IMAGE_SIZE, IMAGE_SIZE, 3)
        assert np.abs(out.images.astype(int) - want).max() <= 1
        assert np.abs(want[0].astype(int) - want[1]).max() > 2  # different prompts, different images


def test_bad_sd3_folders_and_presets_fail_in_one_line(folder, teacher, tmp_path, capsys):
    broken = tmp_path / "no_t5"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "text_encoder_3")
    with pytest.raises(UserError, match=r"missing text_encoder_3/: an SD3 teacher folder needs"):
        load_teacher(broken)
    with pytest.raises(UserError, match="flow times t.*look like DDPM timesteps"):
        train_dmd2(small_dmd2(student_timesteps=(999, 499), use_gan=False), teacher, None, tmp_path / "r",
                   progress=False)
    code, _, err = run_main(main, ["--preset", "sd15", "--teacher", str(folder), "--data", str(tmp_path), "--out",
                                   str(tmp_path / "o")], capsys)
    assert code == 2 and "has a SD3TransformerBackbone: use --preset sd3" in err
    code, _, err = run_main(main, ["--preset", "sd3", "--teacher", str(folder), "--prompts", "p.txt"], capsys)
    assert code == 2 and "--prompts is for SFD" in err


def test_text_sfd_preset_end_to_end(folder, prompts_file, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--preset", "text-sfd", "--teacher", str(folder), "--prompts", str(prompts_file), "--nfe", "2",
            "--steps", "1", "--batch-size", "2", "--out", str(out), "--no-progress"]
    code, _, err = run_main(main, argv, capsys)
    assert code == 0, err
    m = json.loads((out / "student" / "fewstep_student.json").read_text())
    assert m["method"] == "sfd" and m["model_class"] == "SD3Transformer2DModel" and list(m["nfe"]) == ["2"]
    assert json.loads((out / "config.json").read_text())["sfd"]["prompts"] == str(prompts_file)
    assert dataclasses.asdict(PRESETS["text-sfd"].config)["prompts"] is None  # the preset holds no user file


def test_runtime_generate_cli_takes_prompts(engines, tmp_path, capsys):
    from runtime.generate import main as generate

    _, engine = engines["dmd2"]
    out = tmp_path / "cats.npz"
    code, stdout, err = run_main(generate, ["--engine", str(engine), "--prompt", "a cat", "--prompt", "a dog",
                                            "--n", "3", "--out", str(out)], capsys)
    assert code == 0, err
    saved = np.load(out)
    assert saved["images"].shape == (3, IMAGE_SIZE, IMAGE_SIZE, 3) and list(saved["prompts"]) == ["a cat", "a dog",
                                                                                                "a cat"]
    assert out.with_suffix(".png").exists()
    code, _, err = run_main(generate, ["--engine", str(engine), "--labels", "1,2", "--out", str(out)], capsys)
    assert code == 2 and "give --prompt TEXT" in err


def test_text_engines_run_without_torch(engines):
    """The runtime samples a text engine (three tokenizers, encoders, VAE) and never imports torch."""
    import subprocess
    import sys

    _, engine = engines["dmd2"]
    code = ("import sys; from runtime import Pipeline; "
            f"out = Pipeline.load({str(engine)!r}, 'onnxruntime-cpu').generate(['a cat'], seed=1); "
            "print(out.images.shape, sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"(1, {IMAGE_SIZE}, {IMAGE_SIZE}, 3) []"


def test_sd3_preset_end_to_end_with_lora_and_the_gan(folder, tmp_path, capsys):
    """--preset sd3: a 4-step student in shifted flow time, LoRA on the generator (merged into the saved transformer,
    which loads as a plain SD3Transformer2DModel), the GAN head on the middle joint block."""
    from diffusers import SD3Transformer2DModel
    from PIL import Image

    data = tmp_path / "captioned"
    data.mkdir()
    for i, caption in enumerate(CAPTIONS):
        pixels = (np.random.default_rng(i).random((IMAGE_SIZE, IMAGE_SIZE, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(caption)
    out = tmp_path / "run"
    argv = ["--preset", "sd3", "--teacher", str(folder), "--data", str(data), "--steps", "2", "--batch-size", "4",
            "--set", "dfake_gen_update_ratio=1", "--set", "warmup=0", "--out", str(out), "--no-progress"]
    code, stdout, err = run_main(main, argv, capsys)
    assert code == 0, err
    m = json.loads((out / "student" / "fewstep_student.json").read_text())
    assert sorted(m["nfe"], key=int) == ["1", "4"] and m["nfe"]["4"]["timesteps"] == list(FLOW_4STEP)
    assert m["training"]["lora_rank"] == 64 and m["training"]["use_gan"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_gan_g" in r for r in records) and any("loss_gan_d" in r for r in records)
    plain = SD3Transformer2DModel.from_pretrained(out / "student" / "transformer")
    assert not any("lora" in k for k in plain.state_dict())
