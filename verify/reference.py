"""The PyTorch reference backend: the student bundle an engine was exported from, run by PyTorch on the graph's own
inputs, behind the runtime's loop (runtime.Pipeline takes any object with `name` and `run(feed)` as its backend).
It lives here, not in runtime/, because it needs distill (the bundle) and export (the graph module): the runtime
never imports torch.
"""

import threading
from pathlib import Path

import numpy as np

from export.fp16 import HalfGraph
from export.graph import GraphStudent
from fewstep.errors import UserError
from runtime.manifest import read_manifest
from runtime.pipeline import Pipeline

MODES = ("eager", "compiled", "cudagraph")


def reference_pipeline(engine_dir: str | Path, mode: str = "eager", precision: str = "fp32",
                       bundle: str | Path | None = None, device: str | None = None) -> Pipeline:
    """A runtime Pipeline over `engine_dir` whose network is the PyTorch student. `bundle`: the student bundle, where
    it is not at the path the engine manifest recorded at export."""
    if mode not in MODES:
        raise UserError(f"unknown PyTorch mode {mode!r}; one of {', '.join(MODES)}")
    bundle = bundle or read_manifest(Path(engine_dir)).get("student", {}).get("bundle")
    return Pipeline.load(engine_dir, TorchBackend(bundle, mode, precision, device), precision)


class TorchBackend:
    """The PyTorch student (the bundle the engine was exported from), on the same graph inputs: the reference.

    On CUDA when torch sees a GPU, with PyTorch's own defaults (cuDNN convolutions may use TF32 in fp32).
    `precision` fp16 runs the module export's fp16 file was made from (HalfGraph:
    fp16 weights and compute, fp32 inputs and output), so it compares like with like. `mode`:
    - "eager": plain calls;
    - "compiled": `torch.compile` (default mode);
    - "cudagraph": CUDA only; one graph captured per input shape on first use, then replayed (inputs copied into
      the graph's static tensors). Replays share those tensors, so calls are serialized by a lock.
    """

    def __init__(self, bundle_dir: str | None, mode: str = "eager", precision: str = "fp32", device: str | None = None):
        import torch

        from distill.bundle import load_bundle

        if not bundle_dir or not Path(bundle_dir).is_dir():
            raise UserError(f"the PyTorch backend needs the student bundle this engine came from ({bundle_dir}), "
                            "which is not on this machine; use an ONNX Runtime backend")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if mode == "cudagraph" and device != "cuda":
            raise UserError("the pytorch-cudagraph backend needs a CUDA GPU (torch sees none); use pytorch")
        if precision not in ("fp32", "fp16"):
            raise UserError(f"the PyTorch backend runs fp32 or fp16, not {precision}")
        if precision == "fp16" and device != "cuda":
            raise UserError("the PyTorch backend runs fp16 on CUDA only (the CPU has no fast fp16 convolutions)")
        self.torch = torch
        self.device = device
        self.mode = mode
        self.name = {"eager": f"pytorch-{device}", "compiled": f"pytorch-{device}-compiled",
                     "cudagraph": "pytorch-cudagraph"}[mode]
        graph = GraphStudent(load_bundle(bundle_dir)).eval()
        self.input_names = graph.input_names
        self.model = (HalfGraph(graph) if precision == "fp16" else graph).eval().to(device)
        self.call = torch.compile(self.model) if mode == "compiled" else self.model
        self.graphs = {}  # cudagraph: input shapes -> (graph, static inputs, static output)
        self.lock = threading.Lock()

    def run(self, feed: dict) -> np.ndarray:
        torch = self.torch
        args = [torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self.input_names]
        if self.mode == "cudagraph":
            with self.lock:
                graph, inputs, output = self.graphs.get(tuple(a.shape for a in args)) or self.capture(args)
                for dst, src in zip(inputs, args):
                    dst.copy_(src, non_blocking=False)
                graph.replay()
                return output.float().cpu().numpy()
        with torch.inference_mode():
            return self.call(*[a.to(self.device) for a in args]).float().cpu().numpy()

    def capture(self, args):
        """Capture one graph for these input shapes (after warm-up calls on a side stream, as CUDA graphs need)."""
        torch = self.torch
        inputs = [a.to(self.device) for a in args]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(3):
                self.model(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            output = self.model(*inputs)
        self.graphs[tuple(a.shape for a in args)] = entry = (graph, inputs, output)
        return entry
