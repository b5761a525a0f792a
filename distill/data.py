"""Images in and out: uint8 <-> [-1, 1] tensors (what every CLI writes), and real data for DMD2's GAN loss from a
local folder of images.

Two layouts, the usual ones of image datasets on disk:

- class folders (class-conditional pixel teachers): `DIR/<class id>/*.png` with class ids 0..K-1;
  images directly in DIR for unconditional teachers;
- captioned images (text-to-image teachers): `DIR/name.png` with its caption in `DIR/name.txt`, or a
  `DIR/metadata.jsonl` whose lines are {"file_name": ..., "text": ...} (the diffusers / datasets layout).

Images are centre-cropped to the target aspect, resized and scaled to [-1, 1]. Every unreadable file is
reported by name (all of them, not just the first), so a broken dataset is fixed in one pass.
"""

import json
from pathlib import Path

import numpy as np
import torch

from distill.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_images(files: list[Path], size: tuple[int, int], channels: int) -> torch.Tensor:
    """(N, C, H, W) float in [-1, 1]; raises one UserError naming every file that cannot be read."""
    from PIL import Image, UnidentifiedImageError

    out, bad = [], []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                w, h = im.size
                target = size[1] / size[0]  # W / H
                if w / h > target:  # too wide: crop the sides
                    cw = round(h * target)
                    im = im.crop(((w - cw) // 2, 0, (w - cw) // 2 + cw, h))
                elif w / h < target:
                    ch = round(w / target)
                    im = im.crop((0, (h - ch) // 2, w, (h - ch) // 2 + ch))
                im = im.resize((size[1], size[0]), Image.Resampling.BICUBIC)
                a = np.asarray(im, dtype=np.float32)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            bad.append(f"{f.name} ({type(e).__name__})")
            continue
        a = a[..., None] if a.ndim == 2 else a
        out.append(torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1)
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise UserError(f"{len(bad)} image file(s) in {files[0].parent} cannot be read: {shown}; "
                        "remove or fix them")
    return torch.stack(out)


def load_class_folder(folder: Path, size: tuple[int, int], channels: int,
                      num_classes: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels) from class sub-folders named 0..K-1, or (images, None) from a flat folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"data folder {folder} does not exist (or is not a folder)")
    if num_classes is None:
        files = _image_files(folder)
        if not files:
            raise UserError(f"{folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return _read_images(files, size, channels), None
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    names = [p.name for p in subdirs]
    if not subdirs or any(not n.isdigit() or not 0 <= int(n) < num_classes for n in names):
        raise UserError(f"{folder}: a class-conditional teacher needs one sub-folder per class, named 0..."
                        f"{num_classes - 1}; found {names[:10] or 'none'}")
    images, labels = [], []
    for sub in subdirs:
        files = _image_files(sub)
        if files:
            images.append(_read_images(files, size, channels))
            labels += [int(sub.name)] * len(files)
    if not images:
        raise UserError(f"{folder} has class folders but no images in them")
    return torch.cat(images), torch.tensor(labels)


def load_captioned_folder(folder: Path, size: tuple[int, int]) -> tuple[torch.Tensor, list[str]]:
    """(images (N, 3, H, W) in [-1, 1], captions) from metadata.jsonl or name.txt files beside the images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"data folder {folder} does not exist (or is not a folder)")
    meta = folder / "metadata.jsonl"
    if meta.exists():
        files, captions = [], []
        for i, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                files.append(folder / row["file_name"])
                captions.append(str(row["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{meta}, line {i}: expected {{\"file_name\": ..., \"text\": ...}}") from None
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise UserError(f"{meta} lists {len(missing)} missing file(s): {', '.join(missing[:10])}")
    else:
        files = _image_files(folder)
        captions = []
        uncaptioned = [f.name for f in files if not f.with_suffix(".txt").exists()]
        if uncaptioned:
            raise UserError(f"{folder}: {len(uncaptioned)} image(s) have no caption file (e.g. "
                            f"{uncaptioned[0]} needs {Path(uncaptioned[0]).stem}.txt), and there is no metadata.jsonl")
        captions = [f.with_suffix(".txt").read_text().strip() for f in files]
    if not files:
        raise UserError(f"{folder} has no captioned images")
    return _read_images(files, size, 3), captions


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, the layout every CLI writes."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) float32 in [-1, 1]."""
    return torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
