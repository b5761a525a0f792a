"""DMD2 training: its losses, backward simulation against the bundle's loop, exact resumption (in-process and
after SIGKILL), errors, LoRA, the text-to-image presets and sampling a student bundle. Tiny models only."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from distill import run as run_cli
from distill import sample as sample_cli
from distill.bundle import MANIFEST_NAME, load_bundle
from distill.checkpoint import load_state
from distill.dmd2 import DMD2Config, draw_batch, lr_at, student_input, train_dmd2
from distill.dmd2.losses import WEIGHTINGS, denoising_loss, dm_loss, gan_d_loss, gan_g_loss
from distill.errors import UserError
from distill.teachers import load_teacher
from distill.teachers.denoiser import vp_output_to_x0, vp_target

from .conftest import make_tiny_pixel_dir
from .tiny_sd import IMAGE_SIZE, make_tiny_sd_dir

REPO = Path(__file__).resolve().parent.parent


# ---- helpers ------------------------------------------------------------------------------------------------


def run_main(main, argv, capsys):
    """Run a CLI main; return (exit code, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def real_data(n=12, seed=0, nan=False):
    """Random class-labelled 'real' images in [-1, 1] for the tiny 3-class, 1-channel 8x8 teacher."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand((n, 1, 8, 8), generator=g) * 2 - 1
    if nan:
        images = torch.full_like(images, float("nan"))
    return images, torch.arange(n) % 3


def small_config(**kw) -> DMD2Config:
    base = dict(steps=6, batch_size=4, checkpoint_every=3, dfake_gen_update_ratio=2, lr_generator=1e-3,
                lr_fake=1e-3, warmup=2, log_every=1, gan_g_weight=0.1, gan_d_weight=0.1)
    return DMD2Config(**(base | kw))


def unet_weights(bundle_dir: Path) -> dict:
    return load_file(str(Path(bundle_dir) / "unet" / "diffusion_pytorch_model.safetensors"))


def log_records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def write_png(path: Path, rng: np.random.Generator, shape) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)


def make_class_folder(path: Path, per_class=2, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for c in range(3):
        for i in range(per_class):
            write_png(path / str(c) / f"{i}.png", rng, (8, 8))
    return path


class Recorder(torch.nn.Module):
    """Wraps a denoiser and records every input (x, sigma) it is called with."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser
        self.calls = []

    def forward(self, x, sigma, cond=None):
        self.calls.append((x.clone(), sigma.clone()))
        return self.denoiser(x, sigma, cond)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_tiny_pixel_dir(tmp_path_factory.mktemp("dmd2") / "teacher", num_classes=3)


@pytest.fixture
def teacher(teacher_dir):
    return load_teacher(teacher_dir)


THREE_STEPS = (999, 666, 333)


@pytest.fixture(scope="module")
def student_3step(teacher_dir, tmp_path_factory):
    """A 3-step pixel student (serves NFE 1 and 3), two steps of training without the GAN."""
    cfg = DMD2Config(steps=2, batch_size=4, student_timesteps=THREE_STEPS, use_gan=False, dfake_gen_update_ratio=1,
                     lr_generator=1e-3, lr_fake=1e-3, warmup=0)
    return train_dmd2(cfg, load_teacher(teacher_dir), None, tmp_path_factory.mktemp("student3"), progress=False)


# ---- 1-3: the losses ------------------------------------------------------------------------------------------


def test_dm_loss_gradient_is_the_normalised_score_difference():
    g = torch.Generator().manual_seed(0)
    n, shape = 3, (2, 4, 5)
    x = torch.randn((n, *shape), generator=g, requires_grad=True)
    real_x0 = torch.randn((n, *shape), generator=g)
    fake_x0 = torch.randn((n, *shape), generator=g)
    dm_loss(x, real_x0, fake_x0).backward()
    norm = (x.detach() - real_x0).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (fake_x0 - real_x0) / norm / x.numel()
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-9)
    # Samples are normalised each by their own distance: scaling one sample's gap rescales only its gradient.
    x2 = x.detach().clone().requires_grad_(True)
    real2 = real_x0.clone()
    real2[0] = x2.detach()[0] - 10 * (x2.detach()[0] - real_x0[0])
    dm_loss(x2, real2, fake_x0).backward()
    torch.testing.assert_close(x2.grad[1:], expected[1:], rtol=1e-5, atol=1e-9)
    assert not torch.allclose(x2.grad[0], expected[0])


