"""The TensorRT backend (plans built by `python -m export.trt`)."""

import importlib.util


def tensorrt_available() -> bool:
    """TensorRT's Python package is importable (its libraries are then present too)."""
    return importlib.util.find_spec("tensorrt") is not None
