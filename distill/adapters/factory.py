"""Teachers that are not diffusers models (EDM/ADM networks, home-grown UNets).

A folder (or the JSON file itself) with `fewstep_factory.json` declares everything:

    {"factory": "my_nets:build_unet",        # module:function (or path/to/file.py:function, relative)
     "kwargs": {"img_resolution": 64},       # passed to the function
     "weights": "net.safetensors",           # safetensors, or a torch state dict (weights_only)
     "prediction_type": "epsilon",           # epsilon | v_prediction | sample
     "scheduler": {"_class_name": "DDPMScheduler", "beta_schedule": "linear", ...},
     "x_shape": [3, 64, 64],
     "num_classes": 1000, "null_class": null, "guidance_scale": 1.0,
     "class_arg": "class_labels", "class_format": "index"}   # or "one_hot" (EDM networks)

A DDPM-family scheduler config gives a VP denoiser (the network sees x / sqrt(1 + sigma^2) and the
timestep); an EDM scheduler config (`EDMEulerScheduler`, `EDMDPMSolverMultistepScheduler`: sigma_min,
sigma_max, sigma_data) gives EDM preconditioning (the network sees c_in x and ln(sigma) / 4).
The network is called as `net(x_in, t, **{class_arg: labels})`.
"""

import importlib
import importlib.util
import sys
from pathlib import Path

import torch.nn.functional as F
from torch import nn

from ..denoiser import EDMDenoiser, VPDenoiser
from ..errors import UserError
from ..schedule import EDMSchedule, VPSchedule
from .base import ClassLabelTeacher
from .loading import load_strict, read_json, read_weights

SPEC_NAME = "fewstep_factory.json"


def import_factory(ref: str, base: Path):
    """Resolve 'module:function' or 'file.py:function' (relative to the spec's folder)."""
    if ":" not in ref:
        raise UserError(f"factory {ref!r} must look like 'module:function' or 'file.py:function'")
    mod_name, fn_name = ref.rsplit(":", 1)
    try:
        if mod_name.endswith(".py"):
            file = (base / mod_name).resolve()
            # A private module name: a user file called json.py must not replace the real json module.
            name = f"fewstep_factory_{abs(hash(str(file))):x}_{file.stem}"
            spec = importlib.util.spec_from_file_location(name, file)
            if spec is None or not file.exists():
                raise UserError(f"factory file {file} does not exist")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ImportError as e:
        raise UserError(f"cannot import the factory module {mod_name!r}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"{mod_name} has no function {fn_name!r}")
    return fn


class FactoryBackbone(nn.Module):
    """Calls a user network with the class labels under its own keyword and in its own format."""

    def __init__(self, net: nn.Module, class_arg: str = "class_labels", one_hot_classes: int | None = None):
        super().__init__()
        self.net = net
        self.class_arg = class_arg
        self.one_hot_classes = one_hot_classes

    def forward(self, x, t, class_labels=None):
        kwargs = {}
        if class_labels is not None:
            if self.one_hot_classes:  # the null class (index == num_classes) becomes an all-zero row
                labels = F.one_hot(class_labels, self.one_hot_classes + 1)[:, : self.one_hot_classes]
                class_labels = labels.to(x.dtype)
            kwargs[self.class_arg] = class_labels
        out = self.net(x, t, **kwargs)
        return out.sample if hasattr(out, "sample") else out


class FactoryTeacher(ClassLabelTeacher):
    family = "factory"

    def __init__(self, denoiser, spec: dict, source: str):
        self.denoiser = denoiser
        self.x_shape = tuple(spec["x_shape"])
        self.num_classes = spec.get("num_classes")
        self.null_class = spec.get("null_class")
        self.guidance_scale = float(spec.get("guidance_scale", 1.0))
        self.source = source


def load_factory_teacher(path: Path) -> FactoryTeacher:
    path = Path(path)
    spec_file = path / SPEC_NAME if path.is_dir() else path
    spec = read_json(spec_file)
    base = spec_file.parent
    missing = [k for k in ("factory", "weights", "prediction_type", "scheduler", "x_shape") if k not in spec]
    if missing:
        raise UserError(f"{spec_file} lacks {', '.join(missing)} (see distill/adapters/factory.py)")
    build = import_factory(spec["factory"], base)
    try:
        net = build(**spec.get("kwargs", {}))
    except TypeError as e:
        raise UserError(f"factory {spec['factory']} failed with the given kwargs: {e}") from None
    if not isinstance(net, nn.Module):
        raise UserError(f"factory {spec['factory']} returned {type(net).__name__}, not a torch.nn.Module")
    load_strict(net, read_weights(base / spec["weights"]), f"the network from {spec['factory']}")
    net.float().eval()
    one_hot = spec.get("num_classes") if spec.get("class_format", "index") == "one_hot" else None
    backbone = FactoryBackbone(net, spec.get("class_arg", "class_labels"), one_hot)
    sched = spec["scheduler"]
    if str(sched.get("_class_name", "")).startswith("EDM"):
        schedule = EDMSchedule(sched.get("sigma_min", 0.002), sched.get("sigma_max", 80.0))
        denoiser = EDMDenoiser(backbone, schedule, spec["prediction_type"], sched.get("sigma_data", 0.5))
    else:
        denoiser = VPDenoiser(backbone, VPSchedule.from_scheduler_config(sched), spec["prediction_type"])
    return FactoryTeacher(denoiser, spec, source=str(spec_file))

