"""Backends: one network call, numpy in and out. The loop around them (runtime/pipeline.py) is the same for all.

    backend.run(feed: {input name: array}) -> prediction (float32 array)

- `OnnxRuntimeBackend`: ONNX Runtime on the CPU provider, or CUDA with I/O binding when onnxruntime-gpu is
  installed. Its sessions are thread-safe (ONNX Runtime's `run` may be called from several threads).
- `TorchBackend`: the PyTorch student itself, the reference (imports torch only when chosen).
- TensorRT plans: see runtime/tensorrt.py.
"""

import os
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
    def __init__(self, path: Path, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        self.device = device
        self.name = f"onnxruntime-{device}"
        options = ort.SessionOptions()
        # intra-op threads: all physical cores by default (ORT's own default); FEWSTEP_THREADS or `threads` override
        threads = threads or int(os.environ.get("FEWSTEP_THREADS", "0"))
        if threads:
            options.intra_op_num_threads = threads
        provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[device]
        if provider not in ort.get_available_providers():
            raise UserError(f"ONNX Runtime here has no {provider}; install onnxruntime-gpu for CUDA, or use "
                            "backend='onnxruntime-cpu'")
        self.session = ort.InferenceSession(str(path), options, providers=[provider])
        self.output = self.session.get_outputs()[0].name

    def run_all(self, feed: dict) -> dict:
        """Every output of the graph by name (text encoders have two), on the CPU provider's plain path."""
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feed)))

    def run(self, feed: dict) -> np.ndarray:
        if self.device == "cpu":
            return self.session.run([self.output], feed)[0]
        # CUDA: inputs copied once to the device, the output bound there and copied back once (no
        # per-tensor allocations by the session); a binding per call keeps concurrent calls independent.
        binding = self.session.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output(self.output, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


class TorchBackend:
    """The PyTorch student (the bundle the engine was exported from), on the same graph inputs: the reference."""

    def __init__(self, bundle_dir: str | None, device: str = "cpu", compile: bool = False):
        import torch

        from distill.bundle import load_bundle
        from export.onnx import GraphStudent

        if not bundle_dir or not Path(bundle_dir).is_dir():
            raise UserError(f"the PyTorch backend needs the student bundle this engine came from ({bundle_dir}), "
                            "which is not on this machine; use an ONNX Runtime backend")
        self.torch = torch
        self.device = device
        self.name = f"pytorch-{device}" + ("-compiled" if compile else "")
        self.model = GraphStudent(load_bundle(bundle_dir)).eval().to(device)
        self.call = torch.compile(self.model) if compile else self.model

    def run(self, feed: dict) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(feed[n])).to(self.device) for n in self.model.input_names]
            return self.call(*args).float().cpu().numpy()
