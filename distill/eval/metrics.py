"""Metrics: the digits Fréchet distance and class accuracy, standard FID, image grids, records.

FD = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussian fits of two feature sets
(Heusel et al. 2017). For digits the features are the project's classifier's 64-d embedding and
the reference set is the training split, like FID on CIFAR-10's training images.
"""

import json
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from distill.data import from_uint8, to_uint8
from distill.digits import CLASSIFIER_DIR
from distill.digits.data import load_digits_split


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: regularise as the reference FID code does
        eps = np.eye(len(sigma1)) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + eps) @ (sigma2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


class DigitsMetric:
    """FD against the training split and class accuracy, in the digits classifier's feature space."""

    def __init__(self, classifier_dir: Path = CLASSIFIER_DIR, batch_size: int = 500, reference: str = "train"):
        """reference: the split FD is measured against ("train", the reported metric; "heldout", 360 images the
        students never see, for choosing checkpoints without tuning on the reported metric's reference)."""
        from distill.eval.classifier import load_classifier

        self.classifier = load_classifier(classifier_dir)
        self.batch_size = batch_size
        images, _ = load_digits_split(reference)
        self.ref_mu, self.ref_sigma = gaussian_stats(self._features_and_logits(to_uint8(images))[0])

    @torch.no_grad()
    def _features_and_logits(self, images_uint8) -> tuple[np.ndarray, np.ndarray]:
        x = from_uint8(torch.as_tensor(images_uint8))  # quantised exactly like saved samples
        feats, logits = [], []
        for chunk in x.split(self.batch_size):
            f = self.classifier.features(chunk)
            feats.append(f)
            logits.append(self.classifier.head(f))
        return torch.cat(feats).double().numpy(), torch.cat(logits).numpy()

    def __call__(self, images_uint8, labels=None) -> dict:
        """images (N, H, W, 1) uint8; labels (N,) the requested classes (None: no accuracy)."""
        feats, logits = self._features_and_logits(images_uint8)
        result = {"fd": frechet_distance(*gaussian_stats(feats), self.ref_mu, self.ref_sigma)}
        if labels is not None:
            result["accuracy"] = float((logits.argmax(1) == np.asarray(labels)).mean())
        return result


@lru_cache(maxsize=1)
def digits_metric() -> DigitsMetric:
    return DigitsMetric()


@lru_cache(maxsize=1)
def heldout_metric() -> DigitsMetric:
    """FD against the 360 held-out images: no student or teacher trained on them, so a generator that drifts
    towards the training images (the GAN's real data) gains nothing here. Its smaller reference biases it up."""
    return DigitsMetric(reference="heldout")


def digits_scores(images_uint8, labels=None) -> dict:
    """The reported digits metric (FD against the training split, class accuracy) plus `fd_heldout`."""
    return digits_metric()(images_uint8, labels) | {"fd_heldout": heldout_metric()(images_uint8)["fd"]}


def inception_fid(images_uint8, reference_uint8, weights_path: Path) -> float:
    """Standard FID with a local Inception-v3 weights file (pytorch-fid's pt_inception layout)."""
    from distill.eval.inception import inception_features, load_fid_inception

    model = load_fid_inception(weights_path)
    a = inception_features(model, torch.as_tensor(images_uint8)).numpy()
    b = inception_features(model, torch.as_tensor(reference_uint8)).numpy()
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def save_grid(images_uint8, path: Path, nrow: int = 10, scale: int = 4, pad: int = 2) -> Path:
    """Write (N, H, W, C) uint8 images as one PNG grid, upscaled (nearest) so small images are visible."""
    from PIL import Image

    images = np.asarray(images_uint8)
    n, h, w, c = images.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    grid = grid.repeat(scale, 0).repeat(scale, 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
    return path


def append_record(out_dir: Path, record: dict) -> dict:
    """Append one result to out_dir/metrics.jsonl and keep out_dir/metrics.json as the list of all."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tmp = out_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(records, indent=2))
    tmp.replace(out_dir / "metrics.json")
    return record
