"""DMD2's GAN head on the fake score's bottleneck, and the hook that provides its input.

The head reads the output of the module the backbone's adapter names (a diffusers UNet's `mid_block`, a factory
spec's `gan_tap`), recorded by a forward hook during an ordinary fake-score forward: one call gives both the x0
prediction and the features.
"""

import math

import torch
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)  # 32 groups where the width allows (as the reference)


class GANHead(nn.Module):
    """[conv4x4 stride 2 -> GroupNorm -> SiLU] x n, a full-extent conv to 1x1 (same block form), conv1x1 -> logit.

    Stride-2 blocks halve the map while it is at least 8x8 (so 8x8 -> 4x4, 32x32 -> 4x4). The last
    block's kernel covers the whole remaining map (4x4 for the usual sizes, as the reference's 4x4 stride-4
    conv; the full map for a small one such as a tiny UNet's 4x4): unlike average pooling it keeps where a
    feature sits, and unlike a stride-1 3x3 stack it needs no extra depth on tiny maps. So the head is tied
    to one feature-map size, which is fine: DMD2 trains at one resolution.
    """

    def __init__(self, channels: int, height: int, width: int):
        super().__init__()
        layers = []
        while min(height, width) >= 8:
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), _norm(channels), nn.SiLU()]
            height, width = height // 2, width // 2
        layers += [nn.Conv2d(channels, channels, (height, width)), _norm(channels), nn.SiLU()]  # -> 1x1
        layers += [nn.Conv2d(channels, 1, 1)]
        self.net = nn.Sequential(*layers)

    @classmethod
    def for_features(cls, features: torch.Tensor) -> "GANHead":
        """A head for features shaped like `features` (N, C, H, W)."""
        return cls(*features.shape[1:])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).flatten()  # (N, C, H, W) -> (N,)


class BottleneckTap:
    """Records the features of the backbone's GAN tap (the module its adapter names: a diffusers UNet's mid block, a
    transformer's middle block, a factory spec's `gan_tap`) on every forward, through a forward hook; `pop()` takes
    them as (N, C, h, w)."""

    def __init__(self, backbone: nn.Module):
        self.features = None
        self.backbone = backbone
        self.handle = backbone.tap_module().register_forward_hook(self._record)

    def _record(self, module, inputs, output):
        self.features = self.backbone.tap_features(output)  # (N, C, h, w)

    def pop(self) -> torch.Tensor:
        if self.features is None:
            raise RuntimeError("no bottleneck features recorded: run the fake score first")
        features, self.features = self.features, None
        return features

    def remove(self) -> None:
        self.handle.remove()


class StepEmbedding(nn.Module):
    """A learned vector per student step, added to the backbone's time embedding (a forward hook on the module its
    adapter names): the fake score then models each step's outputs on their own. Zero at the start, so the
    fake score starts as the teacher. `step` (N,) must be set before each forward."""

    def __init__(self, backbone: nn.Module, num_steps: int):
        super().__init__()
        time_embedding, width = backbone.time_embedding()
        self.table = nn.Embedding(num_steps, width)
        nn.init.zeros_(self.table.weight)
        self.step = None
        self.handle = time_embedding.register_forward_hook(self._add)

    def _add(self, module, inputs, output):
        if self.step is None:
            raise RuntimeError("the step-conditioned fake score was called without its student steps")
        step, self.step = self.step, None  # one forward per setting: a stale step can never be reused
        return output + self.table(step.to(output.device)).to(output.dtype)


class FakeScore(nn.Module):
    """The fake score and its GAN head as one module: one forward gives the x0 prediction and, when the head
    exists, the logits on the bottleneck features. One module, one optimizer, one DDP wrapper.
    `num_steps`: condition it on the student step (StepEmbedding; forward then takes `step`)."""

    def __init__(self, denoiser: nn.Module, head: GANHead | None, num_steps: int | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.head = head
        self.tap = BottleneckTap(denoiser.net) if head is not None else None
        self.steps = StepEmbedding(denoiser.net, num_steps) if num_steps else None

    def forward(self, x, sigma, cond, logits: bool = True, step: torch.Tensor | None = None):
        if self.steps is not None:
            self.steps.step = step
        x0 = self.denoiser(x, sigma, cond)
        if self.tap is None:
            return x0, None
        features = self.tap.pop()
        # a fresh tensor, not the head's flattened view: under FSDP2 the module's backward hook rides on its outputs,
        # and an in-place op on a view would drop it
        return x0, (self.head(features).clone() if logits else None)
