"""Strict weight loading: every key matched, or an error that names the ones that are not."""

import json
from pathlib import Path

import torch
from torch import nn

from distill.errors import UserError

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, a sharded safetensors index, or a torch file (weights_only)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"weights file {path} does not exist")
    if path.name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(read_weights(path.parent / shard))
        return state
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:  # weights_only refuses pickled code: a plain state dict of tensors loads, anything else fails
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a loadable weights file ({type(e).__name__}: {e}); "
                        "use safetensors or a plain PyTorch state dict") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return state


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """load_state_dict(strict) with a readable message naming missing / unexpected keys."""
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        def show(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = []
        if result.missing_keys:
            parts.append(f"missing {len(result.missing_keys)} keys: {show(result.missing_keys)}")
        if result.unexpected_keys:
            parts.append(f"unexpected {len(result.unexpected_keys)} keys: {show(result.unexpected_keys)}")
        raise UserError(f"weights do not fit {what}: " + "; ".join(parts))
    return module


def find_weights(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        for candidate in (folder / name, folder / f"{name}.index.json"):
            if candidate.exists():
                return candidate
    raise UserError(f"no safetensors weights in {folder} (looked for {', '.join(WEIGHT_NAMES[:2])})")


def load_diffusers_model(cls, folder: Path):
    """Build a diffusers model class from folder/config.json and load its weights strictly."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise UserError(f"{folder} has no config.json: not a diffusers model folder")
    try:
        config = cls.load_config(folder)
        model = cls.from_config(config)
    except Exception as e:
        raise UserError(f"{folder}/config.json does not describe a {cls.__name__} ({type(e).__name__}: {e})") from None
    load_strict(model, read_weights(find_weights(folder)), f"{cls.__name__} from {folder}")
    return model.float().eval()


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
