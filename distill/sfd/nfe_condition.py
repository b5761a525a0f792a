"""SFD-v's step-count condition: one student for several NFEs, told how many steps it is taking.

The NFE goes through a sinusoidal position embedding and a small MLP and is added to the UNet's time
embedding, which every resnet block receives (Zhou et al. 2024 add it per block; the time embedding is the
one place a diffusers UNet already routes to all of them). The MLP's last layer starts at zero, so a fresh
student is exactly its teacher. In the graph it is one more input (`nfe`, int64 (N,)), so export keeps it.
"""

import torch
from torch import nn

WEIGHTS_NAME = "nfe_embedding.safetensors"


def sinusoidal(n: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) integers -> (N, dim) [sin, cos] features over geometric frequencies (the transformer's)."""
    half = dim // 2
    freqs = torch.exp(-torch.arange(half, dtype=torch.float32, device=n.device) * (9.21 / max(half - 1, 1)))
    angles = n.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class NFEEmbedding(nn.Module):
    def __init__(self, emb_dim: int, hidden: int = 64):
        super().__init__()
        self.hidden = hidden
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, emb_dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, nfe: torch.Tensor) -> torch.Tensor:
        # the sinusoid in float32, the MLP in its own dtype (fp16 in an fp16 export)
        return self.mlp(sinusoidal(nfe, self.hidden).to(self.mlp[0].weight.dtype))

    def spec(self) -> dict:
        """What the manifest records to rebuild it."""
        return {"emb_dim": self.mlp[-1].out_features, "hidden": self.hidden, "weights": WEIGHTS_NAME}


class NFEConditioned(nn.Module):
    """A backbone that also takes `nfe` (N,) and adds NFEEmbedding(nfe) to its time embedding (the module its adapter
    names), through a forward hook. The backbone's other answers (GAN tap, saving) pass through."""

    def __init__(self, backbone: nn.Module, embedding: NFEEmbedding):
        super().__init__()
        self.backbone = backbone
        self.embedding = embedding
        self._add = None
        backbone.time_embedding()[0].register_forward_hook(self._hook)

    @property
    def network(self):
        return self.backbone.network

    @property
    def unet(self):
        return self.backbone.network

    def tap_module(self):
        return self.backbone.tap_module()

    def tap_features(self, output):
        return self.backbone.tap_features(output)

    def time_embedding(self):
        return self.backbone.time_embedding()

    def save(self, folder):
        return self.backbone.save(folder)

    def _hook(self, module, inputs, output):
        return output if self._add is None else output + self._add.to(output.dtype)

    def forward(self, x, t, nfe=None, **cond):
        self._add = None if nfe is None else self.embedding(nfe.to(x.device))
        try:
            return self.backbone(x, t, **cond)
        finally:
            self._add = None


def time_embed_dim(backbone) -> int:
    """The width of a backbone's time embedding (what the NFE embedding is added to)."""
    return backbone.time_embedding()[1]
