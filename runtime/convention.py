"""The denoiser convention in numpy, for engines (no torch): what the runtime computes around the graph.

An exported student graph takes x_vp = x / sqrt(1 + sigma^2) preconditioning inside and returns the UNet's raw
prediction; x0 is computed here, in float64, from the engine manifest's `prediction_type` (DESIGN.md §2). Doing
the last step outside the graph keeps the graph well conditioned: at the top sigma (~150), x0 = x - sigma * eps
multiplies any error in eps by sigma, which is a property of the formula, not of the engine.
"""

import math

import numpy as np

from . import native

KINDS = {"epsilon": 0, "v_prediction": 1, "sample": 2}  # runtime/_native.c's codes


def x0_from_output(out: np.ndarray, x: np.ndarray, sigma, prediction_type: str) -> np.ndarray:
    """x0 from a VP model's raw output at x_vp = x / sqrt(1 + sigma^2), x in VE form; sigma (N,), or one number for
    the whole batch (the runtime's loop: the same formulas on Python floats, so the same float64 result in fewer
    array operations; this runs on every step of every request)."""
    if np.ndim(sigma) == 0:
        if native.lib is not None and prediction_type in KINDS and x.dtype == np.float64 and out.dtype == np.float32:
            x0 = np.empty(x.shape, np.float64)  # the same operations in C, in the same order
            native.lib.x0(np.ascontiguousarray(out), np.ascontiguousarray(x), float(sigma), KINDS[prediction_type],
                          x0)
            return x0
        s, out, x = float(sigma), out.astype(np.float64), np.asarray(x, dtype=np.float64)
        if prediction_type == "epsilon":
            return x - s * out
        if prediction_type == "v_prediction":
            return x / (1 + s * s) - s / math.sqrt(1 + s * s) * out
        if prediction_type == "sample":
            return out
        raise ValueError(f"unknown prediction type {prediction_type!r}")
    s = np.asarray(sigma, dtype=np.float64).reshape(-1, *([1] * (x.ndim - 1)))
    out, x = out.astype(np.float64), x.astype(np.float64)
    if prediction_type == "epsilon":
        return x - s * out
    if prediction_type == "v_prediction":
        return x / (1 + s**2) - s / np.sqrt(1 + s**2) * out
    if prediction_type == "sample":
        return out
    raise ValueError(f"unknown prediction type {prediction_type!r}")
