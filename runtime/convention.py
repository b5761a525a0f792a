"""The denoiser convention in numpy, for engines (no torch): what the runtime computes around the graph.

An exported student graph applies its family's input scaling inside (x / sqrt(1 + sigma^2) for DDPM-family
networks, EDM's c_in, x / (1 + sigma) for flow matching) and returns the network's raw prediction; x0 is computed
here, in float64, from the engine manifest's `prediction_type` and `parameterization` (docs/engine_spec.md). Doing
the last step outside the graph keeps the graph well conditioned: at the top sigma (~150), x0 = x - sigma * eps
multiplies any error in eps by sigma, which is a property of the formula, not of the engine.
"""

import math

import numpy as np

from . import native

KINDS = {"epsilon": 0, "v_prediction": 1, "sample": 2}  # runtime/_native.c's codes


def affine_coefficients(sigma, prediction_type: str, parameterization: str, sigma_data: float = 0.5):
    """(c_skip, c_out) of x0 = c_skip x + c_out prediction for EDM and flow engines (float64; sigma a number or an
    (N, 1, ...) array): the same closed forms as distill's EDMDenoiser / FlowDenoiser."""
    s = np.asarray(sigma, dtype=np.float64)
    if prediction_type == "sample":
        return np.zeros_like(s), np.ones_like(s)
    if parameterization == "edm" and prediction_type in ("epsilon", "v_prediction"):
        c_out = s * sigma_data / np.sqrt(s * s + sigma_data**2)
        return sigma_data**2 / (s * s + sigma_data**2), (-c_out if prediction_type == "v_prediction" else c_out)
    if parameterization == "flow" and prediction_type == "flow":  # x0 = x_t - t v, x_t = x / (1 + sigma)
        return 1 / (1 + s), -s / (1 + s)
    if parameterization == "flow" and prediction_type == "epsilon":
        return np.ones_like(s), -s
    raise ValueError(f"unknown prediction type {prediction_type!r} for parameterization {parameterization!r}")


def x0_from_output(out: np.ndarray, x: np.ndarray, sigma, prediction_type: str, parameterization: str = "vp",
                   sigma_data: float = 0.5) -> np.ndarray:
    """x0 from a VP model's raw output at x_vp = x / sqrt(1 + sigma^2), x in VE form; sigma (N,), or one number for
    the whole batch (the runtime's loop: the same formulas on Python floats, so the same float64 result in fewer
    array operations; this runs on every step of every request). `parameterization` (the engine manifest's; vp when
    absent): EDM and flow engines take x0 = c_skip x + c_out prediction (affine_coefficients)."""
    if parameterization != "vp":
        s = sigma if np.ndim(sigma) == 0 else np.asarray(sigma, dtype=np.float64).reshape(-1, *([1] * (x.ndim - 1)))
        c_skip, c_out = affine_coefficients(s, prediction_type, parameterization, sigma_data)
        return c_skip * np.asarray(x, dtype=np.float64) + c_out * out.astype(np.float64)
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
