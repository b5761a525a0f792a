"""The Python half of the C ABI (runtime/capi/fewstep.c): two calls over `Pipeline`, nothing else.

The C side passes its buffers as memoryviews over the host's memory: the labels are read from it and the images
are written straight into the caller's `out` buffer (one copy, no bytes object in between). Errors are the
Pipeline's own: a UserError's one-line text is what `fewstep_last_error()` returns.
"""

import numpy as np

from .errors import UserError
from .pipeline import Pipeline


def open_engine(engine_dir: str, backend: str, precision: str) -> tuple[Pipeline, int, int, int, int]:
    """(pipeline, height, width, channels, number of classes or 0) for `fewstep_open`."""
    pipe = Pipeline.load(engine_dir, backend or "auto", precision or "fp32")
    if len(pipe.x_shape) != 3:
        raise UserError(f"{engine_dir}: images of shape {pipe.x_shape} are not (C, H, W)")
    c, h, w = pipe.x_shape
    return pipe, h, w, c, pipe.num_classes or 0


def generate_into(pipe: Pipeline, labels: memoryview | None, n: int, nfe: int, seed: int, out: memoryview) -> float:
    """Generate n images (labels: n int64 class labels, None for unconditional engines) into `out` as (N, H, W, C)
    uint8; returns the pipeline's total milliseconds. nfe 0 means the engine's default."""
    conditions = None if labels is None else np.frombuffer(labels, np.int64, count=n).copy()
    result = pipe.generate(conditions, n=n if conditions is None else None, nfe=nfe or None, seed=seed)
    images = result.images.reshape(-1)
    if len(out) < images.size:  # the C side checks first; this keeps the Python call safe on its own
        raise UserError(f"the output buffer holds {len(out)} bytes; the images need {images.size}")
    np.frombuffer(out, np.uint8, count=images.size)[:] = images
    return float(result.timings["total_ms"])
