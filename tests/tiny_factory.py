"""Tiny random factory networks of each family, written the way a user's own network is: a class in a .py file,
a state dict and a fewstep_factory.json beside them."""

import json
from pathlib import Path

import torch

NET_PY = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """(x, t, class_labels) -> prediction; `index`: t is an integer index into an embedding table."""

    def __init__(self, channels=8, num_classes=4, index=False, steps=1000):
        super().__init__()
        self.index = index
        self.time_table = nn.Embedding(steps, 16) if index else None
        self.time_mlp = nn.Sequential(nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 16))
        self.class_emb = nn.Embedding(num_classes, 16)
        self.conv_in = nn.Conv2d(1, channels, 3, padding=1)
        self.emb = nn.Linear(16, channels)
        self.mid = nn.Sequential(nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.GroupNorm(4, channels),
                                 nn.SiLU())
        self.up = nn.Upsample(scale_factor=2)
        self.conv_out = nn.Conv2d(2 * channels, 1, 3, padding=1)

    def forward(self, x, t, class_labels):
        if self.index:
            if t.dtype != torch.long:
                raise TypeError("TinyNet takes integer timesteps")
            feats = self.time_table(t)
        else:
            freqs = torch.exp(-torch.arange(8, dtype=torch.float32, device=x.device))
            feats = torch.cat([(t[:, None] * freqs).sin(), (t[:, None] * freqs).cos()], dim=1)
        emb = self.time_mlp(feats) + self.class_emb(class_labels)
        h = self.conv_in(x) + self.emb(emb)[:, :, None, None]
        m = self.up(self.mid(h))
        return self.conv_out(torch.cat([h, m], dim=1))


def build(**kwargs):
    return TinyNet(**kwargs)
'''

FAMILIES = {
    "edm": {"parameterization": "edm", "prediction_type": "epsilon",
            "scheduler": {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0,
                          "sigma_data": 0.5}},
    "index": {"parameterization": "vp", "prediction_type": "epsilon", "timestep_input": "index",
              "scheduler": {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear"}},
    "flow": {"parameterization": "flow", "prediction_type": "flow", "time_scale": 1000,
             "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                           "shift": 3.0}},
}


def make_factory_dir(path: Path, family: str, num_classes: int = 3, seed: int = 0) -> Path:
    """A teacher folder: net.py + net.safetensors + fewstep_factory.json (class-conditional, null class for CFG)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "net.py").write_text(NET_PY)
    namespace = {}
    exec(compile(NET_PY, "net.py", "exec"), namespace)  # the test's own source, to make its random weights
    torch.manual_seed(seed)
    kwargs = {"num_classes": num_classes + 1, "index": family == "index"}
    net = namespace["build"](**kwargs)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path / "net.safetensors"))
    spec = {"factory": "net.py:build", "kwargs": kwargs, "weights": "net.safetensors", "x_shape": [1, 8, 8],
            "num_classes": num_classes, "null_class": num_classes, "guidance_scale": 1.5,
            "gan_tap": "mid", "time_embedding": "time_mlp", "lora_targets": ["conv_in", "conv_out"],
            **FAMILIES[family]}
    (path / "fewstep_factory.json").write_text(json.dumps(spec, indent=2))
    return path
