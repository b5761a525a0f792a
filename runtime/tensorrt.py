"""The TensorRT backend: a plan built by `python -m export.trt`, run with TensorRT's 10/11 Python API and NVIDIA's
cuda-python for device memory and streams (no torch).

    backend = TensorRTBackend(engine_dir / "student_fp16.plan", manifest)    # what Pipeline.load does
    prediction = backend.run({"x": x, "sigma": sigma, "timestep": t, ...})   # numpy in, float32 numpy out
    backend.close()                                                          # frees the GPU memory

Per call (docs/design.md §5): `set_input_shape` for each input, the inputs copied into the slot's device buffers,
`set_tensor_address`, `execute_async_v3` on the slot's own (non-default) stream, the prediction copied back, and one
stream synchronisation. Device buffers only grow: a call never allocates unless its batch is the largest this slot
has seen.

Threads: a TensorRT execution context is not thread-safe (it holds the input shapes, tensor addresses and its
scratch memory), so the backend keeps a pool of `contexts` slots, each a (context, stream, buffers) triple, in a
queue. A call takes a free slot and gives it back, so up to `contexts` calls run on the GPU at once and further
threads wait for a slot. Each context costs the engine's activation memory (`engine.device_memory_size`) again.

CUDA graphs (`cuda_graphs=True`): after a plain warm-up call at a batch size, the slot captures its
`execute_async_v3` into a CUDA graph and later calls at that batch size replay it (`cudaGraphLaunch`: one launch
instead of one per kernel, which matters at batch 1). The copies stay outside the graph. The trap: a graph keeps
what it saw when it was captured, namely the device addresses of its buffers and scratch memory and the engine's
weights, and it keeps using them after they change, with no error. So:
- buffer growth drops the slot's graphs, and they are captured again;
- a graph replays only while its context still holds the graph's input shapes: after a call at another batch size,
  the first call back runs plainly (which also applies TensorRT's deferred shape updates), later ones replay;
- never combine graphs with refitting (for example a LoRA swap): a refit engine would still run the old weights in
  every captured graph. This backend does not refit; anything that adds refitting must call `clear_graphs()`.
"""

import importlib.util
import queue
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError

INSTALL_HINT = ('on a machine with an NVIDIA GPU and driver: pip install "fewstep[trt]" (TensorRT and cuda-python), '
                "or use backend='onnxruntime-cuda'")
OUTPUT = "prediction"


def _cuda_python_found() -> bool:
    try:
        return any(importlib.util.find_spec(m) is not None for m in ("cuda.bindings", "cuda.cudart"))
    except ImportError:  # no `cuda` package at all
        return False


def tensorrt_available() -> bool:
    """TensorRT's Python package and cuda-python are importable, so the TensorRT backend can be chosen."""
    return importlib.util.find_spec("tensorrt") is not None and _cuda_python_found()


def import_cudart():
    """cuda-python's CUDA runtime bindings: `cuda.bindings.runtime` (cuda-python 12.6 and later; 13 has only this
    name) or `cuda.cudart` (older releases). Both have the same functions, each returning (cudaError_t, results...)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise UserError(f"the TensorRT backend needs NVIDIA's cuda-python for GPU memory; {INSTALL_HINT}") from None
    return runtime


class CudaError(RuntimeError):
    """A CUDA runtime call failed (out of memory, a lost device, ...): not something the caller's input caused."""


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


_LOGGER = None


def trt_logger():
    """One TensorRT logger for every runtime and engine: TensorRT wants it to outlive all the objects made with it."""
    global _LOGGER
    if _LOGGER is None:
        import tensorrt as trt

        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


@dataclass
class _Slot:
    """One execution context with what only it may touch: its stream, device buffers and captured graphs."""

    context: object
    stream: object
    buffers: dict = field(default_factory=dict)  # tensor name -> (device pointer, bytes)
    shapes: tuple | None = None  # the input shapes the context was last run with
    graphs: dict = field(default_factory=dict)  # input shapes -> instantiated CUDA graph (cudaGraphExec_t)