def test_dm_loss_is_zero_when_fake_equals_real():
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, 1, 4, 4), generator=g, requires_grad=True)
    real_x0 = torch.randn((2, 1, 4, 4), generator=g)
    loss = dm_loss(x, real_x0, real_x0.clone())
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_dm_loss_zeroes_nan_and_inf():
    """x == real_x0 for a sample makes its normaliser 0: g is inf (fake != real) or nan (fake == real)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn((3, 1, 4, 4), generator=g, requires_grad=True)
    real_x0 = torch.randn((3, 1, 4, 4), generator=g)
    fake_x0 = torch.randn((3, 1, 4, 4), generator=g)
    real_x0[0] = x.detach()[0]  # inf
    real_x0[1] = x.detach()[1]
    fake_x0[1] = x.detach()[1]  # 0 / 0 = nan
    loss = dm_loss(x, real_x0, fake_x0)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(x.grad[:2], torch.zeros_like(x.grad[:2]))
    norm = (x.detach()[2] - real_x0[2]).abs().mean()
    torch.testing.assert_close(x.grad[2], (fake_x0[2] - real_x0[2]) / norm / x.numel(), rtol=1e-5, atol=1e-9)
    # The loss is 0.5 * mean(g^2) over the finite part: the zeroed samples add nothing.
    torch.testing.assert_close(loss, 0.5 * ((fake_x0[2] - real_x0[2]) / norm).pow(2).sum() / x.numel())


def test_gan_losses_match_softplus_closed_forms():
    fake = torch.tensor([-3.0, -0.5, 0.0, 2.0, 7.0])
    real = torch.tensor([1.5, -2.0, 0.25])

    def softplus(z):
        return torch.log1p(torch.exp(z.double()))

    torch.testing.assert_close(gan_g_loss(fake).double(), softplus(-fake).mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(gan_d_loss(real, fake).double(), softplus(fake).mean() + softplus(-real).mean(),
                               rtol=1e-6, atol=0)
    # -log sigmoid(0) = log 2: the non-saturating loss at an undecided discriminator.
    assert gan_g_loss(torch.zeros(4)).item() == pytest.approx(np.log(2))
    assert gan_d_loss(torch.zeros(2), torch.zeros(3)).item() == pytest.approx(2 * np.log(2))
    # The discriminator loss falls when real logits rise and fake ones fall (argument order matters).
    assert gan_d_loss(torch.tensor([5.0]), torch.tensor([-5.0])) < 0.02 < gan_d_loss(torch.tensor([-5.0]),
                                                                                    torch.tensor([5.0]))
    assert gan_g_loss(torch.tensor([5.0])) < 0.01 < gan_g_loss(torch.tensor([-5.0]))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoising_loss_equals_the_teachers_own_mse(prediction_type):
    """weighting(sigma) * |x0 error|^2 = |model-space error|^2 for a VP model of each prediction type."""
    g = torch.Generator().manual_seed(3)
    sigma = torch.tensor([0.03, 0.4, 1.0, 5.0, 40.0, 150.0], dtype=torch.float64)
    n = len(sigma)
    x0 = torch.randn((n, 1, 4, 4), generator=g, dtype=torch.float64)
    eps = torch.randn((n, 1, 4, 4), generator=g, dtype=torch.float64)
    s = sigma.reshape(-1, 1, 1, 1)
    x = x0 + s * eps  # the VE input
    target = vp_target(x0, eps, s, prediction_type)
    out = target + 0.3 * torch.randn(target.shape, generator=g, dtype=torch.float64)  # an imperfect model output
    pred_x0 = vp_output_to_x0(out, x, s, prediction_type)
    weighting = WEIGHTINGS[prediction_type]
    for i in range(n):  # each noise level on its own, so a wrong weighting at any sigma shows
        model_mse = F.mse_loss(out[i], target[i]).item()
        loss = denoising_loss(pred_x0[i:i + 1], x0[i:i + 1], sigma[i:i + 1], weighting).item()
        assert loss == pytest.approx(model_mse, rel=1e-4), (prediction_type, sigma[i].item())
    assert denoising_loss(pred_x0, x0, sigma, weighting).item() == pytest.approx(F.mse_loss(out, target).item(),
                                                                                 rel=1e-4)
    # The other weightings do not give the teacher's loss (the check above can fail).
    for other, w in WEIGHTINGS.items():
        if other != prediction_type:
            assert denoising_loss(pred_x0, x0, sigma, w).item() != pytest.approx(F.mse_loss(out, target).item(),
                                                                                 rel=1e-2)


# ---- 4: backward simulation ------------------------------------------------------------------------------------


def test_backward_simulation_feeds_what_the_bundle_loop_feeds(teacher, student_3step):
    """student_input gives each sample exactly the generator's input at its step k of the shipped bundle's
    sampling loop, and a batch trains every step in equal shares."""
    cfg = DMD2Config(batch_size=6, student_timesteps=THREE_STEPS, use_gan=False)
    bundle = load_bundle(student_3step)
    schedule = teacher.denoiser.schedule
    train_sigmas = schedule.t_to_sigma(torch.tensor(THREE_STEPS, dtype=torch.float64))  # as train_dmd2 computes them
    assert torch.equal(bundle.sigmas(3), train_sigmas)
    recorder = Recorder(bundle.denoiser)
    bundle.denoiser = recorder
    batch = draw_batch(cfg, teacher, None, None, 3, torch.Generator().manual_seed(0), "cpu")
    assert sorted(batch.k.tolist()) == [0, 0, 1, 1, 2, 2] and batch.renoise.shape[0] == 2
    x_in = student_input(recorder, train_sigmas, batch, cfg).float()
    # two simulated steps, no grad, each only on the samples that go past it
    assert [len(x) for x, _ in recorder.calls] == [4, 2]
    recorder.calls.clear()
    out = bundle.generate(batch.noise, batch.cond, nfe=3, fresh_noise=batch.renoise)
    assert len(recorder.calls) == 3 and out.shape == batch.noise.shape
    for j, k in enumerate(batch.k.tolist()):
        x_loop, _ = recorder.calls[k]
        # the loop runs the whole batch and the simulation a part of it: equal up to float32 rounding, which
        # depends on the batch size and the machine, so the tolerance scales with the input (up to σ_max·|z|)
        error = (x_in[j] - x_loop[j]).abs().max()
        assert error <= 1e-5 * x_loop[j].abs().max(), (j, k, error)
        if k > 0:  # the simulated input is not plain noise: the student's steps went into it
            assert not torch.allclose(x_in[j], batch.noise[j] * train_sigmas[k].item(), atol=1e-3)
        else:
            assert torch.equal(x_in[j], batch.noise[j] * train_sigmas[0].item())


def test_steps_probe_runs_the_bundle_loop_and_swaps_one_step(teacher, student_3step):
    """benchmarks.steps_probe's loop is the shipped loop; putting the teacher at step 1 leaves step 0 as it was
    and changes every later output."""
    from benchmarks.steps_probe import loop

    bundle = load_bundle(student_3step)
    sigmas, g = bundle.sigmas(3), torch.Generator().manual_seed(0)
    noise, renoise = torch.randn(4, 1, 8, 8, generator=g), torch.randn(2, 4, 1, 8, 8, generator=g)
    cond = bundle.cond(torch.tensor([0, 1, 2, 0]))
    with torch.no_grad():
        student = loop([bundle.denoiser] * 3, noise * sigmas[0].item(), sigmas, cond, renoise)
        swapped = loop([bundle.denoiser, teacher.denoiser, bundle.denoiser], noise * sigmas[0].item(), sigmas, cond,
                       renoise)
        shipped = bundle.generate(noise, cond, 3, fresh_noise=renoise)
    assert torch.equal(student[-1], shipped)
    assert torch.equal(swapped[0], student[0])
    assert all(not torch.allclose(a, b, atol=1e-4) for a, b in zip(swapped[1:], student[1:]))


def test_steps_probe_refuses_what_it_cannot_measure(student_3step, tmp_path, capsys):
    from benchmarks.steps_probe import main

    for path, message in ((tmp_path, "is not a student bundle"), (student_3step, "is not the digits teacher")):
        with pytest.raises(SystemExit) as e:
            main([str(path)])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_generator_starts_from_a_student_of_the_same_teacher_only(teacher, student_3step, tmp_path):
    """init_generator: a 2-step student trained at LR 0 ships the 3-step student's weights unchanged (they
    differ from the teacher's); a teacher of another architecture refuses that student with a clear error."""
    cfg = DMD2Config(steps=1, batch_size=2, student_timesteps=(999, 499), use_gan=False, lr_generator=0.0,
                     lr_fake=0.0, warmup=0, init_generator=str(student_3step))
    out = train_dmd2(cfg, teacher, None, tmp_path / "from_student", progress=False)
    shipped = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    start = load_file(student_3step / "unet" / "diffusion_pytorch_model.safetensors")
    assert shipped.keys() == start.keys() and all(torch.equal(shipped[k], start[k]) for k in start)
    teacher_weights = teacher.denoiser.net.unet.state_dict()
    assert any(not torch.equal(start[k], teacher_weights[k]) for k in start)
    unconditional = load_teacher(make_tiny_pixel_dir(tmp_path / "unconditional"))  # no class embedding
    with pytest.raises(UserError, match="not a student of this teacher"):
        train_dmd2(cfg, unconditional, None, tmp_path / "other", progress=False)


