"""The digits classifier behind the project's metric: `python -m distill.eval.classifier [--out DIR]`.

A small CNN trained on the training split. Its 64-d penultimate features are the space of the
digits Fréchet distance (the counterpart of FID's Inception pool3), and its predictions give the
class accuracy of conditional samples. The trained one ships in distill/assets/digits_classifier.
"""

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from distill.digits import CLASSIFIER_DIR
from distill.digits.data import NUM_CLASSES, augment, load_digits_split
from distill.errors import UserError, cli_main
from distill.teachers.loading import load_strict, read_json, read_weights


@dataclass
class ClassifierArch:
    channels: tuple = (32, 64, 128)
    feature_dim: int = 64
    num_classes: int = NUM_CLASSES


class DigitsClassifier(nn.Module):
    def __init__(self, arch: ClassifierArch):
        super().__init__()
        layers, c_in = [], 1
        for i, c in enumerate(arch.channels):
            stride = 1 if i == 0 else 2  # 16 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(c_in, c, 3, stride, 1), nn.GroupNorm(8, c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, 1, 1), nn.GroupNorm(8, c), nn.SiLU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Linear(c_in, arch.feature_dim), nn.SiLU())
        self.head = nn.Linear(arch.feature_dim, arch.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) in [-1, 1] -> (N, feature_dim)."""
        return self.embed(self.body(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_classifier(path: Path = CLASSIFIER_DIR) -> DigitsClassifier:
    path = Path(path)
    if not (path / "config.json").exists():
        raise UserError(f"{path} has no config.json: not a digits classifier folder (train one with "
                        f"python -m distill.eval.classifier)")
    arch = read_json(path / "config.json")["arch"]
    model = DigitsClassifier(ClassifierArch(**{**arch, "channels": tuple(arch["channels"])}))
    load_strict(model, read_weights(path / "model.safetensors"), f"the digits classifier in {path}")
    return model.eval()


@dataclass
class ClassifierConfig:
    epochs: int = 40
    batch_size: int = 128
    lr: float = 2e-3
    label_smoothing: float = 0.05
    seed: int = 0


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def train_classifier(cfg: ClassifierConfig, out: Path, arch: ClassifierArch = ClassifierArch()) -> float:
    """Train, write out/config.json + out/model.safetensors (atomically), return held-out accuracy."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = load_digits_split("train")
    x_val, y_val = load_digits_split("heldout")
    model = DigitsClassifier(arch)
    steps = cfg.epochs * (len(x) // cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    t0 = time.perf_counter()
    for _ in tqdm(range(steps), desc="classifier", unit="step"):
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=gen)
        loss = F.cross_entropy(model(augment(x[idx], gen)), y[idx], label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    acc = accuracy(model, x_val, y_val)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(model.state_dict(), str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps({
        "arch": asdict(arch), "training": asdict(cfg), "heldout_accuracy": acc,
        "train_seconds": round(time.perf_counter() - t0, 1)}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return acc


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m distill.eval.classifier", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/digits_classifier"),
                   help=f"output folder (the committed one is {CLASSIFIER_DIR})")
    for f, v in asdict(ClassifierConfig()).items():
        p.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    args = p.parse_args(argv)
    cfg = ClassifierConfig(**{f: getattr(args, f) for f in asdict(ClassifierConfig())})
    acc = train_classifier(cfg, args.out)
    print(f"held-out accuracy {acc:.4f}; classifier written to {args.out}")


if __name__ == "__main__":
    main()
