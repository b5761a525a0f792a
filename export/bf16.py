"""The bf16 precision path: not a file of its own but the fp32 file run by OpenVINO with a bf16 inference
precision (oneDNN's avx512_bf16 / AMX kernels; ONNX Runtime's CPU provider has no bf16 convolutions)."""

import time
from functools import partial
from pathlib import Path

import numpy as np

from fewstep.errors import UserError

from .parity import openvino_runner, parity, within_tolerance


def checked_bf16(fp32: Path, feeds: list[dict], wants: list[list[np.ndarray]], seconds: float) -> dict:
    """The "bf16" manifest entry: the fp32 file, run by OpenVINO with a bf16 inference precision (oneDNN's
    avx512_bf16 / AMX kernels), after its parity check through OpenVINO; UserError without OpenVINO or bf16."""
    t0 = time.perf_counter()
    errors = parity(fp32, feeds, wants, partial(openvino_runner, inference_precision="bf16"))
    ok, checked = within_tolerance("bf16", errors)
    if not ok:
        raise UserError(f"bf16 (OpenVINO) of the unet differs from PyTorch: {checked}; nothing was written")
    return {"path": fp32.name, "component": "unet", "precision": "bf16", "backend": "openvino-cpu",
            "inference_precision": "bf16", **errors, "parity": f"{checked}, through OpenVINO",
            "export_seconds": round(seconds + time.perf_counter() - t0, 1)}
