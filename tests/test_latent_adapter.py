"""The latent (SD 1.5 / SDXL) teacher adapter on tiny random diffusers folders."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from distill.errors import UserError
from distill.teachers.denoiser import guided
from distill.teachers.latent import SDUNetBackbone, SDXLUNetBackbone, load_latent_teacher

from .tiny_sd import BOS_ID, EOS_ID, IMAGE_SIZE, make_tiny_sd_dir

TOL = dict(rtol=1e-5, atol=1e-5)
LAYOUTS = {"sd15": False, "sdxl": True}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def folder(request, tmp_path_factory):
    return make_tiny_sd_dir(tmp_path_factory.mktemp(request.param), xl=LAYOUTS[request.param])


@pytest.fixture(scope="module")
def teacher(folder):
    return load_latent_teacher(folder)


def xl(teacher) -> bool:
    return isinstance(teacher.denoiser.net, SDXLUNetBackbone)


def raw_unet_eps(teacher, x_vp, t, cond):
    """The diffusers UNet called directly, as its own pipeline would (not through the backbone)."""
    unet = teacher.denoiser.net.unet
    added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]} if xl(teacher) else None
    return unet(x_vp, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added).sample


def test_loads_with_the_right_shapes(teacher):
    assert teacher.family == "latent" and teacher.conditioning == "text"
    assert teacher.x_shape == (4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)  # tiny VAE: 2 blocks -> factor 2
    assert teacher.image_size == (IMAGE_SIZE, IMAGE_SIZE)
    assert teacher.guidance_scale == 7.5
    assert isinstance(teacher.denoiser.net, SDXLUNetBackbone if xl(teacher) else SDUNetBackbone)
    frozen = [teacher.vae, *teacher.prompt_encoder.modules]
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    assert not any(m.training for m in frozen)


def test_cond_shapes_and_values(teacher):
    c = teacher.cond(prompts=["a photo of a cat", "a dog", "a photo of a cat"])
    h = c["encoder_hidden_states"]
    assert h.shape == (3, 77, 32) and h.dtype == torch.float32
    torch.testing.assert_close(h[0], h[2])  # same prompt, same encoding
    assert (h[0] - h[1]).abs().max() > 1e-3  # different prompts differ
    if not xl(teacher):
        assert set(c) == {"encoder_hidden_states"}
        return
    assert set(c) == {"encoder_hidden_states", "text_embeds", "time_ids"}
    assert c["text_embeds"].shape == (3, 8)
    expected_ids = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]] * 3, dtype=torch.float32)
    torch.testing.assert_close(c["time_ids"], expected_ids)
    # penultimate layers of both encoders side by side, pooled projection of the second
    tok_1, tok_2 = teacher.prompt_encoder.tokenizers
    enc_1, enc_2 = teacher.prompt_encoder.text_encoders
    ids = tok_1(["a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids[0, 0] == BOS_ID and ids[0, -1] == EOS_ID
    out_1, out_2 = enc_1(ids, output_hidden_states=True), enc_2(ids, output_hidden_states=True)
    torch.testing.assert_close(h[1:2], torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], -1))
    assert (h[1:2, :, :16] - out_1.last_hidden_state).abs().max() > 1e-3  # not the last layer
    torch.testing.assert_close(c["text_embeds"][1:2], out_2.text_embeds)


def test_long_prompt_is_truncated(teacher):
    c = teacher.cond(prompts=["cat " * 200])
    assert c["encoder_hidden_states"].shape == (1, 77, 32)


def test_bad_conditions_are_user_errors(teacher):
    with pytest.raises(UserError, match="prompts"):
        teacher.cond(labels=[1])
    with pytest.raises(UserError, match="empty"):
        teacher.cond(prompts=[])
    with pytest.raises(UserError, match="strings"):
        teacher.cond(prompts=["a cat", 3])
    with pytest.raises(UserError, match="prompts"):
        teacher.cond()


def test_uncond_is_the_empty_prompt(teacher):
    u = teacher.uncond(3)
    empty = teacher.cond(prompts=[""])
    assert set(u) == set(empty)
    for k in u:
        assert u[k].shape[0] == 3
        torch.testing.assert_close(u[k], empty[k].expand_as(u[k]))
    assert teacher.uncond(1)["encoder_hidden_states"].abs().max() > 0  # not zeros


def test_denoiser_output_shape_and_finite(teacher):
    torch.manual_seed(0)
    x = torch.randn(2, *teacher.x_shape) * 3
    with torch.no_grad():
        x0 = teacher.denoiser(x, torch.tensor([0.5, 10.0]), teacher.cond(prompts=["a cat", "a dog"]))
    assert x0.shape == x.shape and x0.dtype == torch.float32
    assert torch.isfinite(x0).all()


def test_vp_conversion_matches_closed_form(teacher):
    """epsilon prediction: x0 = x - sigma * eps(x / sqrt(1 + sigma^2), t) at one of the model's own timesteps."""
    torch.manual_seed(1)
    schedule = teacher.denoiser.schedule
    k = 500
    sigma = schedule.sigmas[k]  # float64
    assert abs(float(schedule.sigma_to_t(sigma)) - k) < 1e-6
    cond = teacher.cond(prompts=["a cat", "a dog"])
    x = torch.randn(2, *teacher.x_shape) * float(sigma)
    x_vp = (x.double() / (1 + sigma**2).sqrt()).float()
    with torch.no_grad():
        eps = raw_unet_eps(teacher, x_vp, torch.tensor([k, k]), cond).double()
        expected = (x.double() - sigma * eps).float()
        got = teacher.denoiser(x, sigma.float(), cond)
        eps_elsewhere = raw_unet_eps(teacher, x_vp, torch.tensor([k + 50, k + 50]), cond).double()
    torch.testing.assert_close(got, expected, **TOL)
    # the comparison resolves t: the same input at another timestep gives a clearly different answer
    assert (x.double() - sigma * eps_elsewhere - expected.double()).abs().max() > 1e-3


