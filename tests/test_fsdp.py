"""Fully sharded DMD2 and SFD (--set fsdp=true, distill/sharding.py) on two CPU processes (gloo): the same student
as one process with the same global batch, a run killed with SIGKILL resumes from its checkpoint to the same
weights as an uninterrupted one, and what FSDP cannot do is a one-line error naming what works."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

from distill import run as run_cli
from distill.checkpoint import load_state
from distill.errors import UserError
from distill.sharding import check_fsdp

from .conftest import make_tiny_pixel_dir
from .test_dmd2 import REPO, make_class_folder, run_main, unet_weights

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def common(teacher: Path, data: Path, steps: int = 3) -> list[str]:
    return ["--preset", "pixel", "--teacher", str(teacher), "--data", str(data), "--steps", str(steps),
            "--set", "dfake_gen_update_ratio=2", "--set", "lr_generator=1e-3", "--set", "lr_fake=1e-3",
            "--set", "warmup=0", "--eval-samples", "0", "--no-progress", "--cpu"]


def two_processes(port: int) -> list[str]:
    # torchrun sets the WORLD_SIZE / RANK environment `accelerate launch` sets; Accelerator(cpu=True) picks gloo
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
            "-m", "distill.run"]


def run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def two_sharded_and_one(args: list[str], out: Path, port: int) -> None:
    """out/two: 2 processes x batch 2 with fsdp; out/one: 1 process x batch 4, no sharding."""
    run(two_processes(port) + args + ["--out", str(out / "two"), "--batch-size", "2", "--set", "fsdp=true"])
    run([sys.executable, "-m", "distill.run"] + args + ["--out", str(out / "one"), "--batch-size", "4"])


def relative_difference(a: dict, b: dict, start: dict) -> float:
    """Summed |a - b| over summed |a - start|: how far two runs ended apart, against how far training moved."""
    moved = sum((a[k] - start[k]).abs().sum().item() for k in a)
    assert moved > 0
    return sum((a[k] - b[k]).abs().sum().item() for k in a) / moved


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    return make_tiny_pixel_dir(root / "teacher", num_classes=3), make_class_folder(root / "data")


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process(setup, tmp_path):
    """The generator is updated at steps 0 and 2 with a no-grad forward between (step 1): the path where a sharded
    root left gathered once trained wrong."""
    teacher, data = setup
    two_sharded_and_one(common(teacher, data), tmp_path, 29541)
    start = load_file(teacher / "unet" / "diffusion_pytorch_model.safetensors")
    # as the DDP test: Adam's first steps are +-lr wherever a gradient is non-zero, so weights whose gradient is
    # float noise may differ; a process training on its half alone, or on stale shards, moves most of them
    assert relative_difference(unet_weights(tmp_path / "one" / "student"),
                               unet_weights(tmp_path / "two" / "student"), start) < 1e-3


@pytest.mark.slow
def test_fsdp_with_the_teacher_sharded_in_bf16_matches_one_process(setup, tmp_path):
    """The frozen teacher sharded too, its weights in bf16, the fused AdamW: two processes train what one does
    with the same bf16 teacher; after training the main process draws samples.png from the teacher loaded again
    (whole, fp32), where a sharded one would wait forever for the other process."""
    teacher, data = setup
    args = common(teacher, data) + ["--set", "teacher_dtype=bf16", "--set", "optimizer=fused"]
    run(two_processes(29546) + args + ["--out", str(tmp_path / "two"), "--batch-size", "2", "--set", "fsdp=true",
                                       "--set", "fsdp_shard_teacher=true"])
    run([sys.executable, "-m", "distill.run"] + args + ["--out", str(tmp_path / "one"), "--batch-size", "4"])
    start = load_file(teacher / "unet" / "diffusion_pytorch_model.safetensors")
    assert relative_difference(unet_weights(tmp_path / "one" / "student"),
                               unet_weights(tmp_path / "two" / "student"), start) < 1e-3
    assert (tmp_path / "two" / "samples.png").exists()


@pytest.mark.slow
def test_fsdp_run_killed_with_sigkill_resumes_to_the_same_weights(setup, tmp_path):
    teacher, data = setup
    args = common(teacher, data, steps=5) + ["--batch-size", "2", "--set", "fsdp=true", "--set",
                                             "checkpoint_every=1", "--set", "log_every=1", "--set", "ema_decay=0.9"]
    run(two_processes(29542) + args + ["--out", str(tmp_path / "whole")])

    out = tmp_path / "killed"
    process = subprocess.Popen(two_processes(29543) + args + ["--out", str(out)], cwd=REPO, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # torchrun and both workers, mid-run: no handler runs
    process.wait()
    assert not (out / "student").exists() and 1 <= load_state(out / "state.safetensors")["step"] < 5
    assert "resuming from step" in run(two_processes(29544) + args + ["--out", str(out)]).stdout
    start = load_file(teacher / "unet" / "diffusion_pytorch_model.safetensors")
    assert relative_difference(unet_weights(tmp_path / "whole" / "student"), unet_weights(out / "student"),
                               start) < 1e-6


def test_what_fsdp_cannot_do_is_one_line_naming_what_works(setup, tmp_path, capsys):
    teacher, data = setup
    code, _, err = run_main(run_cli.main, common(teacher, data, steps=1) + ["--out", str(tmp_path / "one"),
                                                                            "--set", "fsdp=true"], capsys)
    assert code == 2 and "this run has one: launch several" in err and len(err.strip().splitlines()) == 1, err
    two = SimpleNamespace(num_processes=2, distributed_type=SimpleNamespace(name="MULTI_GPU"))
    with pytest.raises(UserError, match="fsdp with LoRA is not supported"):
        check_fsdp(two, 64, "bf16")
    with pytest.raises(UserError, match="use bf16"):
        check_fsdp(two, None, "fp16")
    with pytest.raises(UserError, match="accelerate's FSDP mode is not"):
        check_fsdp(SimpleNamespace(num_processes=2, distributed_type=SimpleNamespace(name="FSDP")), None, "bf16")
    check_fsdp(two, None, "bf16")  # what works passes


@pytest.mark.slow
def test_fsdp_sfd_v_two_processes_match_one_process(setup, tmp_path):
    """SFD-v: the student and its NFE embedding sharded; SFD's batch_size is per process."""
    teacher, _ = setup
    args = ["--preset", "pixel-sfd", "--teacher", str(teacher), "--steps", "3", "--set", "nfes=[2,3]", "--set",
            "lr=1e-3", "--set", "teacher_steps=2", "--eval-samples", "0", "--no-progress", "--cpu"]
    two_sharded_and_one(args, tmp_path, 29545)
    start = load_file(teacher / "unet" / "diffusion_pytorch_model.safetensors")
    assert relative_difference(unet_weights(tmp_path / "one" / "student"),
                               unet_weights(tmp_path / "two" / "student"), start) < 1e-3
    embedding = [load_file(tmp_path / run / "student" / "nfe_embedding.safetensors") for run in ("one", "two")]
    assert all((embedding[0][k] - embedding[1][k]).abs().max() < 1e-5 for k in embedding[0])


@pytest.mark.parametrize("name", ["multi_gpu", "multi_node"])
def test_the_shipped_accelerate_configs_load(name):
    """accelerate's own parser reads them (unknown keys raise there); plain multi-process, accelerate's FSDP off."""
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.name == "MULTI_GPU" and not config.fsdp_config
    assert config.num_processes % config.num_machines == 0 and config.mixed_precision == "bf16"
