"""GPU checks: the same samples and denoiser outputs on CUDA as on the CPU (skipped without a GPU)."""

import numpy as np
import pytest
import torch

from distill.adapters import load_teacher
from distill.denoiser import guided
from distill.digits import TEACHER_DIR
from distill.sample import sample_teacher

from .tiny_sd import make_tiny_sd_dir

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def exact_fp32_matmul():
    # TF32 would make CUDA differ from the CPU by ~1e-3; these tests compare true fp32.
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


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
