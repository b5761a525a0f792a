"""The student bundle: the student network in its family's own format plus one manifest that says how to sample it.

    student/
      unet/ (or transformer/)  a diffusers model: config.json + safetensors, loadable with its class's from_pretrained
      network/                 or a factory network: fewstep_factory.json (+ its .py file) + model.safetensors
      fewstep_student.json     the manifest (below)

Manifest (format_version 1; `network` and `denoiser` are absent from older bundles, which are diffusers UNets):

    {"format_version": 1, "method": "dmd2", "family": "pixel" | "latent" | "factory" | "flow-transformer",
     "model_class": "UNet2DModel" | ..., "prediction_type": "epsilon" | "v_prediction" | "sample" | "flow",
     "network": {"format": "diffusers" | "factory", "backbone": "PixelUNetBackbone" | ..., "folder": "unet", ...},
     "denoiser": {"parameterization": "vp" | "edm" | "flow", "prediction_type": ..., "sigma_data" | "time_scale"},
     "schedule": {"kind": "vp" | "edm" | "flow", ...},
     "nfe": {"1": {"timesteps": [999], "sigmas": [...]}, "4": {...}},   # timesteps in the teacher's own time;
                                                                        # DMD2 sigmas exclude the final 0
     "renoise": "fresh_noise" (DMD2: x0, then fresh noise) | "none" (SFD: Euler steps; "afs" per NFE),
     "conditioning": {"kind": "class", "num_classes": K, "null_class": K} | {"kind": "none"}
                     | {"kind": "text", "teacher": PATH, "sdxl": bool},
     "image": {"channels", "height", "width", "value_range": [-1, 1]} (+ "latent_shape" for latent students),
     "nfe_condition": {"emb_dim", "hidden", "weights"}   # SFD-v only: the step count is an input (`nfe`)
     "teacher": PATH, "metrics": {}, "training": {...}}

Loading needs no training code: `load_bundle(path).generate(noise, cond, nfe)`.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from distill.errors import UserError
from distill.teachers.denoiser import Denoiser, denoiser_from_spec
from distill.teachers.schedule import schedule_from_manifest
from fewstep.folders import fresh_folder, replace_folder

MANIFEST_NAME = "fewstep_student.json"
FORMAT_VERSION = 1
REQUIRED = ("format_version", "method", "family", "model_class", "prediction_type", "schedule", "nfe", "renoise",
            "conditioning", "image")


def sample_dmd2(D, x: torch.Tensor, sigmas: torch.Tensor, cond: dict | None = None,
                noises: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """DMD2's few-step loop (Yin et al. 2024, §4.5): x0 = G(x, sigma_k); x = x0 + sigma_{k+1} * fresh noise.

    `x` is the first input (noise * sigmas[0]); `sigmas` are the student's own, without a final 0.
    The fresh noise comes from `noises` (one (N, C, H, W) tensor per re-noising), else from `generator`.
    (The other samplers live in samplers.py; this one sits here so a bundle samples without them.)
    """
    x0 = x
    for k in range(len(sigmas)):
        x0 = D(x, sigmas[k].to(device=x.device, dtype=x.dtype).expand(x.shape[0]), cond)
        if k + 1 < len(sigmas):
            if noises is not None:
                eps = noises[k].to(x)
            else:
                device = generator.device if generator is not None else x.device
                eps = torch.randn(x.shape, generator=generator, device=device).to(x)
            x = x0 + sigmas[k + 1].item() * eps
    return x0


def sample_sfd(D, x: torch.Tensor, sigmas: torch.Tensor, cond: dict | None = None, afs: bool = True) -> torch.Tensor:
    """SFD's Euler loop (Zhou et al. 2024): x <- x + (sigma' - sigma) (x - D(x, sigma)) / sigma down the
    student's sigmas (which end at its sigma_min, not 0); the result is x at sigma_min.

    With `afs` (the analytical first step) the first step needs no network call: its direction (the noise) is
    taken as x / sqrt(1 + sigma^2), so NFE = len(sigmas) - 2 (sfd.afs_step).
    """
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i].item(), sigmas[i + 1].item()
        if i == 0 and afs:
            d = x / (1 + s**2) ** 0.5
        else:
            d = (x - D(x, sigmas[i].to(device=x.device, dtype=x.dtype).expand(x.shape[0]), cond)) / s
        x = x + (s_next - s) * d
    return x


def base_manifest(teacher, method: str, nfe: dict, renoise: str, training: dict) -> dict:
    """The manifest fields every student of `teacher` shares (the method fills in `nfe` and `training`)."""
    denoiser = teacher.denoiser
    c, h, w = teacher.x_shape
    image = {"channels": c, "height": h, "width": w, "value_range": [-1, 1]}
    if hasattr(teacher, "image_size"):  # latent teachers: the image is the decoded latent
        image = {"channels": 3, "height": teacher.image_size[0], "width": teacher.image_size[1],
                 "value_range": [-1, 1], "latent_shape": [c, h, w]}
    return {"format_version": FORMAT_VERSION, "method": method, "family": teacher.family,
            "model_class": type(denoiser.net.network).__name__, "prediction_type": denoiser.prediction_type,
            "denoiser": denoiser.spec(),
            "schedule": denoiser.schedule.to_manifest(teacher.scheduler_config),
            "nfe": nfe, "renoise": renoise, "conditioning": teacher.conditioning_entry(), "image": image,
            "teacher": teacher.source, "metrics": {}, "training": training}


def write_bundle(out_dir: str | Path, backbone, manifest: dict, extra: dict | None = None) -> Path:
    """Write the student network (the backbone's own format: a diffusers folder, or a factory spec + safetensors),
    the manifest and `extra` ({file name: state dict}, e.g. SFD-v's NFE embedding) atomically: a temp folder
    renamed over the old one."""
    out_dir = Path(out_dir)
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ValueError(f"the student manifest lacks {', '.join(missing)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(f"this code writes format_version {FORMAT_VERSION}, got {manifest['format_version']}")
    tmp = fresh_folder(out_dir, "student bundle")
    manifest = dict(manifest, network=backbone.save(tmp))
    for name, state in (extra or {}).items():
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / name))
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    replace_folder(tmp, out_dir)
    return out_dir


class StudentBundle:
    """A loaded student: `denoiser` (its family's wrapper over the student backbone) and the manifest's recipes."""

    def __init__(self, manifest: dict, denoiser: Denoiser, source: str):
        self.manifest = manifest
        self.denoiser = denoiser
        self.source = source
        self.x_shape = tuple(manifest["image"].get("latent_shape") or
                             (manifest["image"][k] for k in ("channels", "height", "width")))
        cond = manifest["conditioning"]
        self.num_classes = cond.get("num_classes") if cond["kind"] == "class" else None

    @property
    def nfes(self) -> list[int]:
        """The step counts this student serves."""
        return sorted(int(n) for n in self.manifest["nfe"])

    def sigmas(self, nfe: int) -> torch.Tensor:
        """The student's own noise levels for `nfe` calls (float64; DMD2: no final 0, SFD: ends at sigma_min)."""
        entry = self.manifest["nfe"].get(str(nfe))
        if entry is None:
            raise UserError(f"this {self.manifest['method']} student serves NFE {', '.join(map(str, self.nfes))}, "
                            f"not {nfe}")
        return torch.tensor(entry["sigmas"], dtype=torch.float64)

    def cond(self, labels=None) -> dict:
        """The condition dict for class labels (class students) or {} (unconditional students)."""
        if self.num_classes is None:
            if labels is not None:
                raise UserError("this student is not class-conditional; it takes no labels")
            return {}
        if labels is None:
            raise UserError(f"this student is class-conditional: give labels in 0..{self.num_classes - 1}")
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise UserError(f"class labels must lie in 0..{self.num_classes - 1}")
        return {"class_labels": labels}

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device) -> "StudentBundle":
        self.denoiser.to(device)
        return self

    @torch.no_grad()
    def generate(self, noise: torch.Tensor, cond: dict | None = None, nfe: int | None = None,
                 generator: torch.Generator | None = None, fresh_noise: torch.Tensor | None = None,
                 denoiser=None) -> torch.Tensor:
        """x0 for unit-variance `noise` (N, C, H, W) in `nfe` calls (default: the most the student serves).

        Re-noising between steps uses `fresh_noise` ((nfe - 1, N, C, H, W)) if given, else `generator`.
        `denoiser`: another D(x, sigma, cond) in the student's loop (export's check of an exported file).
        """
        D = self.denoiser if denoiser is None else denoiser
        nfe = self.nfes[-1] if nfe is None else nfe
        sigmas = self.sigmas(nfe)
        x = noise.float() * sigmas[0].item()
        if "nfe_condition" in self.manifest:  # SFD-v: the student is told its step count
            cond = dict(cond or {}) | {"nfe": torch.full((len(x),), nfe, dtype=torch.long, device=x.device)}
        if self.manifest["renoise"] == "none":  # SFD: a deterministic Euler trajectory
            return sample_sfd(D, x, sigmas, cond, afs=self.manifest["nfe"][str(nfe)].get("afs", False))
        return sample_dmd2(D, x, sigmas, cond, fresh_noise, generator)


def network_entry(manifest: dict) -> dict:
    """The manifest's `network` entry; bundles written before it existed were diffusers UNets in unet/."""
    if "network" in manifest:
        return manifest["network"]
    if manifest["model_class"] not in ("UNet2DModel", "UNet2DConditionModel"):
        raise UserError(f"model_class {manifest['model_class']!r} without a network entry is not a loadable student")
    if manifest["family"] == "pixel":
        backbone = "PixelUNetBackbone"
    elif manifest["family"] == "latent":
        backbone = "SDXLUNetBackbone" if manifest["conditioning"].get("sdxl") else "SDUNetBackbone"
    else:
        raise UserError(f"unknown student family {manifest['family']!r} without a network entry")
    return {"format": "diffusers", "backbone": backbone, "class": manifest["model_class"], "folder": "unet"}


def _nfe_conditioned(path: Path, spec: dict, backbone):
    """SFD-v: the backbone with its step-count embedding (strictly loaded from its own safetensors file)."""
    from distill.sfd.nfe_condition import NFEConditioned, NFEEmbedding

    try:
        embedding = NFEEmbedding(spec["emb_dim"], spec["hidden"])
        file = path / spec["weights"]
    except (KeyError, TypeError):
        raise UserError(f"{path / MANIFEST_NAME}: nfe_condition needs emb_dim, hidden and weights") from None
    if not file.exists():
        raise UserError(f"{path}: the manifest names {spec['weights']} (the NFE embedding), which is missing")
    try:
        embedding.load_state_dict(load_file(str(file)))
    except (RuntimeError, OSError, SafetensorError) as e:
        raise UserError(f"{file} does not match the manifest's NFE embedding ({str(e).splitlines()[0]})") from None
    return NFEConditioned(backbone, embedding)


def load_bundle(path: str | Path) -> StudentBundle:
    """Load a student bundle strictly (every weight matched) and check its manifest."""
    from distill.teachers.backbone import load_backbone
    from distill.teachers.loading import read_json

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"student bundle {path} does not exist (or is not a folder)")
    if not (path / MANIFEST_NAME).exists():
        raise UserError(f"{path} has no {MANIFEST_NAME}: not a fewstep student bundle")
    manifest = read_json(path / MANIFEST_NAME)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{path}: student format_version {version!r} is not supported (this fewstep reads "
                        f"{FORMAT_VERSION}); use the fewstep version that wrote it")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise UserError(f"{path / MANIFEST_NAME} lacks {', '.join(missing)}")
    if manifest["renoise"] not in ("fresh_noise", "none"):
        raise UserError(f"{path}: unknown re-noising rule {manifest['renoise']!r} (known: fresh_noise, none)")
    if not manifest["nfe"]:
        raise UserError(f"{path}: the manifest lists no NFE to sample with")
    try:
        schedule = schedule_from_manifest(manifest["schedule"])
        backbone = load_backbone(path, network_entry(manifest))
        if "nfe_condition" in manifest:
            backbone = _nfe_conditioned(path, manifest["nfe_condition"], backbone)
        spec = manifest.get("denoiser", {"parameterization": "vp", "prediction_type": manifest["prediction_type"]})
        denoiser = denoiser_from_spec(spec, backbone, schedule).eval()
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return StudentBundle(manifest, denoiser, source=str(path))
