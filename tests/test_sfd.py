"""SFD: its timestamps against the paper's, AFS and the teacher trajectory against closed forms, the stepwise
training (exact resume, per-step losses), the bundle it writes, and its bad-input errors. Tiny models only."""

import json

import pytest
import torch

from distill import run as run_cli
from distill.bundle import MANIFEST_NAME, load_bundle
from distill.errors import UserError
from distill.sfd import SFDConfig, afs_step, student_sigmas, teacher_sigmas, teacher_trajectory, train_sfd
from distill.teachers import load_teacher

from .conftest import make_tiny_pixel_dir
from .test_dmd2 import log_records, run_main, unet_weights


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_tiny_pixel_dir(tmp_path_factory.mktemp("sfd") / "teacher", num_classes=3)


def tiny_config(**kw) -> SFDConfig:
    base = dict(nfe=2, steps=4, batch_size=4, lr=1e-3, checkpoint_every=2)
    return SFDConfig(**(base | kw))


# docs/design.md §4: the paper's student timestamps with AFS (sigma_max 80, sigma_min 0.006, rho 7).
PAPER = {2: [80, 10.93, 0.670, 0.006], 3: [80, 19.00, 3.107, 0.268, 0.006],
         4: [80, 25.96, 6.788, 1.289, 0.145, 0.006]}


@pytest.mark.parametrize("nfe", [2, 3, 4])
def test_student_timestamps_are_the_papers(nfe):
    got = student_sigmas(nfe, afs=True, sigma_min=0.006, sigma_max=80.0)
    torch.testing.assert_close(got, torch.tensor(PAPER[nfe], dtype=torch.float64), rtol=4e-3, atol=0)  # 3-4 digits
    assert len(student_sigmas(nfe, afs=False, sigma_min=0.006, sigma_max=80.0)) == nfe + 1


@pytest.mark.parametrize("k", [1, 3, 4])
def test_teacher_grid_contains_the_student_timestamps(k):
    coarse = student_sigmas(3, True, 0.006, 80.0)
    fine = teacher_sigmas(3, True, k, 0.006, 80.0)
    assert len(fine) == (len(coarse) - 1) * k + 1
    torch.testing.assert_close(fine[::k], coarse, rtol=1e-12, atol=0)


def gaussian_denoiser(x, sigma, cond=None):
    """The exact x0 predictor for N(0, I) data: E[x0 | x] = x / (1 + sigma^2)."""
    return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)


def test_teacher_trajectory_follows_the_exact_ode():
    # For N(0, I) data the probability-flow ODE is x(s) = x(s0) sqrt(1 + s^2) / sqrt(1 + s0^2); DPM-Solver++(3M)
    # on the refined grid converges to it as the teacher steps per student interval grow.
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80.0
    coarse = student_sigmas(4, True, 0.006, 80.0)

    def errors(k):
        states = teacher_trajectory(gaussian_denoiser, x, teacher_sigmas(4, True, k, 0.006, 80.0), k, None)
        assert len(states) == len(coarse)
        exact = [x * ((1 + s**2) / (1 + 80.0**2)) ** 0.5 for s in coarse]
        return [((a.double() - e).abs().max() / e.abs().max()).item() for a, e in zip(states, exact)]

    coarse_errors, fine_errors = errors(4), errors(32)
    assert max(fine_errors) < 3e-4, fine_errors
    assert all(f < c / 10 for f, c in zip(fine_errors[1:-1], coarse_errors[1:-1])), (coarse_errors, fine_errors)


def test_afs_is_the_euler_step_with_the_noise_estimate():
    # At sigma_max the Gaussian-data Euler direction sigma x / (1 + sigma^2) and AFS's x / sqrt(1 + sigma^2)
    # agree to O(1/sigma^2); AFS is exactly x + (s' - s) x / sqrt(1 + s^2).
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 80.0
    got = afs_step(x, 80.0, 25.96)
    torch.testing.assert_close(got, x * (1 + (25.96 - 80.0) / (1 + 80.0**2) ** 0.5))
    euler = x + (25.96 - 80.0) * (x - gaussian_denoiser(x, torch.tensor([80.0] * 2, dtype=torch.float64))) / 80.0
    assert (got - euler).abs().max() < 1e-3 * x.abs().max()