def test_cfg_equals_two_separate_calls(teacher):
    torch.manual_seed(2)
    n, scale = 2, 4.0
    x = torch.randn(n, *teacher.x_shape)
    sigma = torch.tensor([1.5, 4.0])
    cond, uncond = teacher.cond(prompts=["a cat", "a dog"]), teacher.uncond(n)
    with torch.no_grad():
        x0_c = teacher.denoiser(x, sigma, cond)
        x0_u = teacher.denoiser(x, sigma, uncond)
        got = guided(teacher.denoiser, scale, uncond)(x, sigma, cond)
    assert (x0_c - x0_u).abs().max() > 0.05  # the condition matters, so the check below means something
    # batch 2n vs batch n differ by fp32 rounding (~1e-6), which the guidance scale amplifies
    torch.testing.assert_close(got, x0_u + scale * (x0_c - x0_u), rtol=1e-4, atol=1e-4)


def test_encode_decode(teacher):
    torch.manual_seed(3)
    vae, sf = teacher.vae, teacher.vae.config.scaling_factor
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1
    with torch.no_grad():
        z = teacher.encode(images)
        assert z.shape == (2, *teacher.x_shape)
        torch.testing.assert_close(z, teacher.encode(images))  # the posterior mean: deterministic
        torch.testing.assert_close(z, vae.encode(images).latent_dist.mean * sf)
        out = teacher.decode(z)
        assert out.shape == images.shape and out.min() >= -1 and out.max() <= 1
        torch.testing.assert_close(out, vae.decode(z / sf).sample.clamp(-1, 1))


def test_vae_shift_factor(tmp_path):
    folder = make_tiny_sd_dir(tmp_path / "sd")
    config = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps({**config, "shift_factor": 0.25}))
    teacher = load_latent_teacher(folder)
    torch.manual_seed(4)
    images = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1
    sf = teacher.vae.config.scaling_factor
    with torch.no_grad():
        z = teacher.encode(images)
        torch.testing.assert_close(z, (teacher.vae.encode(images).latent_dist.mean - 0.25) * sf)
        torch.testing.assert_close(teacher.decode(z), teacher.vae.decode(z / sf + 0.25).sample.clamp(-1, 1))