class TensorRTBackend:
    """`run(feed) -> prediction` on a TensorRT plan; thread-safe through a pool of `contexts` execution contexts."""

    def __init__(self, path: str | Path, manifest: dict | None = None, contexts: int = 2, cuda_graphs: bool = False):
        path = Path(path)
        try:
            import tensorrt as trt
        except ImportError as e:  # also NVIDIA's stub packages whose libraries were never fetched
            raise UserError(f"TensorRT is not installed ({e}), so {path.name} cannot run; {INSTALL_HINT}") from None

        self.trt = trt
        self.cudart = import_cudart()
        if contexts < 1:
            raise UserError(f"contexts must be at least 1; got {contexts}")
        if not path.is_file():
            raise UserError(f"no TensorRT plan at {path}; build one with python -m export.trt")
        entry = next((v for k, v in (manifest or {}).get("files", {}).items()
                      if k.startswith("trt_") and v.get("path") == path.name), {})
        self.path = path
        self.cuda_graphs = cuda_graphs
        self.name = "tensorrt-cudagraphs" if cuda_graphs else "tensorrt"
        self._check_version(entry)

        self._runtime = trt.Runtime(trt_logger())  # kept: the runtime must outlive the engine it made
        # A version-compatible plan carries its own lean runtime as host code; run it only when the manifest says the
        # plan was built so (export.trt --version-compatible).
        self._runtime.engine_host_code_allowed = bool(entry.get("version_compatible"))
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            built = f" (built by TensorRT {entry.get('tensorrt_version', '?')} on {entry.get('device', '?')})" \
                if entry else ""
            raise UserError(f"TensorRT {trt.__version__} cannot load {path.name}{built}: the plan is damaged, or it "
                            "was built for another GPU or TensorRT version (its log above says which); rebuild with "
                            "python -m export.trt on this machine")
        engine = self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in self.inputs]
        self.output = OUTPUT if OUTPUT in outputs else outputs[0]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self.min_batch, self.max_batch = self._batch_range()

        self._slots, self._free, self._closed = [], queue.Queue(), False
        self._lock = threading.Lock()  # one close() or clear_graphs() at a time: each takes every slot
        try:
            for _ in range(contexts):
                # A non-blocking stream: no implicit synchronisation with the legacy default stream, which other
                # libraries in the process may be using.
                stream = self._call(self.cudart.cudaStreamCreateWithFlags(self.cudart.cudaStreamNonBlocking))
                slot = _Slot(engine.create_execution_context(), stream)
                self._slots.append(slot)
                if slot.context is None:
                    raise CudaError(f"TensorRT could not create an execution context for {path.name} (out of GPU "
                                    "memory? its log above says why)")
                self._free.put(slot)
        except BaseException:
            self._release()
            raise

    def _check_version(self, entry: dict) -> None:
        """Plans load only in the TensorRT version that built them; version-compatible ones also in later versions."""
        built = entry.get("tensorrt_version")
        here = self.trt.__version__
        if built is None or built == here:
            return
        if entry.get("version_compatible") and _version(here) >= _version(built):
            return
        raise UserError(f"{self.path.name} was built by TensorRT {built}, and this is TensorRT {here}: a plan runs "
                        "only on the TensorRT version that built it; rebuild with python -m export.trt (add "
                        "--version-compatible for plans that later versions can load)")

    def _batch_range(self) -> tuple[int, int]:
        """The plan's batch sizes: its optimization profile's min and max on axis 0 (static inputs: their size)."""
        lo, hi = 1, None
        for name in self.inputs:
            shape = tuple(self.engine.get_tensor_shape(name))
            if not shape:  # a scalar input has no batch axis
                continue
            if shape[0] >= 0:
                sizes = (shape[0], shape[0])
            else:
                low, _, high = self.engine.get_tensor_profile_shape(name, 0)
                sizes = (tuple(low)[0], tuple(high)[0])
            lo, hi = max(lo, sizes[0]), sizes[1] if hi is None else min(hi, sizes[1])
        return lo, lo if hi is None else hi

    def _call(self, result):
        """cuda-python returns (cudaError_t, results...): raise on an error, else return the result (or None)."""
        err, rest = result[0], result[1:]
        if err != self.cudart.cudaError_t.cudaSuccess:
            raise CudaError(f"CUDA error {getattr(err, 'name', err)} in the TensorRT backend ({self.path.name})")
        return rest[0] if len(rest) == 1 else (rest or None)

    @property
    def graph_batches(self) -> list[int]:
        """Batch sizes with a captured CUDA graph in some slot."""
        return sorted({shapes[0][0] for slot in self._slots for shapes, graph in slot.graphs.items()
                       if graph is not None})

    def run(self, feed: dict) -> np.ndarray:
        hosts = {}
        for name in self.inputs:
            if name not in feed:
                raise UserError(f"{self.path.name} needs input {name!r}; got {', '.join(feed) or 'none'}")
            hosts[name] = np.ascontiguousarray(feed[name], dtype=self.dtypes[name])
        batches = {h.shape[0] if h.ndim else None for h in hosts.values()}
        batch = batches.pop() if len(batches) == 1 else None
        if batch is None:
            raise UserError(f"the inputs of {self.path.name} must share one batch size; got shapes "
                            f"{ {n: h.shape for n, h in hosts.items()} }")
        if not self.min_batch <= batch <= self.max_batch:
            raise UserError(f"batch {batch} is outside this TensorRT plan's batch profile {self.min_batch}.."
                            f"{self.max_batch}; send at most {self.max_batch} images per call, or rebuild with "
                            f"python -m export.trt --batch MIN:OPT:MAX")
        slot = self._free.get()
        if slot is None:  # closed: pass the marker on to the next waiting thread
            self._free.put(None)
            raise UserError(f"this TensorRT backend ({self.path.name}) was closed")
        try:
            return self._run(slot, hosts)
        finally:
            self._free.put(slot)

    def _run(self, slot: _Slot, hosts: dict) -> np.ndarray:
        cudart, context, stream = self.cudart, slot.context, slot.stream
        shapes = tuple(h.shape for h in hosts.values())
        fresh = shapes != slot.shapes
        if fresh:
            slot.shapes = None  # until every shape is set: a failure below must not leave a half-set context
            for name, host in hosts.items():
                if not context.set_input_shape(name, host.shape):
                    raise UserError(f"{self.path.name}: input {name!r} of shape {host.shape} does not fit the plan "
                                    f"(expected {tuple(self.engine.get_tensor_shape(name))} with batch "
                                    f"{self.min_batch}..{self.max_batch})")
            slot.shapes = shapes
        out_shape = tuple(context.get_tensor_shape(self.output))  # known once every input shape is set
        out = np.empty(out_shape, self.dtypes[self.output])
        if self._ensure_buffers(slot, {**{n: h.nbytes for n, h in hosts.items()}, self.output: out.nbytes}):
            fresh = True  # new addresses: set them, and run plainly before capturing again
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, host in hosts.items():
            self._call(cudart.cudaMemcpyAsync(slot.buffers[name][0], host.ctypes.data, host.nbytes, h2d, stream))
        graph = None if fresh else slot.graphs.get(shapes)
        if graph is not None:
            self._call(cudart.cudaGraphLaunch(graph, stream))
        else:
            for name, (pointer, _) in slot.buffers.items():
                context.set_tensor_address(name, pointer)
            if not context.execute_async_v3(int(stream)):
                raise CudaError(f"TensorRT could not run {self.path.name} (its log above says why)")
            if self.cuda_graphs and shapes not in slot.graphs:
                self._capture(slot, shapes)  # this call was the warm-up at these shapes
        self._call(cudart.cudaMemcpyAsync(out.ctypes.data, slot.buffers[self.output][0], out.nbytes, d2h, stream))
        self._call(cudart.cudaStreamSynchronize(stream))
        return out.astype(np.float32, copy=False)

    def _ensure_buffers(self, slot: _Slot, sizes: dict) -> bool:
        """Grow the slot's device buffers to `sizes` (bytes per tensor); True when any address changed, which also
        drops the slot's graphs (they would write to the freed buffers)."""
        grow = {n: b for n, b in sizes.items() if n not in slot.buffers or slot.buffers[n][1] < b}
        if not grow:
            return False
        self._call(self.cudart.cudaStreamSynchronize(slot.stream))
        self._drop_graphs(slot)
        for name, nbytes in grow.items():
            if name in slot.buffers:
                self._call(self.cudart.cudaFree(slot.buffers.pop(name)[0]))
            slot.buffers[name] = (self._call(self.cudart.cudaMalloc(max(nbytes, 1))), nbytes)
        return True

    def _capture(self, slot: _Slot, shapes: tuple) -> None:
        """Record the context's enqueue at `shapes` into a graph. Thread-local capture mode: the other slots' threads
        may keep allocating and copying meanwhile. An engine that cannot be captured (TensorRT refuses some, e.g.
        data-dependent shapes) keeps running plainly at these shapes."""
        cudart, stream = self.cudart, slot.stream
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._call(cudart.cudaStreamBeginCapture(stream, mode))
        ok = slot.context.execute_async_v3(int(stream))
        err, graph = cudart.cudaStreamEndCapture(stream)  # always end the capture, even after a failed enqueue
        if not ok or err != cudart.cudaError_t.cudaSuccess or graph is None:
            slot.graphs[shapes] = None
            return
        try:
            slot.graphs[shapes] = self._call(cudart.cudaGraphInstantiateWithFlags(graph, 0))
        except CudaError:
            slot.graphs[shapes] = None
        finally:
            self._call(cudart.cudaGraphDestroy(graph))  # the executable graph does not need it

    def _drop_graphs(self, slot: _Slot) -> None:
        for graph in slot.graphs.values():
            if graph is not None:
                self._call(self.cudart.cudaGraphExecDestroy(graph))
        slot.graphs.clear()

    def clear_graphs(self) -> None:
        """Forget every captured CUDA graph (they are captured again on the next calls); needed after anything that
        changes the engine's weights or memory, such as a refit."""
        with self._lock:
            slots = [self._free.get() for _ in self._slots]  # waits for the calls in flight
            try:
                for slot in slots:
                    self._drop_graphs(slot)
            finally:
                for slot in slots:
                    self._free.put(slot)

    def close(self) -> None:
        """Free the GPU memory: waits for calls in flight, then releases every slot; later calls raise UserError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for _ in self._slots:  # every slot back from its thread
                self._free.get()
            self._release()
            self._free.put(None)  # wakes, and fails, any thread waiting for a slot

    def _release(self) -> None:
        cudart = self.cudart
        for slot in self._slots:
            cudart.cudaStreamSynchronize(slot.stream)
            for graph in slot.graphs.values():
                if graph is not None:
                    cudart.cudaGraphExecDestroy(graph)
            for pointer, _ in slot.buffers.values():
                cudart.cudaFree(pointer)
            cudart.cudaStreamDestroy(slot.stream)
            slot.graphs.clear()
            slot.buffers.clear()
            slot.context = None  # contexts go before the engine; TensorRT frees each with its last reference
        self._slots = []
        self.engine = None
