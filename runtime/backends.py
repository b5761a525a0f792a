"""Backends: one network call, numpy in and out. The loop around them (runtime/pipeline.py) is the same for all.

    backend.run(feed: {input name: array}) -> prediction (float32 array)

- `OnnxRuntimeBackend`: ONNX Runtime on the CPU provider, or CUDA with I/O binding when onnxruntime-gpu is
  installed. Its sessions are thread-safe (ONNX Runtime's `run` may be called from several threads).
- the PyTorch student itself, the reference every engine is compared with: verify/reference.py (outside the
  runtime, which never imports torch); `Pipeline.load` takes it as a backend object.
- TensorRT plans: see runtime/tensorrt.py.
"""

import os
import threading
from pathlib import Path

import numpy as np

from .errors import UserError


def onnxruntime_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return ort.get_available_providers()


class OnnxRuntimeBackend:
    """`device` "cpu" or "cuda". `cuda_graph` (CUDA only): one session per batch size, captured as a CUDA graph on its
    first call and replayed after (ONNX Runtime's enable_cuda_graph: inputs and output bound to fixed device
    buffers, updated in place); calls share those buffers and captures must not overlap launches, so one lock
    serializes them (the GPU runs one graph at a time anyway). Each batch size holds its own session, i.e. its own
    copy of the weights on the GPU: serve a few fixed batch sizes with it (ONNX Runtime's gpu_graph_id run option
    would share one session; not used yet)."""

    def __init__(self, path: Path, device: str = "cpu", threads: int | None = None, cuda_graph: bool = False):
        import onnxruntime as ort

        self.ort = ort
        self.path = path
        self.device = device
        self.cuda_graph = cuda_graph
        self.name = "onnxruntime-cudagraph" if cuda_graph else f"onnxruntime-{device}"
        if cuda_graph and device != "cuda":
            raise UserError("ONNX Runtime's CUDA graphs need a GPU: backend onnxruntime-cudagraph runs on CUDA")
        self.options = ort.SessionOptions()
        # intra-op threads: all physical cores by default (ORT's own default); FEWSTEP_THREADS or `threads` override
        threads = threads or int(os.environ.get("FEWSTEP_THREADS", "0"))
        if threads:
            self.options.intra_op_num_threads = threads
        if device == "cuda":
            # the CPU only runs shape ops here: threads that spin between calls would take cores from the host code
            self.options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if hasattr(ort, "preload_dlls"):
                # CUDA and cuDNN from the nvidia-* wheels (how onnxruntime-gpu's [cuda] extra and PyTorch ship them)
                # are not on the loader's path; ONNX Runtime loads them from site-packages itself, without torch
                ort.preload_dlls()
        provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[device]
        if provider not in ort.get_available_providers():
            raise UserError(f"ONNX Runtime here has no {provider}; install onnxruntime-gpu for CUDA, or use "
                            "backend='onnxruntime-cpu'")
        self.session = ort.InferenceSession(str(path), self.options, providers=[provider])
        self.output = self.session.get_outputs()[0].name
        self.graphs = {}  # cuda_graph: batch size -> (session, binding, input OrtValues, output OrtValue)
        self.lock = threading.Lock()

    def run_all(self, feed: dict) -> dict:
        """Every output of the graph by name (text encoders have two), on the CPU provider's plain path."""
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feed)))

    def run(self, feed: dict) -> np.ndarray:
        if self.device == "cpu":
            return self.session.run([self.output], feed)[0]
        if self.cuda_graph:
            return self.replay(feed)
        # CUDA: inputs copied once to the device, the output bound there and copied back once (no
        # per-tensor allocations by the session); a binding per call keeps concurrent calls independent.
        binding = self.session.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output(self.output, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def replay(self, feed: dict) -> np.ndarray:
        batch = len(next(iter(feed.values())))
        # one lock for captures and replays: a capture (CUDA's global mode) must not overlap another graph's launch
        with self.lock:
            if batch not in self.graphs:
                self.graphs[batch] = self.capture(feed)
            session, binding, inputs, output = self.graphs[batch]
            for name, value in feed.items():
                inputs[name].update_inplace(np.ascontiguousarray(value))
            session.run_with_iobinding(binding)
            return output.numpy()  # a host copy: the next replay overwrites `output`

    def capture(self, feed: dict):
        """A session for this batch size whose first run captures the CUDA graph (ONNX Runtime then replays it)."""
        ort = self.ort
        session = ort.InferenceSession(str(self.path), self.options,
                                       providers=[("CUDAExecutionProvider", {"enable_cuda_graph": "1"})])
        inputs = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), "cuda", 0)
                  for name, value in feed.items()}
        shape = list(feed["x"].shape)  # the prediction has the shape of x
        output = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cuda", 0)
        binding = session.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output(self.output, output)
        try:
            session.run_with_iobinding(binding)  # capture
        except Exception as e:  # ONNX Runtime's own error type; its message says which node stopped the capture
            raise UserError(f"ONNX Runtime could not capture {self.path.name} as a CUDA graph ({str(e)[:200]}); "
                            "engines exported before fewstep made attention's scale a constant need a re-export "
                            "(python -m export.onnx), or use backend onnxruntime-cuda") from None
        return session, binding, inputs, output
