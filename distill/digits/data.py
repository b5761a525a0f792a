"""The embedded default data set: scikit-learn's handwritten digits (1,797 images, 8x8, 10 classes).

Images are upsampled to 16x16 (a size a UNet can halve twice), scaled to [-1, 1] and split once,
stratified and seeded, into a training split (1,437) and a held-out split (360).
"""

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10
SPLIT_SEED = 0
HELDOUT_FRACTION = 0.2


def load_digits_split(split: str = "train", size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, size, size) float32 in [-1, 1] and labels (N,) int64 of one fixed split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    digits = load_digits()
    idx_train, idx_heldout = train_test_split(
        range(len(digits.target)), test_size=HELDOUT_FRACTION, random_state=SPLIT_SEED, stratify=digits.target
    )
    idx = torch.tensor(idx_train if split == "train" else idx_heldout)
    x = torch.from_numpy(digits.images).float()[idx].unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x * 2 - 1).clamp(-1, 1)
    y = torch.from_numpy(digits.target).long()[idx]
    return x.contiguous(), y


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Light augmentation: a random translation of up to `max_shift` pixels, background-filled.

    Digits are not mirror- or rotation-invariant, so shifting is the only safe label-preserving move.
    """
    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)  # -1 is the background level
    dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None])  # (N, H)
    cols = (dx[:, None] + torch.arange(w)[None])  # (N, W)
    batch = torch.arange(n)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
