import json
from pathlib import Path

import pytest
import torch

# Tests run on small CPUs: one thread each avoids oversubscription when several processes run.
torch.set_num_threads(1)


@pytest.fixture
def exact_fp32_cuda():
    """TF32 off for the test: with it, CUDA matmuls and convolutions differ from the CPU by ~1e-3, and the CUDA tests
    compare against the CPU in true fp32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def tiny_unet_config(num_class_embeds=None, sample_size=8):
    return dict(sample_size=sample_size, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8,
                num_class_embeds=num_class_embeds)


def scheduler_config(prediction_type="epsilon"):
    return dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                prediction_type=prediction_type, clip_sample=False)


def make_tiny_pixel_dir(path: Path, num_classes=None, prediction_type="epsilon", seed=0) -> Path:
    """A random tiny DDPMPipeline-layout teacher (class-conditional with a null class if num_classes)."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**tiny_unet_config(num_classes + 1 if num_classes else None))
    unet.save_pretrained(path / "unet", safe_serialization=True)
    DDPMScheduler(**scheduler_config(prediction_type)).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    if num_classes:
        (path / "fewstep_teacher.json").write_text(json.dumps(
            {"num_classes": num_classes, "null_class": num_classes, "guidance_scale": 2.0}))
    return path


@pytest.fixture
def tiny_pixel_dir(tmp_path):
    return make_tiny_pixel_dir(tmp_path / "teacher", num_classes=3)
