"""Teacher adapters, one per model family, and `load_teacher(path)` which picks the right one."""

from pathlib import Path

from distill.errors import UserError
from distill.teachers.base import ClassLabelTeacher, Teacher
from distill.teachers.factory import SPEC_NAME, load_factory_teacher
from distill.teachers.loading import read_json
from distill.teachers.pixel import load_pixel_teacher

__all__ = ["Teacher", "ClassLabelTeacher", "load_teacher"]


def load_teacher(path: str | Path) -> Teacher:
    """Load a teacher from a local folder: a diffusers pixel pipeline (UNet2DModel), a latent
    text-to-image pipeline (SD 1.5 / SDXL layout, or SD3's flow-matching transformer), or a factory spec
    (fewstep_factory.json)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"teacher path {path} does not exist")
    if path.is_file():
        if path.name.endswith(".json"):
            return load_factory_teacher(path)
        raise UserError(f"{path} is a file; give the teacher's folder (diffusers layout or {SPEC_NAME})")
    if (path / SPEC_NAME).exists():
        return load_factory_teacher(path)
    transformer_config = path / "transformer" / "config.json"
    if transformer_config.exists():
        cls = read_json(transformer_config).get("_class_name")
        if cls == "SD3Transformer2DModel":
            from distill.teachers.sd3 import load_sd3_teacher

            return load_sd3_teacher(path)
        raise UserError(f"{transformer_config} describes a {cls}; fewstep supports SD3Transformer2DModel among "
                        f"diffusers transformers (other networks load through a {SPEC_NAME})")
    unet_config = path / "unet" / "config.json"
    if unet_config.exists():
        cls = read_json(unet_config).get("_class_name")
        if cls == "UNet2DModel":
            return load_pixel_teacher(path)
        if cls == "UNet2DConditionModel":
            from distill.teachers.latent import load_latent_teacher

            return load_latent_teacher(path)
        raise UserError(f"{unet_config} describes a {cls}; fewstep supports UNet2DModel and UNet2DConditionModel")
    raise UserError(
        f"{path} holds no loadable teacher: expected a diffusers folder with unet/config.json and "
        f"scheduler/, or a {SPEC_NAME} for other networks"
    )
