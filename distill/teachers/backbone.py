"""What the methods ask of a teacher's network, answered per family: the adapter's backbone class.

A backbone is the network called as `net(x_in, t, **cond) -> tensor` (the denoiser's F). DMD2 and SFD never
reach into it by attribute names of one model family; they ask it:
- `network`: the trainable model itself (what a student bundle saves and LoRA wraps);
- `tap_module()` / `tap_features(output)`: where the GAN head reads (a forward hook on a named module) and that
  module's output as (N, C, h, w) features;
- `time_embedding()`: the module whose output is the per-sample time embedding, and its width (SFD-v's step count
  and DMD2's per-step fake score are added there);
- `lora_targets`: module names LoRA may wrap;
- `save(folder)` / `load(folder, entry)`: the student's network on disk, and the manifest entry that says how.
"""

from pathlib import Path

from torch import nn

from distill.errors import UserError


def last_linear_width(module: nn.Module) -> int:
    """The output width of a module's last nn.Linear (a time embedding MLP's output)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"{type(module).__name__} has no Linear layer to read a time-embedding width from")
    return linears[-1].out_features


class Backbone(nn.Module):
    network_attr = "unet"  # the attribute that holds the network
    tap_name: str | None = "mid_block"  # the GAN head's module (a name inside `network`)
    time_embedding_name: str | None = "time_embedding"
    lora_targets: tuple[str, ...] = ()

    @property
    def network(self) -> nn.Module:
        return getattr(self, self.network_attr)

    def set_network(self, module: nn.Module) -> None:
        # a method, not a property setter: nn.Module.__setattr__ would register a module under "network" instead
        setattr(self, self.network_attr, module)

    def _named(self, name: str | None, what: str, setting: str) -> nn.Module:
        net = self.network
        net = getattr(net, "get_base_model", lambda: net)()  # a peft-wrapped network keeps its module names
        try:
            if name is None:
                raise AttributeError
            return net.get_submodule(name)
        except AttributeError:
            raise UserError(f"{what} needs a module of {type(net).__name__} to hook ({setting} {name!r} names none); "
                            f"declare it in the teacher's spec, or turn the feature off") from None

    def tap_module(self) -> nn.Module:
        return self._named(self.tap_name, "the GAN head", "gan_tap")

    def tap_features(self, output):
        """The hooked module's output as (N, C, h, w) features."""
        features = output[0] if isinstance(output, tuple) else output
        if features.ndim != 4:
            raise UserError(f"the GAN tap {self.tap_name!r} gives {features.ndim}-D features; it needs (N, C, h, w): "
                            "choose a convolutional block (gan_tap in the spec)")
        return features

    def time_embedding(self) -> tuple[nn.Module, int]:
        module = self._named(self.time_embedding_name, "a step-count (SFD-v) or per-step (fake_per_step) condition",
                             "time_embedding")
        return module, last_linear_width(module)

    def enable_checkpointing(self) -> None:
        """Gradient checkpointing: the network keeps only its blocks' inputs in the forward and recomputes the rest
        in the backward (diffusers models' own enable_gradient_checkpointing)."""
        net = self.network
        try:
            net.enable_gradient_checkpointing()
        except (AttributeError, ValueError):
            raise UserError(f"gradient_checkpointing: {type(net).__name__} does not support it (diffusers models "
                            "do); turn it off") from None

    def save(self, folder: Path) -> dict:
        raise NotImplementedError

    @classmethod
    def load(cls, folder: Path, entry: dict) -> "Backbone":
        raise NotImplementedError


class DiffusersBackbone(Backbone):
    """A diffusers model saved with save_pretrained into one sub-folder, loadable with its class's from_pretrained."""

    folder_name = "unet"

    def save(self, folder: Path) -> dict:
        net = self.network
        net.save_pretrained(Path(folder) / self.folder_name, safe_serialization=True)
        return {"format": "diffusers", "backbone": type(self).__name__, "class": type(net).__name__,
                "folder": self.folder_name}

    @classmethod
    def load(cls, folder: Path, entry: dict) -> "Backbone":
        import diffusers

        from distill.teachers.loading import load_diffusers_model

        model_class = getattr(diffusers, entry.get("class", ""), None)
        if model_class is None:
            raise UserError(f"{folder}: the manifest's network class {entry.get('class')!r} is not a diffusers model")
        return cls(load_diffusers_model(model_class, Path(folder) / entry.get("folder", cls.folder_name)))


def backbone_classes() -> dict:
    """Backbone class name -> class, for loading student bundles (every adapter's classes)."""
    from distill.teachers.factory import FactoryBackbone
    from distill.teachers.latent import SDUNetBackbone, SDXLUNetBackbone
    from distill.teachers.pixel import PixelUNetBackbone
    from distill.teachers.sd3 import SD3TransformerBackbone

    return {c.__name__: c for c in (PixelUNetBackbone, SDUNetBackbone, SDXLUNetBackbone, SD3TransformerBackbone,
                                    FactoryBackbone)}


def load_backbone(folder: Path, entry: dict) -> Backbone:
    cls = backbone_classes().get(entry.get("backbone"))
    if cls is None:
        raise UserError(f"{folder}: unknown network backbone {entry.get('backbone')!r}; this fewstep knows "
                        f"{', '.join(backbone_classes())}")
    return cls.load(Path(folder), entry)
