"""The runtime pipeline: an engine folder in, uint8 images out, the sampling loop the manifest describes and
nothing else. numpy plus one backend; never torch (the PyTorch reference is a backend object from verify/).

    pipe = Pipeline.load("runs/quickstart/engine")                 # backend="auto": the fastest one present
    out = pipe.generate([3, 1, 4], seed=0)                         # class labels; out.images (3, H, W, C) uint8
    out.timings                                                    # total / per-step / backend milliseconds

Loop (docs/engine_spec.md has it in pseudo-code): x = noise * sigmas[0]; then per step i
- DMD2 ("renoise": "fresh_noise"): x0 = D(x, sigma_i); x = x0 + sigma_{i+1} * fresh noise; the result is x0;
- SFD ("renoise": "none"): Euler steps down the sigmas, the first one analytical (AFS: no network call);
with D's x0 computed from the network's raw prediction in float64 (runtime/convention.py).

Thread safety: a Pipeline holds no per-request state (noise, buffers and timings live in the call), and ONNX
Runtime sessions may run from several threads at once, so one Pipeline can serve many threads.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import native
from . import noise as noise_gen
from .backends import OnnxRuntimeBackend, onnxruntime_providers
from .convention import x0_from_output
from .errors import UserError
from .manifest import read_manifest

BACKENDS = ("auto", "onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-cudagraph", "openvino-cpu", "tensorrt")
MAX_SEED = 2**63 - 1


@dataclass
class Generation:
    """What `Pipeline.generate` returns: images (N, H, W, C) uint8, their conditions (labels or prompts), and where
    the time went."""

    images: np.ndarray
    labels: np.ndarray | None
    nfe: int
    seed: int | None
    timings: dict = field(default_factory=dict)
    prompts: list[str] | None = None


def to_uint8(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 (round half to even, as distill's writers do)."""
    if native.lib is not None and x.dtype == np.float64 and x.ndim == 4:
        n, c, h, w = x.shape
        images = np.empty((n, h, w, c), np.uint8)
        native.lib.to_uint8(np.ascontiguousarray(x), n, c, h, w, images)
        return images
    return np.round((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1).copy()


def choose_backend(name: str, files: dict) -> str:
    """The backend `name` stands for ("auto": TensorRT when a plan and TensorRT are here, else ONNX Runtime on
    CUDA when onnxruntime-gpu sees a GPU, else ONNX Runtime on the CPU)."""
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    from .tensorrt import tensorrt_available

    if any(k.startswith("trt_") for k in files) and tensorrt_available():
        return "tensorrt"
    if "CUDAExecutionProvider" in onnxruntime_providers():
        return "onnxruntime-cuda"
    if onnxruntime_providers():
        return "onnxruntime-cpu"
    raise UserError("no backend is installed: pip install onnxruntime (or the [onnx] extra)")


class Pipeline:
    def __init__(self, manifest: dict, engine_dir: Path, backend, precision: str):
        self.manifest = manifest
        self.engine_dir = engine_dir
        self.backend = backend
        self.precision = precision
        self.inputs = [i["name"] for i in manifest["inputs"]]
        image = manifest["image"]
        self.x_shape = tuple(image.get("latent_shape") or (image["channels"], image["height"], image["width"]))
        cond = manifest["conditioning"]
        self.num_classes = cond.get("num_classes") if cond.get("kind") == "class" else None
        # a TensorRT plan knows its own batch profile; ONNX engines take the manifest's limit, if any
        self.max_batch = getattr(backend, "max_batch", None) or manifest.get("max_batch")
        self.text = None  # text-to-image engines: their tokenizers, text encoder(s) and VAE decoder (runtime/text.py)

    @classmethod
    def load(cls, engine_dir: str | Path, backend="auto", precision: str = "fp32",
             threads: int | None = None) -> "Pipeline":
        """Open an engine folder once; the pipeline is then shared by every request (and thread). `backend`: a name
        from BACKENDS, or a backend object (`name`, `run(feed) -> prediction`), such as the PyTorch reference
        (verify/reference.py)."""
        engine_dir = Path(engine_dir)
        manifest = read_manifest(engine_dir)
        files = manifest["files"]
        if not isinstance(backend, str):
            if manifest["conditioning"].get("kind") == "text":
                raise UserError(f"{engine_dir} is a text-to-image engine; its text encoders and VAE run on ONNX "
                                "Runtime only (backend onnxruntime-cpu or onnxruntime-cuda)")
            return cls(manifest, engine_dir, backend, precision)
        name = choose_backend(backend, files)
        text = manifest["conditioning"].get("kind") == "text"
        if text and not name.startswith("onnxruntime"):
            raise UserError(f"{engine_dir} is a text-to-image engine; this runtime runs those on ONNX Runtime "
                            "(backend onnxruntime-cpu or onnxruntime-cuda)")
        if name == "tensorrt":
            from .tensorrt import TensorRTBackend

            entry = files.get(f"trt_{precision}")
            if entry is None:
                raise UserError(f"{engine_dir} has no TensorRT {precision} plan; it has "
                                f"{', '.join(k for k in files if k.startswith('trt_')) or 'none'}")
            return cls(manifest, engine_dir, TensorRTBackend(engine_dir / entry["path"], manifest), precision)
        entry = files.get(precision)
        if entry is None or not entry["path"].endswith(".onnx"):
            onnx = [k for k, v in files.items() if v["path"].endswith(".onnx")]
            raise UserError(f"{engine_dir} has no {precision} ONNX file; precisions here: {', '.join(onnx)}")
        if entry.get("backend", name) != name:  # bf16: the fp32 file in OpenVINO's bf16 kernels
            raise UserError(f"{engine_dir}'s {precision} runs on backend {entry['backend']}, not {name}")
        if name == "openvino-cpu":
            from .openvino import OpenVinoBackend

            backend = OpenVinoBackend(engine_dir / entry["path"], entry.get("inference_precision", "f32"), threads)
            return cls(manifest, engine_dir, backend, precision)
        graph = name == "onnxruntime-cudagraph"
        device = "cuda" if graph else name.removeprefix("onnxruntime-")
        if text and graph:
            raise UserError("CUDA graphs serve the UNet of class-conditional engines only; use onnxruntime-cuda")
        backend = OnnxRuntimeBackend(engine_dir / entry["path"], device, threads, cuda_graph=graph)
        pipe = cls(manifest, engine_dir, backend, precision)
        if text:
            from .text import TextParts

            pipe.text = TextParts(engine_dir, manifest, device, threads)
        return pipe

    @property
    def nfes(self) -> list[int]:
        return sorted(int(k) for k in self.manifest["schedules"])

    def describe(self) -> str:
        return (f"{self.engine_dir}: {self.manifest.get('method', '?')} student, NFE {', '.join(map(str, self.nfes))}, "
                f"backend {self.backend.name}, precision {self.precision}")

    def draws(self, nfe: int) -> int:
        """Noise draws per image: the start noise, plus DMD2's fresh noise before every step after the first."""
        return nfe if self.schedule(nfe)["renoise"] == "fresh_noise" else 1

    def schedule(self, nfe: int | None) -> dict:
        nfe = self.manifest.get("schedule", {}).get("nfe", self.nfes[-1]) if nfe is None else nfe
        s = self.manifest["schedules"].get(str(nfe))
        if s is None:
            raise UserError(f"this engine serves NFE {', '.join(map(str, self.nfes))}, not {nfe}")
        return s

    def check_labels(self, conditions, n: int | None) -> np.ndarray | None:
        """Class labels as int64 (N,) for class engines, None for unconditional ones (then `n` counts images)."""
        if self.num_classes is None:
            if conditions is not None:
                raise UserError("this engine is unconditional; give n (the number of images), not conditions")
            if n is None or n < 1:
                raise UserError("give n >= 1, the number of images")
            return None
        if isinstance(conditions, (list, tuple)) and conditions and \
                all(type(c) is int and 0 <= c < self.num_classes for c in conditions):
            return np.array(conditions, dtype=np.int64)  # the common case, without the array checks below
        if conditions is None or isinstance(conditions, str) or \
                any(isinstance(c, str) for c in (conditions if isinstance(conditions, (list, tuple)) else
                                                 np.atleast_1d(np.asarray(conditions, dtype=object)))):
            raise UserError(f"this engine is class-conditional: give class labels in 0..{self.num_classes - 1}, "
                            "not prompts")
        labels = np.atleast_1d(np.asarray(conditions))
        if labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"class labels must be integers in 0..{self.num_classes - 1}")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise UserError(f"class labels must lie in 0..{self.num_classes - 1}; got {labels.min()}..{labels.max()}")
        return labels.astype(np.int64)

    def generate(self, conditions=None, *, n: int | None = None, nfe: int | None = None, seed: int | None = 0,
                 noise: np.ndarray | None = None, batch_size: int | None = None) -> Generation:
        """Images for `conditions` (class labels; None for unconditional engines, with `n`), in `nfe` calls.

        Noise: from `seed` through runtime.noise's documented generator, or the caller's `noise`
        (N, draws, C, H, W) with draws = nfe for DMD2 engines (start noise, then fresh noise per step) and 1 for
        SFD engines. Requests larger than `batch_size` (default: the engine's largest batch, else 16) run in
        chunks; the images do not depend on the chunking."""
        t_start = time.perf_counter()
        schedule = self.schedule(nfe)
        nfe = schedule["nfe"]
        prompts = self.text.check_prompts(conditions) if self.text is not None else None
        labels = self.check_labels(conditions, n) if prompts is None else None
        count = len(prompts) if prompts is not None else len(labels) if labels is not None else n
        draws = self.draws(nfe)
        if noise is not None:
            noise = np.asarray(noise, dtype=np.float32)
            want = (count, draws, *self.x_shape)
            if noise.shape != want:
                raise UserError(f"noise must have shape {want} (images, draws, C, H, W); got {noise.shape}")
            if not np.isfinite(noise).all():
                raise UserError("the noise contains NaN or inf")
        elif seed is None or not 0 <= int(seed) <= MAX_SEED:
            raise UserError(f"seed must be an integer in 0..{MAX_SEED}")
        batch_size = batch_size or self.max_batch or 16
        if batch_size < 1 or (self.max_batch and batch_size > self.max_batch):
            raise UserError(f"batch_size must lie in 1..{self.max_batch or 'any'} for this engine; got {batch_size}")
        images, step_ms, backend_ms = [], np.zeros(nfe), 0.0
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            chunk = noise[start:stop] if noise is not None else \
                noise_gen.request_noise(int(seed), start, stop - start, draws, self.x_shape)
            if self.text is not None:
                cond = self.text.encode(prompts[start:stop])
            else:
                cond = {} if labels is None else {"class_labels": labels[start:stop]}
            x, ms, b_ms = self.sample(schedule, chunk, cond)
            images.append(to_uint8(self.text.decode(x) if self.text is not None else x))
            step_ms += ms
            backend_ms += b_ms
        total = 1000 * (time.perf_counter() - t_start)
        timings = {"total_ms": total, "step_ms": step_ms.tolist(), "backend_ms": backend_ms,
                   "overhead_ms": total - backend_ms, "images": count, "backend": self.backend.name,
                   "precision": self.precision}
        images = images[0] if len(images) == 1 else np.concatenate(images)
        return Generation(images, labels, nfe, None if noise is not None else int(seed), timings, prompts)

    def denoise(self, x: np.ndarray, sigma: float, timestep: float, cond: dict, nfe: int) -> tuple[np.ndarray, float]:
        """x0 at `sigma` (one network call) and the backend's milliseconds; `cond` holds the condition inputs
        (class_labels, or a text engine's encoder_hidden_states [, text_embeds, time_ids])."""
        count = len(x)
        feed = {"x": x.astype(np.float32), "sigma": np.full(count, sigma, np.float32),
                "timestep": np.full(count, timestep, np.float32), **cond}
        if "nfe" in self.inputs:
            feed["nfe"] = np.full(count, nfe, np.int64)
        t0 = time.perf_counter()
        out = self.backend.run(feed)
        ms = 1000 * (time.perf_counter() - t0)
        # one sigma for the batch, as fed (float32): the scalar form of the same float64 arithmetic
        m = self.manifest
        return x0_from_output(out, x, feed["sigma"][0], m["prediction_type"], m.get("parameterization", "vp"),
                              m.get("sigma_data", 0.5)), ms

    def sample(self, schedule: dict, noise: np.ndarray, cond: dict) -> tuple[np.ndarray, np.ndarray, float]:
        """The manifest's loop on one chunk (`cond`: the condition inputs, see denoise): (x0 (N, C, H, W) float64,
        ms per step, backend ms)."""
        sigmas, timesteps, nfe = schedule["sigmas"], schedule["timesteps"], schedule["nfe"]
        step_ms, backend_ms = np.zeros(nfe), 0.0
        x = noise[:, 0].astype(np.float64) * sigmas[0]
        if schedule["renoise"] == "none":  # SFD: Euler steps; AFS makes the first one without the network
            calls = 0
            for i in range(len(sigmas) - 1):
                t0 = time.perf_counter()
                if i == 0 and schedule["afs"]:
                    d = x / np.sqrt(1 + sigmas[0] ** 2)
                else:
                    x0, ms = self.denoise(x, sigmas[i], timesteps[i], cond, nfe)
                    backend_ms += ms
                    d = (x - x0) / sigmas[i]
                x = x + (sigmas[i + 1] - sigmas[i]) * d
                step_ms[min(calls, nfe - 1)] += 1000 * (time.perf_counter() - t0)
                calls += not (i == 0 and schedule["afs"])
            return x, step_ms, backend_ms
        for i in range(nfe):  # DMD2: predict x0, re-noise with fresh noise
            t0 = time.perf_counter()
            x0, ms = self.denoise(x, sigmas[i], timesteps[i], cond, nfe)
            backend_ms += ms
            if i + 1 < nfe:
                x = x0 + sigmas[i + 1] * noise[:, i + 1].astype(np.float64)
            step_ms[i] += 1000 * (time.perf_counter() - t0)
        return x0, step_ms, backend_ms
