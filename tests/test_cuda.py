"""GPU checks: the same samples and denoiser outputs on CUDA as on the CPU (skipped without a GPU)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distill.digits import TEACHER_DIR
from distill.sample import sample_teacher
from distill.teachers import load_teacher
from distill.teachers.denoiser import guided

from .tiny_sd import make_tiny_sd_dir

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("exact_fp32_cuda")]  # conftest: TF32 off, true fp32 against the CPU


@pytest.mark.parametrize("sampler,nfe", [("ddim", 4), ("dpmpp-3m", 8), ("heun", 9)])
def test_digits_teacher_samples_match_cpu(sampler, nfe):
    labels = torch.arange(20) % 10
    cpu = sample_teacher(load_teacher(TEACHER_DIR), sampler, nfe, 20, labels, seed=0, guidance=2.0, progress=False)
    gpu = sample_teacher(load_teacher(TEACHER_DIR).to("cuda"), sampler, nfe, 20, labels, seed=0, guidance=2.0,
                         progress=False)
    diff = np.abs(cpu.astype(int) - gpu.astype(int))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01  # uint8 levels: rounding only


@pytest.mark.parametrize("xl", [False, True])
def test_latent_teacher_on_cuda(tmp_path, xl):
    folder = make_tiny_sd_dir(tmp_path / "sd", xl=xl)
    prompts = ["a photo of a cat", "a dog"]
    x = torch.randn(2, *load_teacher(folder).x_shape, generator=torch.Generator().manual_seed(0)) * 3.0
    sigma = torch.tensor([3.0, 0.5])
    outs = {}
    for device in ("cpu", "cuda"):
        t = load_teacher(folder).to(device)
        D = guided(t.denoiser, 5.0, t.uncond(2))
        with torch.no_grad():
            outs[device] = D(x.to(device), sigma.to(device), t.cond(prompts=prompts)).cpu()
            if device == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    outs["bf16"] = D(x.to(device), sigma.to(device), t.cond(prompts=prompts)).float().cpu()
                assert t.decode(outs[device].to(device)).shape[-2:] == t.image_size
    torch.testing.assert_close(outs["cuda"], outs["cpu"], rtol=1e-4, atol=1e-4)
    assert outs["bf16"].dtype == torch.float32 and torch.isfinite(outs["bf16"]).all()
    assert (outs["bf16"] - outs["cpu"]).abs().max() < 0.1 * outs["cpu"].abs().max()


def _dmd2_run(teacher_dir, out, device, precision):
    from distill.dmd2 import DMD2Config, train_dmd2

    cfg = DMD2Config(steps=4, batch_size=4, dfake_gen_update_ratio=2, lr_generator=1e-3, lr_fake=1e-3, warmup=0,
                     log_every=1, gan_g_weight=0.1, gan_d_weight=0.1, mixed_precision=precision)
    g = torch.Generator().manual_seed(0)
    real = (torch.rand((12, 1, 8, 8), generator=g) * 2 - 1, torch.arange(12) % 3)
    student = train_dmd2(cfg, load_teacher(teacher_dir).to(device), real, out, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    weights = load_file(str(student / "unet" / "diffusion_pytorch_model.safetensors"))
    return records, weights


def test_dmd2_training_on_cuda_matches_cpu_and_runs_in_bf16(tmp_path):
    from .conftest import make_tiny_pixel_dir

    teacher_dir = make_tiny_pixel_dir(tmp_path / "teacher", num_classes=3)
    cpu_log, cpu_w = _dmd2_run(teacher_dir, tmp_path / "cpu", "cpu", "no")
    gpu_log, gpu_w = _dmd2_run(teacher_dir, tmp_path / "fp32", "cuda", "no")
    bf16_log, bf16_w = _dmd2_run(teacher_dir, tmp_path / "bf16", "cuda", None)  # None: bf16 on CUDA
    start = load_file(str(teacher_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    moved = max((cpu_w[k] - start[k]).abs().max().item() for k in start)
    # fp32 on CUDA is the same computation as on the CPU, up to float rounding
    assert max((gpu_w[k] - cpu_w[k]).abs().max().item() for k in cpu_w) < 1e-3 * max(moved, 1e-3)
    # bf16 autocast: weights stay fp32, losses finite and near fp32's at the first step
    assert all(w.dtype == torch.float32 for w in bf16_w.values())
    for key in ("loss_dm", "loss_fake", "loss_gan_d"):
        assert all(np.isfinite(r[key]) for r in bf16_log if key in r), key
        assert abs(bf16_log[0][key] - cpu_log[0][key]) < 0.05 * abs(cpu_log[0][key]) + 1e-3, key
