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

`parameterization` (vp | edm | flow; default: implied by the scheduler's class) chooses the denoiser: vp (a
DDPM-family scheduler config; the network sees x / sqrt(1 + sigma^2) and the timestep, an int64 index when
`"timestep_input": "index"`), edm (`EDMEulerScheduler`-style sigma_min, sigma_max, sigma_data; the network sees
c_in x and ln(sigma) / 4) or flow (`FlowMatchEulerDiscreteScheduler` with `shift`; the network sees x_t and
`time_scale` * t, default num_train_timesteps). Optional for the methods: `gan_tap` (the module DMD2's GAN head
reads), `time_embedding` (the module SFD-v's step count is added to), `lora_targets`.
The network is called as `net(x_in, t, **{class_arg: labels})`. docs/teachers.md explains every key.
"""

import importlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import torch.nn.functional as F
from torch import nn

from distill.errors import UserError
from distill.teachers.backbone import Backbone
from distill.teachers.base import ClassLabelTeacher
from distill.teachers.denoiser import EDMDenoiser, FlowDenoiser, VPDenoiser
from distill.teachers.loading import load_strict, read_json, read_weights
from distill.teachers.schedule import EDMSchedule, FlowSchedule, VPSchedule

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


PARAMETERIZATIONS = ("vp", "edm", "flow")
TIMESTEP_INPUTS = ("continuous", "index")


class FactoryBackbone(Backbone):
    """Calls a user network with the class labels under its own keyword and in its own format. `spec` is the
    factory spec (what the student bundle copies); `base` the folder its relative paths start from."""

    network_attr = "net"

    def __init__(self, net: nn.Module, spec: dict, base: Path):
        super().__init__()
        self.net = net
        self.spec = dict(spec)
        self.base = Path(base)
        self.class_arg = spec.get("class_arg", "class_labels")
        one_hot = spec.get("class_format", "index") == "one_hot"
        self.one_hot_classes = spec.get("num_classes") if one_hot else None
        self.tap_name = spec.get("gan_tap")
        self.time_embedding_name = spec.get("time_embedding")
        self.lora_targets = tuple(spec.get("lora_targets", ()))

    def forward(self, x, t, class_labels=None):
        kwargs = {}
        if class_labels is not None:
            if self.one_hot_classes:  # the null class (index == num_classes) becomes an all-zero row
                labels = F.one_hot(class_labels, self.one_hot_classes + 1)[:, : self.one_hot_classes]
                class_labels = labels.to(x.dtype)
            kwargs[self.class_arg] = class_labels
        out = self.net(x, t, **kwargs)
        return out.sample if hasattr(out, "sample") else out

    def save(self, folder: Path) -> dict:
        """network/: the spec (weights -> model.safetensors) and, for a file factory, a copy of its .py file."""
        from safetensors.torch import save_file

        out = Path(folder) / "network"
        out.mkdir(parents=True, exist_ok=True)
        spec = dict(self.spec, weights="model.safetensors")
        module, fn = spec["factory"].rsplit(":", 1)
        if module.endswith(".py"):  # the file travels with the student; a module name stays a pointer
            shutil.copy(self.base / module, out / Path(module).name)
            spec["factory"] = f"{Path(module).name}:{fn}"
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(out / "model.safetensors"))
        (out / SPEC_NAME).write_text(json.dumps(spec, indent=2))
        return {"format": "factory", "backbone": type(self).__name__, "folder": "network", "spec": SPEC_NAME}

    @classmethod
    def load(cls, folder: Path, entry: dict) -> "FactoryBackbone":
        base = Path(folder) / entry.get("folder", "network")
        spec = read_json(base / entry.get("spec", SPEC_NAME))
        return cls(build_network(spec, base), spec, base)


def build_network(spec: dict, base: Path) -> nn.Module:
    """The spec's network with its weights, strictly loaded, in float32 eval mode."""
    build = import_factory(spec["factory"], base)
    try:
        net = build(**spec.get("kwargs", {}))
    except TypeError as e:
        raise UserError(f"factory {spec['factory']} failed with the given kwargs: {e}") from None
    if not isinstance(net, nn.Module):
        raise UserError(f"factory {spec['factory']} returned {type(net).__name__}, not a torch.nn.Module")
    load_strict(net, read_weights(base / spec["weights"]), f"the network from {spec['factory']}")
    return net.float().eval()


class FactoryTeacher(ClassLabelTeacher):
    family = "factory"

    def __init__(self, denoiser, spec: dict, source: str):
        self.denoiser = denoiser
        self.x_shape = tuple(spec["x_shape"])
        self.num_classes = spec.get("num_classes")
        self.null_class = spec.get("null_class")
        self.guidance_scale = float(spec.get("guidance_scale", 1.0))
        self.scheduler_config = dict(spec["scheduler"])
        self.source = source


def parameterization_of(spec: dict, spec_file) -> str:
    """The spec's `parameterization`, or the one its scheduler class implies (EDM*, FlowMatch*, else vp)."""
    name = str(spec["scheduler"].get("_class_name", ""))
    implied = "edm" if name.startswith("EDM") else "flow" if name.startswith("FlowMatch") else "vp"
    kind = spec.get("parameterization", implied)
    if kind not in PARAMETERIZATIONS:
        raise UserError(f"{spec_file}: unknown parameterization {kind!r}; one of {', '.join(PARAMETERIZATIONS)}")
    return kind


def make_denoiser(backbone: FactoryBackbone, spec: dict, spec_file):
    """The denoiser the spec declares around the backbone."""
    sched = spec["scheduler"]
    kind = parameterization_of(spec, spec_file)
    timestep_input = spec.get("timestep_input", "continuous")
    if timestep_input not in TIMESTEP_INPUTS:
        raise UserError(f"{spec_file}: unknown timestep_input {timestep_input!r}; one of {', '.join(TIMESTEP_INPUTS)}")
    if timestep_input == "index" and kind != "vp":
        raise UserError(f"{spec_file}: timestep_input 'index' is for DDPM-family (vp) networks, whose time is an "
                        f"integer timestep; a {kind} network's time is continuous")
    try:
        if kind == "edm":
            schedule = EDMSchedule(sched.get("sigma_min", 0.002), sched.get("sigma_max", 80.0))
            return EDMDenoiser(backbone, schedule, spec["prediction_type"], sched.get("sigma_data", 0.5))
        if kind == "flow":
            schedule = FlowSchedule.from_scheduler_config(sched)
            return FlowDenoiser(backbone, schedule, spec["prediction_type"],
                                spec.get("time_scale", schedule.num_train_timesteps))
        schedule = VPSchedule.from_scheduler_config(sched, index=timestep_input == "index")
        return VPDenoiser(backbone, schedule, spec["prediction_type"])
    except UserError as e:
        raise UserError(f"{spec_file}: {e}") from None


def load_factory_teacher(path: Path) -> FactoryTeacher:
    path = Path(path)
    spec_file = path / SPEC_NAME if path.is_dir() else path
    spec = read_json(spec_file)
    base = spec_file.parent
    missing = [k for k in ("factory", "weights", "prediction_type", "scheduler", "x_shape") if k not in spec]
    if missing:
        raise UserError(f"{spec_file} lacks {', '.join(missing)} (see docs/teachers.md)")
    parameterization_of(spec, spec_file)  # a bad declaration fails before the network is built
    backbone = FactoryBackbone(build_network(spec, base), spec, base)
    return FactoryTeacher(make_denoiser(backbone, spec, spec_file), spec, source=str(spec_file))
