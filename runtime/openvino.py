"""OpenVINO on the CPU: the engine's ONNX file read directly, one network call per `run`, numpy in and out.

    backend = OpenVinoBackend("runs/x/engine/student_fp32.onnx", inference_precision="bf16", threads=2)
    prediction = backend.run(feed)

Why a second CPU engine: OpenVINO compiles the graph for one shape and fuses what ONNX Runtime's CPU provider runs
op by op (the exported GroupNorm's Reshape / InstanceNormalization / Mul / Add, the shape arithmetic of the dynamic
batch, the Q/DQ pairs around every layer), and it runs bf16 convolutions on CPUs with avx512_bf16 or AMX, which
ONNX Runtime's CPU provider does not (docs/cpu_profile.md has the measurements).

- Static shapes: the graph is reshaped to each batch size it sees and compiled once per size (a dynamic batch
  dimension made the same graph two to three times slower); the compiled models are kept, MAX_COMPILED of them.
- `inference_precision` is OpenVINO's INFERENCE_PRECISION_HINT and always given explicitly: "f32", or "bf16" where
  the CPU has bf16 instructions (OpenVINO's own default on such CPUs is bf16, which a file called fp32 must not
  silently get). int8 files run their Q/DQ layers in int8 (OpenVINO's low-precision transformations) and the rest
  in the hinted precision.
- Threads: INFERENCE_NUM_THREADS (default: every core) in one stream with the LATENCY hint; the THROUGHPUT hint
  is for several requests in flight from several threads.
- Thread safety: a compiled model is shared; each thread gets its own infer request.
"""

import os
import threading
from pathlib import Path

import numpy as np

from .errors import UserError

MAX_COMPILED = 8  # compiled batch sizes kept per backend (each is one copy of the weights in OpenVINO's layout)


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_supports_bf16() -> bool:
    """Whether OpenVINO's CPU plugin offers bf16 inference here (avx512_bf16 or AMX)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVinoBackend:
    def __init__(self, path: str | Path, inference_precision: str = "f32", threads: int | None = None,
                 hint: str = "LATENCY"):
        try:
            import openvino as ov
        except ImportError:
            raise UserError("the openvino-cpu backend needs OpenVINO: pip install openvino "
                            "(or the [cpu] extra)") from None
        if inference_precision not in ("f32", "bf16"):
            raise UserError(f"OpenVINO inference precision must be f32 or bf16, not {inference_precision!r}")
        if inference_precision == "bf16" and not cpu_supports_bf16():
            raise UserError("this CPU has no bf16 instructions (avx512_bf16 or AMX); use precision fp32 or int8")
        self.name = "openvino-cpu"
        self.inference_precision = inference_precision
        self.core = ov.Core()
        self.model = self.core.read_model(str(path))
        threads = threads or int(os.environ.get("FEWSTEP_THREADS", "0"))
        self.config = {"INFERENCE_PRECISION_HINT": inference_precision, "PERFORMANCE_HINT": hint}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        self.inputs = {p.get_any_name(): p.get_partial_shape() for p in self.model.inputs}
        self.output = self.model.outputs[0].get_any_name()
        self.compiled: dict[int, object] = {}
        self.lock = threading.Lock()
        self.local = threading.local()

    def compiled_for(self, batch: int):
        """The model compiled for `batch` (compiled on first use, then kept; the oldest size goes past
        MAX_COMPILED)."""
        with self.lock:
            compiled = self.compiled.get(batch)
            if compiled is None:
                model = self.model.clone()
                model.reshape({name: [batch, *(d.get_length() for d in shape[1:])]
                               for name, shape in self.inputs.items()})
                compiled = self.core.compile_model(model, "CPU", self.config)
                if len(self.compiled) >= MAX_COMPILED:
                    del self.compiled[next(iter(self.compiled))]
                self.compiled[batch] = compiled
            return compiled

    def run(self, feed: dict) -> np.ndarray:
        batch = len(feed["x"])
        compiled = self.compiled_for(batch)
        requests = getattr(self.local, "requests", None)
        if requests is None:
            requests = self.local.requests = {}
        request = requests.get(batch)
        if request is None or request[0] is not compiled:  # a request belongs to one compiled model
            request = requests[batch] = (compiled, compiled.create_infer_request())
        out = request[1].infer({k: np.ascontiguousarray(v) for k, v in feed.items()})
        return np.array(out[self.output], dtype=np.float32)
