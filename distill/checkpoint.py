"""Atomic, pickle-free training state: nested dicts/lists of tensors and plain values.

Tensors go into one safetensors file; the structure (and every non-tensor value, e.g. optimizer
hyper-parameters, the step, the config) goes into its JSON metadata. Writes go to a temporary file
in the same folder and are renamed over the old one, so a crash never leaves a half-written state.
"""

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from distill.errors import UserError

_META_KEY = "fewstep_state"


def _flatten(obj, prefix: str, tensors: dict, storages: set):
    if isinstance(obj, torch.Tensor):
        # Named by a counter, not by path: keys 0 and "0" (or "a/b" and a nested "a" -> "b") stay apart.
        name = f"t{len(tensors)}"
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")  # a fresh tensor of its own
        elif t.untyped_storage().data_ptr() in storages or \
                t.untyped_storage().nbytes() != t.numel() * t.element_size():
            # safetensors refuses tensors that share storage (EMA copies, views): store a private copy. A tensor
            # alone in its storage is stored as it is: a gathered full state is not held twice while it is written.
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        tensors[name] = t.contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):  # keys keep their type (optimizer states use int keys)
        return {"__dict__": [[k, _flatten(v, f"{prefix}/{k}", tensors, storages)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, f"{prefix}/{i}", tensors, storages) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} in a training state")


def _unflatten(node, tensors: dict):
    if isinstance(node, dict):
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__dict__" in node:
            return {k: _unflatten(v, tensors) for k, v in node["__dict__"]}
        if "__list__" in node:
            items = [_unflatten(v, tensors) for v in node["__list__"]]
            return tuple(items) if node["tuple"] else items
    return node


def save_state(path: str | Path, state: dict) -> None:
    """Write `state` to `path` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict = {}
    skeleton = _flatten(state, "", tensors, set())
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(skeleton)})
    os.replace(tmp, path)


def load_state(path: str | Path, leave_out: tuple[str, ...] = ()) -> dict:
    """Read a state written by `save_state`; a damaged file is a clear UserError. The top-level entries named in
    `leave_out` come back as {} without being read (a process that gets them from another one)."""
    path = Path(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            skeleton = json.loads(meta[_META_KEY])
            if leave_out and "__dict__" in skeleton:
                skeleton = {"__dict__": [[k, {"__dict__": []} if k in leave_out else v]
                                         for k, v in skeleton["__dict__"]]}
            tensors = {name: f.get_tensor(name) for name in _tensor_names(skeleton)}
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise UserError(
            f"training checkpoint {path} is unreadable or not a fewstep state ({type(e).__name__}: {e}); "
            f"delete it (or choose another output folder) to start over"
        ) from None
    return _unflatten(skeleton, tensors)


def _tensor_names(node) -> list[str]:
    if isinstance(node, dict):
        if "__tensor__" in node:
            return [node["__tensor__"]]
        children = [v for _, v in node["__dict__"]] if "__dict__" in node else node.get("__list__", [])
        return [name for child in children for name in _tensor_names(child)]
    return []


def rng_state() -> dict:
    """Global torch RNG states (CPU and, where present, CUDA) for exact resumption."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def truncate_log(path: Path, step: int) -> None:
    """Keep only the JSON-lines records of steps before `step`: a resumed run rewrites what came after its
    checkpoint, so the log shows every step once."""
    path = Path(path)
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if lines:  # a crash mid-write (power loss, disk full) can leave the last line torn: it is dropped
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines.pop()
    lines = [line for line in lines if json.loads(line)["step"] < step]
    path.write_text("".join(line + "\n" for line in lines))
