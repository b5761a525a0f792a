"""A small class-conditional flow-matching network for 16x16 digits, written as a plain torch module.

It stands for "a network someone else wrote": fewstep knows it only through `fewstep_factory.json` beside it
(the factory function, the weights and the parameterisation). It predicts the flow velocity v = eps - x0 at
x_t = (1 - t) x0 + t eps, and takes the time as 1000 t (as SD3's transformer does).
"""

import math

import torch
from torch import nn


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) times -> (N, dim) [cos, sin] features over geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)  # scale and shift of the second norm
        self.norm2 = nn.GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(torch.nn.functional.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(torch.nn.functional.silu(h))
        return self.skip(x) + h


class FlowNet(nn.Module):
    """16x16 -> 8x8 -> 4x4 and back, one residual block per level, a time + class embedding in every block."""

    def __init__(self, channels: int = 32, num_classes: int = 11, emb_dim: int = 128):
        super().__init__()
        c1, c2 = channels, 2 * channels
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes, emb_dim)
        self.conv_in = nn.Conv2d(1, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, emb_dim)  # 16x16
        self.pool1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.down2 = ResBlock(c2, c2, emb_dim)  # 8x8
        self.pool2 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)
        self.mid = ResBlock(c2, c2, emb_dim)  # 4x4: the bottleneck
        self.up2 = ResBlock(2 * c2, c2, emb_dim)  # 8x8
        self.up1 = ResBlock(c2 + c1, c1, emb_dim)  # 16x16
        self.norm_out = nn.GroupNorm(8, c1)
        self.conv_out = nn.Conv2d(c1, 1, 3, padding=1)

    def forward(self, x, t, class_labels):
        emb = self.time_mlp(sinusoid(t, self.emb_dim)) + self.class_emb(class_labels)  # (N, E)
        emb = torch.nn.functional.silu(emb)
        h1 = self.down1(self.conv_in(x), emb)  # (N, c1, 16, 16)
        h2 = self.down2(self.pool1(h1), emb)  # (N, c2, 8, 8)
        h = self.mid(self.pool2(h2), emb)  # (N, c2, 4, 4)
        h = nn.functional.interpolate(h, scale_factor=2, mode="nearest")
        h = self.up2(torch.cat([h, h2], dim=1), emb)  # (N, c2, 8, 8)
        h = nn.functional.interpolate(h, scale_factor=2, mode="nearest")
        h = self.up1(torch.cat([h, h1], dim=1), emb)  # (N, c1, 16, 16)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))


def build(channels: int = 32, num_classes: int = 11, emb_dim: int = 128) -> FlowNet:
    return FlowNet(channels, num_classes, emb_dim)