# ---- 5-8: resumption, damaged states, NaN --------------------------------------------------------------------


@pytest.mark.parametrize("variant", [
    dict(),
    dict(student_timesteps=(999, 499), ema_decay=0.5, fake_per_step=True),  # backward simulation, EMA, step table
])
@pytest.mark.parametrize("stop", ["fewer_steps", "crash"])
def test_resume_is_exact(teacher, tmp_path, capsys, monkeypatch, variant, stop):
    data = real_data()
    cfg = small_config(**variant)
    straight = train_dmd2(cfg, teacher, data, tmp_path / "a", progress=False)

    out = tmp_path / "b"
    if stop == "fewer_steps":  # 3 steps, then the same call with steps=6
        train_dmd2(small_config(**variant, steps=3), teacher, data, out, progress=False)
    else:  # a crash in step 4, after the step-3 checkpoint, with step 3 already logged
        import distill.dmd2.train as dmd2  # where the loop looks fake_step up

        real_fake_step, calls = dmd2.fake_step, []

        def crash_at_step_4(*args, **kw):
            calls.append(1)
            if len(calls) == 5:
                raise RuntimeError("simulated crash")
            return real_fake_step(*args, **kw)

        monkeypatch.setattr(dmd2, "fake_step", crash_at_step_4)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train_dmd2(cfg, teacher, data, out, progress=False)
        monkeypatch.setattr(dmd2, "fake_step", real_fake_step)
        assert [r["step"] for r in log_records(out)] == [0, 1, 2, 3]  # the stopped run logged past its checkpoint
    assert load_state(out / "state.safetensors")["step"] == 3
    capsys.readouterr()
    resumed = train_dmd2(cfg, teacher, data, out, progress=False)
    assert "resuming from step 3" in capsys.readouterr().out

    a, b = unet_weights(straight), unet_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], t) for k, t in teacher.denoiser.net.unet.state_dict().items())  # it trained
    sa, sb = load_state(tmp_path / "a" / "state.safetensors"), load_state(out / "state.safetensors")
    for k in sa["fake"]:
        assert torch.equal(sa["fake"][k], sb["fake"][k]), k
    assert sa["counts"] == sb["counts"] == {"generator_updates": 3, "fake_updates": 6}

    def strip(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    ra, rb = log_records(tmp_path / "a"), log_records(out)
    assert [r["step"] for r in rb] == [0, 1, 2, 3, 4, 5]
    assert strip(ra) == strip(rb)
    training = json.loads((resumed / MANIFEST_NAME).read_text())["training"]
    assert training["steps_done"] == 6 and training["fake_updates"] == 6 and training["generator_updates"] == 3


def test_resume_survives_a_torn_last_log_line(teacher, tmp_path):
    """A crash mid-write (power loss, disk full) can leave the log's last line torn: resuming drops it."""
    data = real_data()
    train_dmd2(small_config(steps=2, checkpoint_every=2), teacher, data, tmp_path, progress=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "k": 0, "loss_dm": 0.1}\n{"step": 3, "k": 0, "loss_d')
    train_dmd2(small_config(steps=4, checkpoint_every=2), teacher, data, tmp_path, progress=False)
    records = log_records(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert "loss_fake" in records[2]  # the step-2 line is the resumed run's, not the stale one


def test_sigkill_then_rerun_resumes(teacher_dir, tmp_path):
    data = make_class_folder(tmp_path / "data")
    out = tmp_path / "out"
    steps = 40
    cmd = [sys.executable, "-m", "distill.run", "--preset", "pixel", "--teacher", str(teacher_dir), "--data",
           str(data), "--out", str(out), "--steps", str(steps), "--batch-size", "4", "--set", "checkpoint_every=2",
           "--eval-samples", "0", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    state = out / "state.safetensors"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        try:
            while not state.exists():  # kill as soon as the first checkpoint appears
                assert proc.poll() is None, "the first run ended before writing a checkpoint:\n" + (
                    tmp_path / "first.log").read_text()
                assert time.monotonic() < deadline, "no checkpoint within 120 s"
                time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_state(state)["step"]
    assert 2 <= killed_at < steps and killed_at % 2 == 0  # the kill landed mid-run, on a checkpoint
    assert not (out / "student").exists()

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resuming from step {killed_at}" in second.stdout
    training = json.loads((out / "student" / MANIFEST_NAME).read_text())["training"]
    assert training["steps_done"] == steps and training["fake_updates"] == steps
    assert training["generator_updates"] == steps // 5  # the pixel preset's two time-scale ratio
    assert [r["step"] for r in log_records(out)] == [0, 10, 20, 30, 39]  # every logged step once
    assert load_state(state)["step"] == steps
    load_bundle(out / "student")


def test_damaged_state_is_a_clear_error(teacher, tmp_path):
    (tmp_path / "state.safetensors").write_bytes(b"\x00garbage, not a safetensors file" * 8)
    with pytest.raises(UserError, match="unreadable or not a fewstep state") as e:
        train_dmd2(small_config(steps=2), teacher, real_data(), tmp_path, progress=False)
    assert str(tmp_path / "state.safetensors") in str(e.value)


def test_resume_with_a_different_config_names_the_field(teacher, tmp_path):
    data = real_data()
    train_dmd2(small_config(steps=2), teacher, data, tmp_path, progress=False)
    before = load_state(tmp_path / "state.safetensors")
    with pytest.raises(UserError, match=r"different config \(lr_generator\)"):
        train_dmd2(small_config(steps=4, lr_generator=5e-4), teacher, data, tmp_path, progress=False)
    with pytest.raises(UserError, match=r"different config \(dfake_gen_update_ratio, gan_g_weight\)"):
        train_dmd2(small_config(steps=4, dfake_gen_update_ratio=3, gan_g_weight=0.2), teacher, data, tmp_path,
                   progress=False)
    after = load_state(tmp_path / "state.safetensors")
    assert after["step"] == 2
    assert all(torch.equal(before["generator"][k], after["generator"][k]) for k in before["generator"])


def test_a_state_older_than_a_setting_resumes_when_the_setting_keeps_its_default(teacher, tmp_path):
    """A state written before a setting existed (its saved config lacks the key) resumes as long as the run keeps
    that setting's default, the older version's behaviour; asking for another value names the setting."""
    from distill.checkpoint import save_state

    data = real_data()
    train_dmd2(small_config(steps=2), teacher, data, tmp_path, progress=False)
    state = load_state(tmp_path / "state.safetensors")
    del state["config"]["anchor_gan"], state["config"]["fake_per_step"]  # as an older fewstep wrote it
    save_state(tmp_path / "state.safetensors", state)
    with pytest.raises(UserError, match=r"different config \(fake_per_step, student_timesteps\)"):
        train_dmd2(small_config(steps=4, student_timesteps=(999, 499), fake_per_step=True), teacher, data, tmp_path,
                   progress=False)
    train_dmd2(small_config(steps=4), teacher, data, tmp_path, progress=False)
    assert load_state(tmp_path / "state.safetensors")["step"] == 4


def test_state_of_other_networks_is_a_clear_error(teacher, tmp_path):
    cfg = small_config(steps=2, use_gan=False)
    train_dmd2(cfg, teacher, None, tmp_path, progress=False)
    other = load_teacher(make_tiny_pixel_dir(tmp_path / "uncond", num_classes=None))  # no class embedding
    with pytest.raises(UserError, match="does not match these networks"):
        train_dmd2(small_config(steps=4, use_gan=False), other, None, tmp_path, progress=False)


def test_nan_loss_stops_and_keeps_the_checkpoint(teacher, tmp_path):
    train_dmd2(small_config(steps=4, checkpoint_every=2), teacher, real_data(), tmp_path, progress=False)
    before = load_state(tmp_path / "state.safetensors")
    with pytest.raises(UserError) as e:
        train_dmd2(small_config(steps=8, checkpoint_every=2), teacher, real_data(nan=True), tmp_path, progress=False)
    message = str(e.value)
    assert message.startswith("step 4: the gan_d loss is nan"), message  # real data only reach the GAN head
    assert f"the checkpoint at step 4 in {tmp_path / 'state.safetensors'} is kept" in message
    after = load_state(tmp_path / "state.safetensors")
    assert after["step"] == 4
    for part in ("generator", "fake"):
        assert all(torch.equal(before[part][k], after[part][k]) for k in before[part]), part
    assert max(r["step"] for r in log_records(tmp_path)) == 3


def test_lr_schedules():
    cfg = small_config(steps=401, warmup=100, lr_schedule="cosine", lr_min_ratio=0.1)
    assert lr_at(0, 1.0, cfg) == pytest.approx(0.01) and lr_at(99, 1.0, cfg) == 1.0  # warm-up, then the peak
    assert lr_at(250, 1.0, cfg) == pytest.approx(0.55) and lr_at(400, 1.0, cfg) == pytest.approx(0.1)
    assert lr_at(400, 1.0, small_config(steps=401, warmup=100)) == 1.0  # constant: the reference's schedule


def test_anchored_steps_learn_the_teacher_and_stay_out_of_the_fake_score(teacher, monkeypatch, tmp_path):
    """anchor_sigma: the rows of the low-noise step (here the last of three) are trained towards the frozen
    teacher's own x0 on the very input the generator got, and the fake score only ever sees the other steps'
    outputs; every step still gets its equal share of the batch."""
    import distill.dmd2.train as dmd2  # the loop: fake_step, generator_step
    import distill.dmd2.updates as updates  # the generator update: anchor_loss

    sigmas = teacher.denoiser.schedule.t_to_sigma(torch.tensor(THREE_STEPS, dtype=torch.float64))
    cfg = small_config(batch_size=6, student_timesteps=THREE_STEPS, anchor_sigma=float(sigmas[2]) * 1.01)
    seen = {"fake_k": [], "anchor": [], "gen": []}
    original_fake, original_gen, original_anchor = dmd2.fake_step, dmd2.generator_step, updates.anchor_loss

    def fake_step(nets, opt, scaler, batch, x_gen, *args, **kw):
        assert len(x_gen) == len(batch.k) == len(batch.sigma_fake) == len(batch.cond["class_labels"])
        seen["fake_k"].append(batch.k.tolist())
        return original_fake(nets, opt, scaler, batch, x_gen, *args, **kw)

    def generator_step(nets, opt, scaler, batch, x_in, sigma_in, *args):
        seen["gen"].append((x_in.clone(), sigma_in.clone(), batch.cond["class_labels"].clone(), batch.k.clone()))
        return original_gen(nets, opt, scaler, batch, x_in, sigma_in, *args)

    def anchor_loss(student_x0, teacher_x0):
        seen["anchor"].append((student_x0.detach().clone(), teacher_x0.clone()))
        return original_anchor(student_x0, teacher_x0)

    monkeypatch.setattr(dmd2, "fake_step", fake_step)
    monkeypatch.setattr(dmd2, "generator_step", generator_step)
    monkeypatch.setattr(updates, "anchor_loss", anchor_loss)
    out = train_dmd2(cfg, teacher, real_data(), tmp_path, progress=False)
    assert len(seen["fake_k"]) == cfg.steps and all(sorted(k) == [0, 0, 1, 1] for k in seen["fake_k"])
    assert len(seen["anchor"]) == len(seen["gen"]) == 3  # generator updates at steps 0, 2, 4
    records = [r for r in log_records(tmp_path) if "loss_anchor" in r]
    assert len(records) == 3 and all(r["loss_anchor"] >= 0 for r in records)
    with torch.no_grad():
        for (x_in, sigma_in, labels, k), (student_x0, teacher_x0) in zip(seen["gen"], seen["anchor"]):
            last = k == 2
            assert int(last.sum()) == 2 and torch.all(sigma_in[last] == sigma_in[last][0])
            expected = teacher.denoiser(x_in[last], sigma_in[last], {"class_labels": labels[last]})
            assert torch.allclose(teacher_x0, expected, atol=1e-6) and student_x0.shape == expected.shape
    # the student did move away from the teacher at the last step (the anchor is a loss, not a copy)
    assert not torch.allclose(seen["anchor"][-1][0], seen["anchor"][-1][1], atol=1e-6)
    assert load_bundle(out).manifest["training"]["anchor_sigma"] == cfg.anchor_sigma


def test_anchor_gan_shows_the_anchored_outputs_to_the_gan_but_not_to_the_fake_score(teacher, monkeypatch, tmp_path):
    """anchor_gan: the anchored (last) step's outputs take the generator's GAN loss and are fakes to the GAN
    head, while the fake score's denoising loss still sees only the distribution-matched steps."""
    import distill.dmd2.updates as dmd2  # where the two updates look their losses up

    sigmas = teacher.denoiser.schedule.t_to_sigma(torch.tensor(THREE_STEPS, dtype=torch.float64))
    seen = {"gan_g": [], "gan_d_fake": [], "denoise": []}
    original = {name: getattr(dmd2, name) for name in ("gan_g_loss", "gan_d_loss", "denoising_loss")}

    def gan_g_loss(logits):
        seen["gan_g"].append(len(logits))
        return original["gan_g_loss"](logits)

    def gan_d_loss(logits_real, logits_fake):
        seen["gan_d_fake"].append(len(logits_fake))
        return original["gan_d_loss"](logits_real, logits_fake)

    def denoising_loss(pred_x0, x0, sigma, weighting):
        assert len(pred_x0) == len(x0) == len(sigma)
        seen["denoise"].append(sigma.tolist())
        return original["denoising_loss"](pred_x0, x0, sigma, weighting)

    for name, fn in (("gan_g_loss", gan_g_loss), ("gan_d_loss", gan_d_loss), ("denoising_loss", denoising_loss)):
        monkeypatch.setattr(dmd2, name, fn)
    anchor = float(sigmas[2]) * 1.01
    for flag, gan_rows in ((False, 4), (True, 6)):  # batch 6 over three steps; the last is anchored
        for v in seen.values():
            v.clear()
        cfg = small_config(batch_size=6, student_timesteps=THREE_STEPS, anchor_sigma=anchor, anchor_gan=flag)
        train_dmd2(cfg, teacher, real_data(), tmp_path / str(flag), progress=False)
        assert seen["gan_g"] == [gan_rows] * 3 and seen["gan_d_fake"] == [gan_rows] * cfg.steps
        assert len(seen["denoise"]) == cfg.steps and all(len(s) == 4 for s in seen["denoise"])


def test_step_conditioned_fake_score_starts_as_the_teacher_and_tells_steps_apart(teacher):
    """StepEmbedding: zero at the start (the fake score is the teacher), then a step's vector changes that step's
    predictions only; a forward without steps is an error, not a silent reuse of the last ones."""
    import copy

    from distill.dmd2.fake_score import FakeScore

    fake = FakeScore(copy.deepcopy(teacher.denoiser), None, num_steps=3)
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn((6, 1, 8, 8), generator=g), torch.full((6,), 2.0)
    cond, k = {"class_labels": torch.arange(6) % 3}, torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        plain = teacher.denoiser(x, sigma, cond)
        assert torch.allclose(fake(x, sigma, cond, step=k)[0], plain, atol=1e-6)
        fake.steps.table.weight[1].normal_(generator=g)
        moved = fake(x, sigma, cond, step=k)[0]
    differs = (moved - plain).flatten(1).abs().amax(1) > 1e-4
    assert differs.tolist() == [False, True, False, False, True, False]
    with pytest.raises(RuntimeError, match="without its student steps"):
        fake(x, sigma, cond)


def test_fake_per_step_tells_every_fake_score_call_its_rows_steps(teacher, monkeypatch, tmp_path):
    """fake_per_step: every fake-score forward in training gets one step per row (the generated rows' own, and
    every step in turn for the real images), and training moves the steps' vectors apart."""
    from distill.dmd2.fake_score import FakeScore

    calls, original = [], FakeScore.forward

    def forward(self, x, sigma, cond, logits=True, step=None):
        calls.append((len(x), None if step is None else step.tolist()))
        return original(self, x, sigma, cond, logits=logits, step=step)

    monkeypatch.setattr(FakeScore, "forward", forward)
    cfg = small_config(batch_size=6, student_timesteps=THREE_STEPS, fake_per_step=True)
    train_dmd2(cfg, teacher, real_data(), tmp_path, progress=False)
    assert calls and all(step is not None and len(step) == n for n, step in calls)
    # generator updates: DM and GAN calls on the 6 generated rows; fake updates: 6 generated + 6 real rows
    assert all(step == [0, 1, 2, 0, 1, 2] for n, step in calls if n == 6)
    assert sum(n == 12 for n, _ in calls) == cfg.steps
    assert all(step == [0, 1, 2, 0, 1, 2] * 2 for n, step in calls if n == 12)
    table = load_state(tmp_path / "state.safetensors")["fake"]["steps.table.weight"]
    assert table.shape[0] == 3 and not torch.allclose(table[0], table[1])
    with pytest.raises(UserError, match="needs a multi-step student"):
        train_dmd2(small_config(fake_per_step=True), teacher, real_data(), tmp_path / "one", progress=False)


def test_anchor_settings_that_cannot_work_are_clear_errors(teacher, tmp_path):
    sigmas = teacher.denoiser.schedule.t_to_sigma(torch.tensor(THREE_STEPS, dtype=torch.float64))
    with pytest.raises(UserError, match="would anchor the first student step"):
        train_dmd2(small_config(student_timesteps=THREE_STEPS, anchor_sigma=float(sigmas[0]) + 1), teacher,
                   real_data(), tmp_path, progress=False)
    with pytest.raises(UserError, match="anchor_gan .* needs anchor_sigma > 0"):
        train_dmd2(small_config(anchor_gan=True), teacher, real_data(), tmp_path, progress=False)
    with pytest.raises(UserError, match="anchor_gan .* needs anchor_sigma > 0"):
        train_dmd2(small_config(anchor_gan=True, use_gan=False, anchor_sigma=float(sigmas[2])), teacher, real_data(),
                   tmp_path, progress=False)
    with pytest.raises(UserError, match="batch_size 2 < 3 steps"):
        train_dmd2(small_config(batch_size=2, student_timesteps=THREE_STEPS, anchor_sigma=float(sigmas[2])),
                   teacher, real_data(), tmp_path, progress=False)


def test_selection_ships_the_best_rated_weights_and_survives_a_resume(teacher, tmp_path):
    """select_every: the bundle holds the generator of the best-rated step (here step 4), also when the run was
    stopped after that rating and resumed; the scorer sees the same weights training had at that step."""
    data, ratings = real_data(), iter([3.0, 1.0, 2.0, 5.0, 9.0])
    cfg = small_config(steps=5, warmup=0, checkpoint_every=10, select_every=2, log_every=3)  # ratings: logged too

    def score(generator, sigmas):
        assert not generator.training and sigmas.shape == (1,)
        return next(ratings)

    train_dmd2(cfg, teacher, data, tmp_path / "run", progress=False, score=score)  # rated at 2, 4, 5
    bundle = train_dmd2(dataclasses.replace(cfg, steps=7), teacher, data, tmp_path / "run", progress=False,
                        score=score)  # resumed: rated at 6, 7
    manifest = json.loads((bundle / "fewstep_student.json").read_text())["training"]
    assert (manifest["selected_step"], manifest["selection_score"], manifest["steps_done"]) == (4, 1.0, 7)
    at_4 = train_dmd2(small_config(steps=4, warmup=0), teacher, data, tmp_path / "four", progress=False)
    last = train_dmd2(small_config(steps=7, warmup=0), teacher, data, tmp_path / "seven", progress=False)
    shipped, want, other = unet_weights(bundle), unet_weights(at_4), unet_weights(last)
    assert all(torch.equal(shipped[k], want[k]) for k in want)
    assert not all(torch.equal(shipped[k], other[k]) for k in other)
    records = [r for r in log_records(tmp_path / "run") if "selection_score" in r]
    assert [(r["step"], r["selection_best_step"]) for r in records] == [(1, 2), (3, 4), (4, 4), (5, 4), (6, 4)]


def test_selection_without_a_finite_rating_ships_the_last_step(teacher, tmp_path):
    data = real_data()
    bundle = train_dmd2(small_config(steps=4, warmup=0, select_every=2), teacher, data, tmp_path / "nan",
                        progress=False, score=lambda g, s: float("nan"))
    manifest = json.loads((bundle / "fewstep_student.json").read_text())["training"]
    assert manifest["selected_step"] is None and manifest["selection_score"] is None
    last = train_dmd2(small_config(steps=4, warmup=0), teacher, data, tmp_path / "last", progress=False)
    shipped, want = unet_weights(bundle), unet_weights(last)
    assert all(torch.equal(shipped[k], want[k]) for k in want)


def test_selection_needs_a_scorer_and_no_ema(teacher, tmp_path):
    with pytest.raises(UserError, match="digits teacher only"):
        train_dmd2(small_config(select_every=2), teacher, real_data(), tmp_path, progress=False)
    with pytest.raises(UserError, match="set one of them"):
        train_dmd2(small_config(select_every=2, ema_decay=0.9), teacher, real_data(), tmp_path, progress=False,
                   score=lambda g, s: 0.0)


# ---- 9: CLI errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["no_labels", "bad_png", "unknown_preset", "bad_set", "missing_teacher"])
def test_run_cli_bad_input_is_one_clear_line(case, teacher_dir, tmp_path, capsys):
    data = make_class_folder(tmp_path / "data")
    common = ["--out", str(tmp_path / "out"), "--steps", "2", "--batch-size", "2", "--no-progress"]
    if case == "no_labels":
        uncond = make_tiny_pixel_dir(tmp_path / "uncond", num_classes=None)
        argv, expected = ["--preset", "digits-1step", "--teacher", str(uncond)], "has no class labels"
    elif case == "bad_png":
        (data / "1" / "broken.png").write_bytes(b"definitely not a png")
        argv = ["--preset", "pixel", "--teacher", str(teacher_dir), "--data", str(data)]
        expected = "broken.png (UnidentifiedImageError)"
    elif case == "unknown_preset":
        argv, expected = ["--preset", "nope"], "unknown preset 'nope'; presets: digits-1step"
    elif case == "bad_set":
        argv = ["--preset", "pixel", "--teacher", str(teacher_dir), "--data", str(data), "--set", "lr_gen=1e-4"]
        expected = "--set 'lr_gen=1e-4': expected KEY=VALUE with KEY one of steps"
    else:
        argv, expected = ["--preset", "pixel", "--data", str(data)], "preset pixel needs --teacher PATH"
    code, _, err = run_main(run_cli.main, argv + common, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0]
    assert not (tmp_path / "out" / "state.safetensors").exists()  # failed before any training


def test_pixel_preset_on_an_unconditional_teacher(tmp_path, capsys):
    """The preset the class-label error points unconditional teachers to runs through, pictures included."""
    teacher_dir = make_tiny_pixel_dir(tmp_path / "uncond", num_classes=None)
    rng = np.random.default_rng(1)
    for i in range(4):
        write_png(tmp_path / "flat" / f"{i}.png", rng, (8, 8))
    out = tmp_path / "out"
    argv = ["--preset", "pixel", "--teacher", str(teacher_dir), "--data", str(tmp_path / "flat"), "--out", str(out),
            "--steps", "2", "--batch-size", "2", "--eval-samples", "0", "--no-progress"]
    code, _, err = run_main(run_cli.main, argv, capsys)
    assert code == 0, err
    bundle = load_bundle(out / "student")
    assert bundle.manifest["conditioning"] == {"kind": "none"} and bundle.num_classes is None
    assert Image.open(out / "samples.png").size[0] > 2 * 8 * 10  # student and teacher panels, 10 wide
    assert json.loads((out / "metrics.json").read_text())["preset"] == "pixel"


# ---- 10-11: LoRA, text-to-image ----------------------------------------------------------------------------------


def test_lora_student_is_a_plain_merged_unet(teacher, tmp_path):
    from diffusers import UNet2DModel

    cfg = small_config(steps=2, lora_rank=4, dfake_gen_update_ratio=1)
    bundle_dir = train_dmd2(cfg, teacher, real_data(), tmp_path, progress=False)
    bundle = load_bundle(bundle_dir)  # strict: every key of a plain UNet2DModel, no LoRA leftovers
    unet = bundle.denoiser.net.unet
    assert type(unet) is UNet2DModel
    student, base = unet.state_dict(), teacher.denoiser.net.unet.state_dict()
    assert student.keys() == base.keys() and not any("lora" in k for k in student)
    changed = {k for k in base if not torch.equal(student[k], base[k])}
    assert changed, "the LoRA updates were not merged into the student"
    assert all(k.endswith(".weight") for k in changed)
    # Only LoRA targets moved: the stem, norms and biases are the teacher's.
    assert "conv_in.weight" not in changed and not any("norm" in k or k.endswith(".bias") for k in changed)
    assert any("resnets" in k and "conv1" in k for k in changed) and any("to_q" in k for k in changed)
    x = torch.randn(2, 1, 8, 8)
    cond = bundle.cond([0, 1])
    assert not torch.allclose(bundle.generate(x, cond), teacher.denoiser(x * bundle.sigmas(1)[0].item(),
                                                                         bundle.sigmas(1)[:1].float(), cond))


@pytest.fixture(scope="module")
def captioned_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("captions")
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a red square", "a photo of a cat", "blue noise"]):
        write_png(folder / f"img{i}.png", rng, (IMAGE_SIZE, IMAGE_SIZE, 3))
        (folder / f"img{i}.txt").write_text(caption)
    return folder


@pytest.mark.parametrize("xl", [False, True], ids=["sd15", "sdxl"])
def test_text_to_image_presets_end_to_end(xl, captioned_folder, tmp_path, capsys):
    teacher_dir = make_tiny_sd_dir(tmp_path / "teacher", xl=xl)
    out = tmp_path / "out"
    argv = ["--preset", "sdxl" if xl else "sd15", "--teacher", str(teacher_dir), "--data", str(captioned_folder),
            "--out", str(out), "--steps", "2", "--batch-size", "2", "--eval-samples", "0", "--no-progress"]
    code, stdout, err = run_main(run_cli.main, argv, capsys)
    assert code == 0, err
    bundle = load_bundle(out / "student")
    m = bundle.manifest
    assert m["family"] == "latent" and m["model_class"] == "UNet2DConditionModel"
    assert m["conditioning"]["kind"] == "text" and m["conditioning"]["sdxl"] is xl
    assert m["image"]["latent_shape"] == [4, 8, 8] and m["image"]["height"] == IMAGE_SIZE
    assert bundle.nfes == ([1, 4] if xl else [1])
    assert m["training"]["steps_done"] == 2 and m["training"]["fake_updates"] == 2
    assert m["training"]["generator_updates"] == 1  # two time-scale ratio (sd15 10, sdxl 5) > 2 steps
    assert m["training"]["lora_rank"] == (64 if xl else None)
    teacher = load_teacher(teacher_dir)
    student, base = bundle.denoiser.net.unet.state_dict(), teacher.denoiser.net.unet.state_dict()
    assert student.keys() == base.keys()
    assert any(not torch.equal(student[k], base[k]) for k in base)  # trained (LoRA merged for SDXL)
    cond = teacher.cond(prompts=["a red square", "blue noise"])
    x0 = bundle.generate(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), cond)
    assert x0.shape == (2, 4, 8, 8) and torch.isfinite(x0).all()
    images = teacher.decode(x0)
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)


# ---- 12: sampling a student bundle from the command line --------------------------------------------------------


def test_sample_cli_on_a_student_bundle(student_3step, tmp_path, capsys):
    def sample(*extra, out="x.npz"):
        argv = ["--model", str(student_3step), "--n", "6", "--labels", "cycle", "--out", str(tmp_path / out),
                "--device", "cpu", *extra]
        code, _, err = run_main(sample_cli.main, argv, capsys)
        return code, err, (np.load(tmp_path / out) if code == 0 else None)

    code, err, data = sample()
    assert code == 0, err
    images = data["images"]
    assert images.shape == (6, 8, 8, 1) and images.dtype == np.uint8 and images.std() > 0
    assert data["labels"].tolist() == [0, 1, 2, 0, 1, 2]
    assert (tmp_path / "x.png").exists()

    code, err, _ = sample("--nfe", "2", out="bad.npz")
    assert code == 2 and err.strip() == "error: --nfe 2: this student serves NFE 1, 3"

    for batch_size in ("1", "4"):
        code, err, other = sample("--batch-size", batch_size, out=f"b{batch_size}.npz")
        assert code == 0, err
        assert np.array_equal(other["images"], images), batch_size
    _, _, nfe3 = sample("--nfe", "3", out="n3.npz")
    assert np.array_equal(nfe3["images"], images)  # the default is the student's most steps
    _, _, nfe1 = sample("--nfe", "1", out="n1.npz")
    _, _, seed1 = sample("--seed", "1", out="s1.npz")
    assert not np.array_equal(nfe1["images"], images) and not np.array_equal(seed1["images"], images)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(teacher_dir, tmp_path):
    """Two CPU processes (gloo DDP), batch 2 each, trains the same student as one
    process with batch 4: both draw the same global batch and DDP averages the two halves' gradients."""
    data = make_class_folder(tmp_path / "data")
    common = ["--preset", "pixel", "--teacher", str(teacher_dir), "--data", str(data), "--steps", "3",
              "--set", "dfake_gen_update_ratio=2", "--set", "lr_generator=1e-3", "--set", "lr_fake=1e-3",
              "--set", "warmup=0", "--eval-samples", "0", "--no-progress", "--cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # accelerate's own launcher starts a single process with --cpu (multi-CPU needs MPI there); torchrun sets
    # the same WORLD_SIZE / RANK environment `accelerate launch` sets on GPUs, and Accelerator picks gloo DDP.
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
              "-m", "distill.run"]
    two = subprocess.run(launch + common + ["--out", str(tmp_path / "two"), "--batch-size", "2"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "distill.run"] + common + ["--out", str(tmp_path / "one"),
                                                                          "--batch-size", "4"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    training = json.loads((tmp_path / "two" / "student" / MANIFEST_NAME).read_text())["training"]
    assert training["processes"] == 2 and training["steps_done"] == 3
    w1, w2 = unet_weights(tmp_path / "one" / "student"), unet_weights(tmp_path / "two" / "student")
    teacher_w = load_file(teacher_dir / "unet" / "diffusion_pytorch_model.safetensors")
    # Summed over all weights: Adam's first steps are +-lr wherever a gradient is non-zero, so a few weights whose
    # gradient is float noise may flip sign between the runs; training on half the batch would move most of them.
    moved = sum((w1[k] - teacher_w[k]).abs().sum().item() for k in w1)
    diff = sum((w1[k] - w2[k]).abs().sum().item() for k in w1)
    assert moved > 0 and diff < 1e-3 * moved, (moved, diff)


def test_gradient_checkpointing_trains_the_same_weights(teacher, tmp_path):
    """Recomputing activations in the backward changes memory, not the arithmetic: the same student, GAN and
    backward simulation included."""
    data = real_data()
    variant = dict(student_timesteps=(999, 499), steps=3)
    plain = train_dmd2(small_config(**variant), teacher, data, tmp_path / "plain", progress=False)
    recomputed = train_dmd2(small_config(**variant, gradient_checkpointing=True), teacher, data,
                            tmp_path / "recomputed", progress=False)
    a, b = unet_weights(plain), unet_weights(recomputed)
    start = teacher.denoiser.net.network.state_dict()
    assert sum((a[k] - start[k]).abs().sum().item() for k in a) > 0
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_gradient_checkpointing_needs_a_network_that_has_it():
    from distill.teachers.backbone import Backbone

    class Plain(Backbone):
        network_attr = "net"

        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(2, 2)

    with pytest.raises(UserError, match="Linear does not support it"):
        Plain().enable_checkpointing()
