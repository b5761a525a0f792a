"""Pixel-space diffusers UNet2DModel teachers (DDPM family), optionally class-conditional."""

from pathlib import Path

from distill.errors import UserError
from distill.teachers.backbone import DiffusersBackbone
from distill.teachers.base import ClassLabelTeacher
from distill.teachers.denoiser import VPDenoiser
from distill.teachers.loading import load_diffusers_model, read_json
from distill.teachers.schedule import VPSchedule

# Where LoRA goes on a diffusers UNet: attention projections, feed-forwards and resnet convs (the DMD2 SDXL list);
# names a UNet lacks are skipped.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


class PixelUNetBackbone(DiffusersBackbone):
    """UNet2DModel as `net(x, t, class_labels=None) -> tensor` (the denoiser's backbone form)."""

    lora_targets = LORA_TARGETS

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, class_labels=None):
        return self.unet(x, t, class_labels=class_labels).sample


class PixelTeacher(ClassLabelTeacher):
    family = "pixel"

    def __init__(self, unet, scheduler_config: dict, meta: dict | None = None, source: str = ""):
        meta = meta or {}
        prediction_type = scheduler_config.get("prediction_type", "epsilon")
        self.denoiser = VPDenoiser(PixelUNetBackbone(unet), VPSchedule.from_scheduler_config(scheduler_config),
                                   prediction_type)
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.x_shape = (unet.config.in_channels, *size)
        embeds = unet.config.num_class_embeds
        self.num_classes = meta.get("num_classes", embeds)
        self.null_class = meta.get("null_class")
        if self.num_classes is not None and embeds is None:
            raise UserError(f"{source}: metadata says class-conditional but the UNet has no class embedding")
        self.guidance_scale = float(meta.get("guidance_scale", 1.0))
        self.scheduler_config = dict(scheduler_config)
        self.source = source


def load_pixel_teacher(path: Path) -> PixelTeacher:
    """A DDPMPipeline-style folder: unet/ (UNet2DModel) + scheduler/ (+ fewstep_teacher.json)."""
    from diffusers import UNet2DModel

    path = Path(path)
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    if not scheduler_file.exists():
        raise UserError(f"{path} has no scheduler/scheduler_config.json: the noise schedule is needed")
    meta = read_json(path / "fewstep_teacher.json") if (path / "fewstep_teacher.json").exists() else {}
    unet = load_diffusers_model(UNet2DModel, path / "unet")
    return PixelTeacher(unet, read_json(scheduler_file), meta, source=str(path))
