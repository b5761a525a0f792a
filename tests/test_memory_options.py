"""The training-memory options on one process: the frozen teacher in bf16 (teacher_dtype), the fused and the
8-bit optimizers (optimizer), what each changes in the weights against the default, exact resume with 8-bit
states, and one-line errors for what does not work. Two-process FSDP with them: tests/test_fsdp.py."""

import pytest
import torch
from safetensors.torch import load_file

from distill import run as run_cli
from distill.checkpoint import load_state, save_state
from distill.dmd2 import train_dmd2
from distill.sfd import SFDConfig, train_sfd
from distill.teachers import load_teacher
from distill.training import LowPrecisionTeacher

from .test_dmd2 import real_data, run_main, small_config, unet_weights
from .test_fsdp import relative_difference


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from .conftest import make_tiny_pixel_dir

    return make_tiny_pixel_dir(tmp_path_factory.mktemp("memory") / "teacher", num_classes=3)


@pytest.fixture(scope="module")
def start(teacher_dir):
    return load_file(teacher_dir / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def default_run(teacher_dir, tmp_path_factory):
    """Six DMD2 steps with the default settings: what the options are compared with."""
    return unet_weights(train_dmd2(small_config(), load_teacher(teacher_dir), real_data(),
                                   tmp_path_factory.mktemp("default"), progress=False))


def test_bf16_teacher_holds_half_the_bytes_and_answers_close_to_fp32(teacher_dir):
    full = load_teacher(teacher_dir).denoiser
    low = load_teacher(teacher_dir).denoiser
    fp32_bytes = sum(p.numel() * p.element_size() for p in low.net.parameters())
    frozen = LowPrecisionTeacher(low, torch.bfloat16)
    assert sum(p.numel() * p.element_size() for p in low.net.parameters()) * 2 == fp32_bytes
    assert all(p.dtype == torch.bfloat16 for p in low.net.parameters())
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 5
    sigma, cond = torch.tensor([0.5, 2.0, 5.0, 20.0]), {"class_labels": torch.tensor([0, 1, 2, 3])}
    with torch.no_grad():
        want, got = full(x, sigma, cond), frozen(x, sigma, cond)
    assert got.dtype == torch.float32
    error = ((got - want).norm() / want.norm()).item()
    assert 0 < error < 2e-2, error  # bf16's 8-bit mantissa: not exact, and close


def test_dmd2_with_a_bf16_teacher_trains_near_the_fp32_run_and_ships_fp32(teacher_dir, default_run, start,
                                                                          tmp_path):
    bundle = train_dmd2(small_config(teacher_dtype="bf16"), load_teacher(teacher_dir), real_data(), tmp_path,
                        progress=False)
    weights = unet_weights(bundle)
    assert all(v.dtype == torch.float32 for v in weights.values())  # the student is not cast
    # the real score's bf16 rounding moves the DM gradient a little: a fraction of how far training went
    assert 1e-4 < relative_difference(default_run, weights, start) < 0.3


def test_fused_adamw_trains_the_same_weights(teacher_dir, default_run, start, tmp_path):
    bundle = train_dmd2(small_config(optimizer="fused"), load_teacher(teacher_dir), real_data(), tmp_path,
                        progress=False)
    assert relative_difference(default_run, unet_weights(bundle), start) < 1e-4


def test_8bit_adamw_keeps_uint8_moments_and_resumes_exactly(teacher_dir, default_run, start, tmp_path):
    pytest.importorskip("bitsandbytes", reason="optimizer=8bit needs bitsandbytes (pip install 'fewstep[memory]')")
    teacher = load_teacher(teacher_dir)
    straight = unet_weights(train_dmd2(small_config(optimizer="8bit"), teacher, real_data(), tmp_path / "a",
                                       progress=False))
    # the moments of the large tensors are stored as uint8 codes with per-block scales
    state = load_state(tmp_path / "a" / "state.safetensors")["opt_generator"]["state"]
    quantized = [s["__bnb_optimizer_quant_state__"] for s in state.values()
                 if s["__bnb_optimizer_quant_state__"]["state1"].dtype == torch.uint8]
    assert quantized and all(q["state2"].dtype == torch.uint8 for q in quantized)
    # 8-bit moments are not the fp32 ones: close to the default run, and not equal to it
    assert 1e-6 < relative_difference(default_run, straight, start) < 0.05

    train_dmd2(small_config(optimizer="8bit", steps=3), teacher, real_data(), tmp_path / "b", progress=False)
    resumed = unet_weights(train_dmd2(small_config(optimizer="8bit"), teacher, real_data(), tmp_path / "b",
                                      progress=False))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_sfd_with_a_bf16_teacher_and_fused_adam_trains_and_ships_fp32(teacher_dir, tmp_path):
    cfg = SFDConfig(nfe=2, steps=2, batch_size=2, teacher_steps=2, lr=1e-3, teacher_dtype="bf16", optimizer="fused")
    weights = unet_weights(train_sfd(cfg, load_teacher(teacher_dir), tmp_path, progress=False))
    start = load_file(teacher_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    assert any(not torch.equal(weights[k], start[k]) for k in start)


def test_a_process_that_gets_the_weights_sent_reads_none_of_them(tmp_path):
    state = {"generator": {"w": torch.ones(3)}, "opt": {"m": torch.zeros(2)}, "rng": torch.arange(4), "step": 5}
    save_state(tmp_path / "s.safetensors", state)
    partial = load_state(tmp_path / "s.safetensors", leave_out=("generator", "opt"))
    assert partial["generator"] == {} and partial["opt"] == {}
    assert torch.equal(partial["rng"], torch.arange(4)) and partial["step"] == 5
    assert torch.equal(load_state(tmp_path / "s.safetensors")["generator"]["w"], torch.ones(3))


@pytest.mark.parametrize("preset, sets, message", [
    ("pixel", ["teacher_dtype=fp16"], "teacher_dtype=fp16 is refused: DMD2's reference diverged in fp16; use "
                                      "teacher_dtype=bf16"),
    ("pixel-sfd", ["teacher_dtype=fp16"], "teacher_dtype=fp16 is refused"),
    ("pixel", ["optimizer=8bit", "fsdp=true"], "optimizer=8bit with fsdp is not supported"),
    ("pixel", ["optimizer=lion"], "optimizer must be one of default, fused, 8bit"),
    ("pixel", ["fsdp_shard_teacher=true"], "fsdp_shard_teacher shards the frozen teacher with the trained copies: "
                                           "add fsdp=true"),
])
def test_memory_settings_that_cannot_work_are_one_line_errors(teacher_dir, tmp_path, capsys, preset, sets,
                                                                message):
    from .test_dmd2 import make_class_folder

    args = ["--preset", preset, "--teacher", str(teacher_dir), "--steps", "1", "--eval-samples", "0",
            "--no-progress", "--cpu", "--out", str(tmp_path / "run")]
    if preset == "pixel":
        args += ["--data", str(make_class_folder(tmp_path / "data"))]
    for s in sets:
        args += ["--set", s]
    code, _, err = run_main(run_cli.main, args, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_checkpoint_stores_shared_and_viewed_tensors_apart_and_whole(tmp_path):
    """Tensors alone in their storage are written without a copy; views and tensors sharing storage get their own
    copy (safetensors refuses shared storage), and every one reads back with its own values."""
    base = torch.arange(12.0)
    state = {"whole": base, "same": base, "view": base[2:5], "strided": base.view(3, 4).t(), "other": torch.ones(2),
             "empty": torch.zeros(0), "empty2": torch.zeros(0, 3)}
    save_state(tmp_path / "s.safetensors", state)
    back = load_state(tmp_path / "s.safetensors")
    for k, v in state.items():
        assert torch.equal(back[k], v), k
