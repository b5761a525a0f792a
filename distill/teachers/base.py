"""What every teacher adapter provides: a denoiser in the one convention plus its conditioning."""

import torch

from distill.errors import UserError
from distill.teachers.denoiser import Denoiser


class Teacher:
    """A loaded teacher (one subclass per model family; no family branches elsewhere).

    - `denoiser`: D(x, sigma, cond) -> x0 in sigma space, on `x_shape` tensors (latents for latent models)
    - `cond(labels=..., prompts=...)` / `uncond(n)`: the dicts of batch-first tensors D takes as `cond`
    - `decode(x)` / `encode(images)`: between the denoiser's space and images in [-1, 1]
    """

    family: str = "?"
    denoiser: Denoiser
    x_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int | None = None  # set for class-conditional teachers
    guidance_scale: float = 1.0  # the default classifier-free guidance scale
    source: str = ""  # where it was loaded from

    @property
    def conditioning(self) -> str:
        """'class', 'text' or 'none'."""
        return "none"

    def conditioning_entry(self) -> dict:
        """The student manifest's `conditioning`."""
        return {"kind": "none"}

    def cond(self, labels=None, prompts=None) -> dict:
        return {}

    def uncond(self, n: int) -> dict | None:
        """The null condition for CFG, or None when the teacher has none."""
        return None

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device) -> "Teacher":
        self.denoiser.to(device)
        return self

    def describe(self) -> str:
        return (f"{self.family} teacher from {self.source}: x {tuple(self.x_shape)}, "
                f"sigma [{self.denoiser.sigma_min:.4g}, {self.denoiser.sigma_max:.4g}], "
                f"conditioning {self.conditioning}")


class ClassLabelTeacher(Teacher):
    """Teachers conditioned on an integer class (or on nothing); `null_class` enables CFG."""

    null_class: int | None = None

    @property
    def conditioning(self) -> str:
        return "class" if self.num_classes else "none"

    def conditioning_entry(self) -> dict:
        if not self.num_classes:
            return {"kind": "none"}
        return {"kind": "class", "num_classes": self.num_classes, "null_class": self.null_class}

    def cond(self, labels=None, prompts=None) -> dict:
        if prompts is not None:
            raise UserError("this teacher is class-conditional or unconditional; it takes no prompts")
        if not self.num_classes:
            if labels is not None:
                raise UserError("this teacher is unconditional; it takes no class labels")
            return {}
        if labels is None:
            raise UserError(f"this teacher is class-conditional: give class labels in 0..{self.num_classes - 1}")
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if len(bad):
            raise UserError(f"class label {int(bad[0])} is out of range; this teacher has classes "
                            f"0..{self.num_classes - 1}")
        return {"class_labels": labels}

    def uncond(self, n: int) -> dict | None:
        if self.null_class is None:
            return None
        return {"class_labels": torch.full((n,), self.null_class, dtype=torch.long, device=self.device)}