def test_training_logs_one_loss_per_network_step_and_writes_a_bundle(teacher_dir, tmp_path):
    bundle = train_sfd(tiny_config(nfe=2), load_teacher(teacher_dir), tmp_path, progress=False)
    records = log_records(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    # NFE 2 with AFS: steps 1 and 2 call the network (step 0 is analytical)
    assert all({"loss_step1", "loss_step2"} <= r.keys() and "loss_step0" not in r for r in records)
    assert records[0]["lr"] == 1e-3 and records[-1]["lr"] == pytest.approx(1e-4)  # x0.1 at half of training
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    assert manifest["method"] == "sfd" and manifest["renoise"] == "none" and list(manifest["nfe"]) == ["2"]
    sigmas = manifest["nfe"]["2"]["sigmas"]
    assert manifest["nfe"]["2"]["afs"] is True and len(sigmas) == 4
    # the tiny teacher's schedule (linear betas from 1e-4) stops at sigma 0.01 > 0.006: clipped to it
    assert sigmas[0] == 80.0 and sigmas[-1] == pytest.approx(load_teacher(teacher_dir).denoiser.schedule.sigma_min)
    student = load_bundle(bundle)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = student.generate(noise, student.cond([0, 1, 2]), nfe=2)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    with pytest.raises(UserError, match="serves NFE 2, not 4"):
        student.generate(noise, student.cond([0, 1, 2]), nfe=4)


def test_untrained_student_reproduces_its_teacher_euler_sampler(teacher_dir, tmp_path):
    """Zero steps of training: the bundle's sampler is the teacher's Euler on the student grid (AFS first)."""
    from distill.bundle import sample_sfd

    teacher = load_teacher(teacher_dir)
    bundle = load_bundle(train_sfd(tiny_config(steps=1, lr=0.0), teacher, tmp_path, progress=False))
    sigmas = bundle.sigmas(2)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = teacher.cond(labels=[0, 1, 2])
    expected = sample_sfd(teacher.denoiser, noise * sigmas[0].item(), sigmas, cond, afs=True)
    torch.testing.assert_close(bundle.generate(noise, bundle.cond([0, 1, 2]), 2), expected, rtol=1e-5, atol=1e-5)


def test_resume_after_a_crash_is_exact(teacher_dir, tmp_path, monkeypatch):
    import distill.sfd.train as sfd  # where the loop looks optimizer_step up

    straight = train_sfd(tiny_config(), load_teacher(teacher_dir), tmp_path / "a", progress=False)
    real_step, calls = sfd.optimizer_step, []

    def crash_in_step_2(*args, **kw):  # NFE 2 with AFS: two optimizer steps per batch; the 5th is in step 2
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        return real_step(*args, **kw)

    monkeypatch.setattr(sfd, "optimizer_step", crash_in_step_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_sfd(tiny_config(), load_teacher(teacher_dir), tmp_path / "b", progress=False)
    monkeypatch.setattr(sfd, "optimizer_step", real_step)
    resumed = train_sfd(tiny_config(), load_teacher(teacher_dir), tmp_path / "b", progress=False)
    wa, wb = unet_weights(straight), unet_weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["loss_l1"] for r in log_records(tmp_path / "a")] == [r["loss_l1"] for r in log_records(tmp_path / "b")]
    # steps changes the LR drop, so unlike DMD2 it may not change on resume
    with pytest.raises(UserError, match=r"different config \(steps\)"):
        train_sfd(tiny_config(steps=8), load_teacher(teacher_dir), tmp_path / "b", progress=False)


def test_sigma_range_outside_the_teacher_is_a_clear_error(teacher_dir, tmp_path):
    teacher = load_teacher(teacher_dir)
    top = teacher.denoiser.schedule.sigma_max
    with pytest.raises(UserError, match="the teacher's schedule reaches sigma .* sigma_min and sigma_max must lie"):
        train_sfd(tiny_config(sigma_max=top * 2), teacher, tmp_path, progress=False)
    with pytest.raises(UserError, match="must lie inside it .got 1e-05 "):
        train_sfd(tiny_config(sigma_min=1e-5), teacher, tmp_path, progress=False)


@pytest.mark.parametrize("case", ["nfe_7", "nfe_for_dmd2", "method_mismatch", "bad_set", "nfes_not_list",
                                  "source_without_nfe_1", "nfe_with_sfd_v"])
def test_run_cli_bad_input_is_one_clear_line(case, teacher_dir, tmp_path, capsys):
    argv = {"nfe_7": ["--method", "sfd", "--nfe", "7"],
            "nfe_for_dmd2": ["--nfe", "4"],
            "method_mismatch": ["--method", "sfd", "--preset", "digits-1step"],
            "bad_set": ["--method", "sfd", "--set", "gan_g_weight=0.1"],
            "nfes_not_list": ["--method", "sfd", "--set", "nfes=4"],
            "source_without_nfe_1": ["--method", "sfd", "--nfe", "4", "--set", "source=somewhere"],
            "nfe_with_sfd_v": ["--preset", "digits-sfd-v", "--nfe", "3"]}[case]
    code, out, err = run_main(run_cli.main, argv + ["--out", str(tmp_path / "o"), "--teacher", str(teacher_dir)],
                              capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    expected = {"nfe_7": "NFE 2, 3, 4, 5", "nfe_for_dmd2": "--nfe is for --method sfd",
                "method_mismatch": "sfd presets: digits-sfd, digits-sfd-v, pixel-sfd", "bad_set": "gan_g_weight",
                "nfes_not_list": "nfes must be a list", "source_without_nfe_1": "second stage only",
                "nfe_with_sfd_v": "leave out --nfe"}[case]
    assert expected in err


def test_run_cli_sfd_end_to_end(teacher_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_main(run_cli.main, ["--method", "sfd", "--preset", "pixel-sfd", "--teacher",
                                                str(teacher_dir), "--nfe", "3", "--steps", "2", "--batch-size", "4",
                                                "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "sfd" and config["sfd"]["nfe"] == 3
    assert load_bundle(out / "student").nfes == [3]
    assert (out / "losses.png").exists() and (out / "samples.png").exists()
    assert "export.trt --bundle" in stdout and "--nfe 3" in stdout


# ---- SFD-v: one student for several NFEs ----------------------------------------------------------------------


def test_nfe_conditioned_student_starts_as_its_teacher(teacher_dir):
    from distill.sfd.nfe_condition import NFEConditioned, NFEEmbedding, time_embed_dim

    teacher = load_teacher(teacher_dir)
    student = NFEConditioned(teacher.denoiser.net, NFEEmbedding(time_embed_dim(teacher.denoiser.net)))
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t, labels = torch.tensor([10.0, 500.0, 990.0]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        plain = teacher.denoiser.net(x, t, class_labels=labels)
        for nfe in (2, 5):
            torch.testing.assert_close(student(x, t, nfe=torch.full((3,), nfe), class_labels=labels), plain)
        student.embedding.mlp[-1].bias.fill_(0.1)  # once trained, the step count changes the output
        assert not torch.allclose(student(x, t, nfe=torch.full((3,), 2), class_labels=labels), plain)


def test_sfd_v_trains_one_student_for_several_nfes(teacher_dir, tmp_path):
    from distill.sfd.nfe_condition import WEIGHTS_NAME

    bundle_dir = train_sfd(tiny_config(nfes=(2, 3), steps=6), load_teacher(teacher_dir), tmp_path, progress=False)
    records = log_records(tmp_path)
    assert {r["nfe"] for r in records} == {2, 3}  # both drawn within six batches (seeded)
    manifest = json.loads((bundle_dir / MANIFEST_NAME).read_text())
    assert manifest["method"] == "sfd-v" and sorted(manifest["nfe"]) == ["2", "3"]
    assert manifest["nfe_condition"]["weights"] == WEIGHTS_NAME and (bundle_dir / WEIGHTS_NAME).exists()
    student = load_bundle(bundle_dir)
    assert student.nfes == [2, 3]
    assert student.denoiser.net.embedding.mlp[-1].weight.abs().sum() > 0  # the embedding trained
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for nfe in (2, 3):
        assert torch.isfinite(student.generate(noise, student.cond([0, 1]), nfe)).all()
    (bundle_dir / WEIGHTS_NAME).unlink()
    with pytest.raises(UserError, match="NFE embedding.*missing"):
        load_bundle(bundle_dir)


# ---- the second stage: one NFE ------------------------------------------------------------------------------------


def test_perceptual_loss_is_zero_only_for_equal_images_and_sees_edges():
    from distill.sfd import perceptual_loss

    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert perceptual_loss(x, x) == 0
    shifted = torch.roll(x, 1, dims=-1)  # same pixel statistics, edges moved
    assert perceptual_loss(x, shifted) > 0.1


@pytest.mark.parametrize("source_kind", ["sfd", "sfd-v"])
def test_one_step_stage_from_an_sfd_student(teacher_dir, tmp_path, source_kind):
    teacher = load_teacher(teacher_dir)
    cfg = tiny_config(nfe=5, steps=1) if source_kind == "sfd" else tiny_config(nfes=(3, 5), steps=2)
    source = train_sfd(cfg, teacher, tmp_path / "source", progress=False)
    from distill.sfd import train_sfd_one_step

    one = train_sfd_one_step(tiny_config(nfe=1, source=str(source), steps=3), tmp_path / "one", progress=False)
    manifest = json.loads((one / MANIFEST_NAME).read_text())
    assert manifest["method"] == "sfd-1" and list(manifest["nfe"]) == ["1"]
    assert len(manifest["nfe"]["1"]["sigmas"]) == 3  # AFS + one network call
    records = log_records(tmp_path / "one")
    assert [r["step"] for r in records] == [0, 1, 2] and all(r["loss_l1"] > 0 for r in records)
    student = load_bundle(one)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(student.generate(noise, student.cond([0, 1]), 1)).all()
    with pytest.raises(UserError, match="serves NFE"):
        train_sfd_one_step(tiny_config(nfe=1, source=str(source), source_nfe=4), tmp_path / "x", progress=False)


def test_one_step_cli_needs_a_source(teacher_dir, tmp_path, capsys):
    code, out, err = run_main(run_cli.main, ["--method", "sfd", "--nfe", "1", "--teacher", str(teacher_dir),
                                             "--preset", "pixel-sfd", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--source DIR" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(teacher_dir, tmp_path):
    """Two CPU processes (torchrun, gloo DDP) with batch 2 each train the same SFD student as one process with
    batch 4: the noise, labels and NFE come from one stream and each process keeps its slice."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from .test_dmd2 import REPO

    common = ["--preset", "pixel-sfd", "--teacher", str(teacher_dir), "--nfe", "2", "--steps", "3",
              "--set", "lr=1e-3", "--eval-samples", "0", "--no-progress", "--cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
              "-m", "distill.run"]
    two = subprocess.run(launch + common + ["--out", str(tmp_path / "two"), "--batch-size", "2"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "distill.run"] + common + ["--out", str(tmp_path / "one"),
                                                                          "--batch-size", "4"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "student" / MANIFEST_NAME).read_text())["training"]["processes"] == 2
    w1, w2 = unet_weights(tmp_path / "one" / "student"), unet_weights(tmp_path / "two" / "student")
    start = load_file(teacher_dir / "unet" / "diffusion_pytorch_model.safetensors")
    moved = sum((w1[k] - start[k]).abs().sum().item() for k in w1)
    diff = sum((w1[k] - w2[k]).abs().sum().item() for k in w1)
    assert moved > 0 and diff < 1e-3 * moved, (moved, diff)  # summed, as in the DMD2 test (Adam's +-lr steps)


def test_gradient_checkpointing_trains_the_same_student(teacher_dir, tmp_path):
    teacher = load_teacher(teacher_dir)
    plain = train_sfd(tiny_config(steps=2), teacher, tmp_path / "plain", progress=False)
    recomputed = train_sfd(tiny_config(steps=2, gradient_checkpointing=True), teacher, tmp_path / "recomputed",
                           progress=False)
    a, b = unet_weights(plain), unet_weights(recomputed)
    start = teacher.denoiser.net.network.state_dict()
    assert sum((a[k] - start[k]).abs().sum().item() for k in a) > 0
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