def test_metadata_guidance_and_zero_uncond(folder, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "teacher")
    (copy / "fewstep_teacher.json").write_text(json.dumps({"guidance_scale": 3.0}))
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": True}))
    teacher = load_latent_teacher(copy)
    assert teacher.guidance_scale == 3.0
    u = teacher.uncond(2)
    assert u["encoder_hidden_states"].abs().max() == 0
    if "time_ids" in u:  # SDXL's pipeline keeps the size ids for the null text
        torch.testing.assert_close(u["time_ids"], teacher.cond(prompts=["a", "b"])["time_ids"])
        assert u["text_embeds"].abs().max() == 0


@pytest.mark.parametrize("part", ["text_encoder", "text_encoder_2", "tokenizer", "vae"])
def test_missing_component_is_named(folder, tmp_path, part):
    copy = shutil.copytree(folder, tmp_path / "teacher")
    if not (copy / part).exists():
        pytest.skip(f"{part} is not part of this layout")
    shutil.rmtree(copy / part)
    with pytest.raises(UserError, match=f"missing {part}/"):
        load_latent_teacher(copy)


def test_renamed_unet_key_is_named(folder, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "teacher")
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["conv_in.weight_renamed"] = state.pop("conv_in.weight")
    save_file(state, weights)
    with pytest.raises(UserError, match="conv_in.weight") as error:
        load_latent_teacher(copy)
    assert "missing 1 keys: conv_in.weight" in str(error.value)
    assert "unexpected 1 keys: conv_in.weight_renamed" in str(error.value)


def test_text_encoder_loads_strictly(folder, teacher, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "teacher")
    weights = copy / "text_encoder" / "model.safetensors"
    state = load_file(weights)
    # the layout of real SD folders (saved by transformers 4): "text_model." prefix and a position_ids buffer
    legacy = {"text_model." + k.removeprefix("text_model."): v for k, v in state.items()}
    save_file({**legacy, "text_model.embeddings.position_ids": torch.arange(77)[None]}, weights)
    with torch.no_grad():
        expected = teacher.cond(prompts=["a cat"])["encoder_hidden_states"]
        torch.testing.assert_close(load_latent_teacher(copy).cond(prompts=["a cat"])["encoder_hidden_states"],
                                   expected, rtol=0, atol=0)
    key = next(k for k in legacy if k.endswith("final_layer_norm.weight"))
    legacy[key + "_renamed"] = legacy.pop(key)
    save_file(legacy, weights)
    with pytest.raises(UserError, match="CLIPTextModel.*missing 1 keys: .*final_layer_norm.weight"):
        load_latent_teacher(copy)


def test_sfd_and_sfd_v_smoke_from_prompts(teacher, tmp_path):
    """SFD needs no images: a text teacher's trajectories take their prompts from a file."""
    from distill.bundle import load_bundle
    from distill.sfd import SFDConfig, train_sfd

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na photo of a cat\n")
    for name, cfg in {"sfd": SFDConfig(nfe=2, steps=1, batch_size=2, lr=1e-3, prompts=str(prompts)),
                      "sfdv": SFDConfig(nfes=(2, 3), steps=1, batch_size=2, lr=1e-3, prompts=str(prompts))}.items():
        bundle = load_bundle(train_sfd(cfg, teacher, tmp_path / name, progress=False))
        base = teacher.denoiser.net.unet.state_dict()
        assert any(not torch.equal(v, base[k]) for k, v in bundle.denoiser.net.network.state_dict().items())
        for nfe in bundle.nfes:
            x = bundle.generate(torch.randn(2, *teacher.x_shape), teacher.cond(prompts=["a cat", "a dog"]), nfe)
            assert x.shape == (2, *teacher.x_shape) and torch.isfinite(x).all()
