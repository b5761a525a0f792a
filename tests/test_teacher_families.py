"""Every teacher family distils, bundles, exports and serves: EDM, integer-timestep (index) and flow-matching
factory networks, through the same DMD2 / SFD code (the diffusers UNets have their own test files)."""

import json

import numpy as np
import pytest
import torch

from distill.bundle import MANIFEST_NAME, load_bundle, write_bundle
from distill.dmd2 import DMD2Config, train_dmd2
from distill.errors import UserError
from distill.sfd import SFDConfig, train_sfd
from distill.teachers import load_teacher
from distill.teachers.samplers import sample
from distill.teachers.schedule import make_sigmas

from .tiny_factory import make_factory_dir

FAMILIES = ["edm", "index", "flow"]
# DMD2 4-step students in each teacher's own time
FOUR_STEPS = {"edm": (80.0, 10.0, 1.5, 0.3), "index": (999, 749, 499, 249), "flow": (1.0, 0.75, 0.5, 0.25)}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: make_factory_dir(root / f, f) for f in FAMILIES}


def real_data(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.rand((n, 1, 8, 8), generator=g) * 2 - 1, torch.arange(n) % 3


def small_dmd2(**kw):
    return DMD2Config(**({"steps": 2, "batch_size": 4, "warmup": 0, "dfake_gen_update_ratio": 1,
                          "lr_generator": 1e-3, "lr_fake": 1e-3, "checkpoint_every": 100} | kw))


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_loads_with_its_parameterization_and_samples(teachers, family):
    teacher = load_teacher(teachers[family])
    assert teacher.denoiser.parameterization == {"edm": "edm", "index": "vp", "flow": "flow"}[family]
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x = sample(teacher.denoiser, noise, teacher.denoiser.schedule, "euler", 4, teacher.cond(labels=[0, 1, 2]))
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_denoiser_recovers_x0_from_the_ideal_prediction(teachers, family):
    """c_skip x + c_out F = x0 when F is the family's ideal target (eps, or flow velocity eps - x0)."""
    d = load_teacher(teachers[family]).denoiser
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    sigma = torch.tensor([0.5, 20.0], dtype=torch.float64).reshape(-1, 1, 1, 1)
    x = x0 + sigma.float() * eps
    if family == "flow":
        target = eps - x0
    elif family == "edm":  # F = (x0 - c_skip x) / c_out
        c_skip, c_out = d.scalings(sigma)
        target = (x0 - c_skip.float() * x) / c_out.float()
    else:
        target = eps
    c_skip, c_out = d.scalings(sigma)
    torch.testing.assert_close(c_skip.float() * x + c_out.float() * target, x0, atol=1e-4, rtol=1e-4)


def test_index_network_never_sees_a_fractional_timestep(teachers):
    teacher = load_teacher(teachers["index"])
    schedule = teacher.denoiser.schedule
    x = torch.zeros(1, 1, 8, 8)
    between = schedule.t_to_sigma(torch.tensor([500.5]))
    with pytest.raises(UserError, match="integer timesteps"):
        teacher.denoiser(x, between.float(), teacher.cond(labels=[0]))
    on_point = schedule.t_to_sigma(torch.tensor([500.0]))
    assert torch.isfinite(teacher.denoiser(x, on_point.float(), teacher.cond(labels=[0]))).all()
    with pytest.raises(UserError, match="'discrete' grid"):
        make_sigmas("karras", 4, schedule)
    # DM-loss draws land on the schedule's points
    s = schedule.sigma_at_fraction(torch.rand(50, generator=torch.Generator().manual_seed(0)))
    t = schedule.sigma_to_t(s.double())
    assert torch.allclose(t, t.round(), atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_bundle_round_trip_is_exact(teachers, family, tmp_path):
    teacher = load_teacher(teachers[family])
    manifest = {"format_version": 1, "method": "dmd2", "family": teacher.family, "model_class": "TinyNet",
                "prediction_type": teacher.denoiser.prediction_type, "denoiser": teacher.denoiser.spec(),
                "schedule": teacher.denoiser.schedule.to_manifest(teacher.scheduler_config),
                "nfe": {"1": {"timesteps": [1], "sigmas": [teacher.denoiser.sigma_max]}}, "renoise": "fresh_noise",
                "conditioning": teacher.conditioning_entry(), "image": {"channels": 1, "height": 8, "width": 8}}
    write_bundle(tmp_path / "b", teacher.denoiser.net, manifest)
    saved = json.loads((tmp_path / "b" / MANIFEST_NAME).read_text())
    assert saved["network"]["format"] == "factory" and (tmp_path / "b" / "network" / "net.py").exists()
    bundle = load_bundle(tmp_path / "b")
    want, got = teacher.denoiser.net.network.state_dict(), bundle.denoiser.net.network.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    x, sigma = torch.randn(2, 1, 8, 8), torch.full((2,), 3.0)
    if family == "index":
        sigma = teacher.denoiser.schedule.t_to_sigma(torch.tensor([300.0, 300.0])).float()
    cond = teacher.cond(labels=[0, 2])
    assert torch.equal(teacher.denoiser(x, sigma, cond), bundle.denoiser(x, sigma, cond))


def test_student_whose_factory_module_is_gone_fails_in_one_line(teachers, tmp_path):
    teacher = load_teacher(teachers["flow"])
    out = train_dmd2(small_dmd2(steps=1, use_gan=False), teacher, None, tmp_path / "run", progress=False)
    (out / "network" / "net.py").unlink()
    with pytest.raises(UserError, match="factory file .* does not exist"):
        load_bundle(out)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("steps", ["one", "four"])
def test_dmd2_smoke_and_reload(teachers, family, steps, tmp_path):
    teacher = load_teacher(teachers[family])
    extra = {} if steps == "one" else {"student_timesteps": FOUR_STEPS[family], "fake_per_step": True}
    bundle_dir = train_dmd2(small_dmd2(**extra), teacher, real_data(), tmp_path / "run", progress=False)
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    assert m["denoiser"]["parameterization"] == teacher.denoiser.parameterization
    if steps == "four":
        assert m["nfe"]["4"]["timesteps"] == list(FOUR_STEPS[family])
        want = teacher.denoiser.schedule.student_sigmas(FOUR_STEPS[family])
        assert np.allclose(m["nfe"]["4"]["sigmas"], want.numpy())
    base = teacher.denoiser.net.network.state_dict()
    assert any(not torch.equal(v, base[k]) for k, v in bundle.denoiser.net.network.state_dict().items())
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    fresh = torch.randn(4, 3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = bundle.cond([0, 1, 2])
    a = bundle.generate(noise, cond, fresh_noise=fresh)
    assert torch.isfinite(a).all() and torch.equal(a, load_bundle(bundle_dir).generate(noise, cond, fresh_noise=fresh))


@pytest.mark.parametrize("family", FAMILIES)
def test_sfd_and_sfd_v_smoke(teachers, family, tmp_path):
    teacher = load_teacher(teachers[family])
    for name, cfg in {"sfd": SFDConfig(nfe=2, steps=1, batch_size=2, lr=1e-3),
                      "sfdv": SFDConfig(nfes=(2, 3), steps=2, batch_size=2, lr=1e-3)}.items():
        bundle = load_bundle(train_sfd(cfg, teacher, tmp_path / name, progress=False))
        for nfe in bundle.nfes:
            if family == "index":  # every timestamp is one of the schedule's own integer timesteps
                t = np.array(bundle.manifest["nfe"][str(nfe)]["timesteps"])
                assert np.allclose(t, t.round(), atol=1e-3)
            x = bundle.generate(torch.randn(2, 1, 8, 8), bundle.cond([0, 1]), nfe)
            assert torch.isfinite(x).all()


def test_bad_declarations_fail_in_one_line(teachers, tmp_path):
    spec_file = teachers["edm"] / "fewstep_factory.json"
    spec = json.loads(spec_file.read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "net.py").write_text((teachers["edm"] / "net.py").read_text())
    (bad / "net.safetensors").write_bytes((teachers["edm"] / "net.safetensors").read_bytes())
    (bad / "fewstep_factory.json").write_text(json.dumps(spec | {"parameterization": "ve-magic"}))
    with pytest.raises(UserError, match="unknown parameterization 've-magic'; one of vp, edm, flow"):
        load_teacher(bad)
    (bad / "fewstep_factory.json").write_text(json.dumps(spec | {"prediction_type": "flow"}))
    with pytest.raises(UserError, match="unknown prediction type 'flow' for a edm network"):
        load_teacher(bad)
    flow = load_teacher(teachers["flow"])
    with pytest.raises(UserError, match="flow times t.*look like DDPM timesteps"):
        train_dmd2(small_dmd2(student_timesteps=(999, 749), use_gan=False), flow, None, tmp_path / "r",
                   progress=False)
    edm = load_teacher(teachers["edm"])
    with pytest.raises(UserError, match="student steps are sigmas"):
        train_dmd2(small_dmd2(student_timesteps=(999,), use_gan=False), edm, None, tmp_path / "r2", progress=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_parity_and_runtime_match_pytorch(teachers, family, tmp_path):
    pytest.importorskip("onnxruntime", reason="the [onnx] extra (onnx, onnxruntime) is not installed")
    from export.onnx import export_onnx
    from runtime import Pipeline
    from runtime.noise import request_noise

    teacher = load_teacher(teachers[family])
    for name, trained in {
        "dmd2": train_dmd2(small_dmd2(steps=1, use_gan=False, student_timesteps=FOUR_STEPS[family][:2]), teacher,
                           None, tmp_path / "dmd2", progress=False),
        "sfd": train_sfd(SFDConfig(nfe=2, steps=1, batch_size=2, lr=1e-3), teacher, tmp_path / "sfd",
                         progress=False),
    }.items():
        engine = export_onnx(trained, tmp_path / f"{name}_engine", quality_samples=False)
        manifest = json.loads((engine / "fewstep_engine.json").read_text())
        assert manifest["parameterization"] == teacher.denoiser.parameterization
        assert manifest["files"]["fp32"]["max_abs_err"] <= 1e-4
        pipe = Pipeline.load(engine, backend="onnxruntime-cpu")
        nfe = pipe.nfes[-1]
        images = pipe.generate([0, 1, 2], seed=5, nfe=nfe).images
        noise = torch.from_numpy(request_noise(5, 0, 3, pipe.draws(nfe), pipe.x_shape))  # (N, draws, C, H, W)
        bundle = load_bundle(trained)
        x0 = bundle.generate(noise[:, 0], bundle.cond([0, 1, 2]), nfe, fresh_noise=noise[:, 1:].transpose(0, 1))
        want = ((x0.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert np.abs(images.astype(int) - want.astype(int)).max() <= 1
        # golden vectors of this family's engine reproduce (runtime.golden: what a host in another language checks)
        from runtime.golden import check_golden, write_golden

        write_golden(engine, tmp_path / f"{name}_golden", labels=[0, 1, 2], seed=7, nfe=nfe)
        results = check_golden(tmp_path / f"{name}_golden")
        assert all(r["ok"] for r in results.values()), results


def test_committed_flow_teacher_denoises_real_digits():
    """The embedded flow-matching teacher (a factory network) loads as a flow teacher and, at sigma 0.5 and 2,
    takes noisy held-out digits much closer to the clean ones than the noisy input is (a broken parameterization or
    weights would not)."""
    from distill.digits import FLOW_TEACHER_DIR
    from distill.digits.data import load_digits_split

    teacher = load_teacher(FLOW_TEACHER_DIR)
    assert teacher.denoiser.parameterization == "flow" and teacher.denoiser.prediction_type == "flow"
    x0, labels = load_digits_split("heldout")
    x0, labels = x0[:64], labels[:64]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    for sigma in (0.5, 2.0):
        with torch.no_grad():
            out = teacher.denoiser(x0 + sigma * eps, torch.full((64,), sigma), teacher.cond(labels=labels))
        assert (out - x0).pow(2).mean() < 0.25 * (sigma * eps).pow(2).mean()
