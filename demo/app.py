"""The Gradio demo over the runtime: an engine folder in, a page (and a named API endpoint) out.

    app = build_app("runs/quickstart/engine")      # gr.Blocks; python -m demo serves it
    app.launch(server_name="127.0.0.1", server_port=7860)

The page is thin: every request goes through `Demo.generate`, which checks the input (`parse_request`), runs the
shared runtime Pipeline for the chosen (backend, precision) and, in side-by-side mode, the teacher's many-step
sampler on the same starting noise. Bad input is a message in the page (gr.Error), never a stack trace.
"""

import json
import secrets
import threading
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import gradio as gr
import numpy as np

from runtime import noise as noise_gen
from runtime.backends import onnxruntime_providers
from runtime.errors import UserError
from runtime.manifest import read_manifest
from runtime.pipeline import Pipeline

MAX_IMAGES = 64
MAX_SEED = 2**32 - 1  # the page's number box holds a JavaScript double: keep seeds well inside 2^53
DISPLAY_PX = 128  # small images are enlarged (nearest neighbour) to about this many pixels a side
TEACHER_SAMPLER, TEACHER_NFE = "dpmpp-2m", 50  # the teacher's many-step reference (the README's baseline)
ALL = "all"  # the condition value for "every class, cycling"
TITLE = "An image in one step, at the teacher's quality, in milliseconds"


@dataclass
class Request:
    """One checked request."""

    labels: np.ndarray | None  # (N,) int64 class labels; None for unconditional engines
    n: int
    nfe: int
    seed: int
    backend: str
    precision: str
    compare: bool


def available_backends(manifest: dict) -> list[str]:
    """ONNX Runtime on the CPU, plus CUDA (with and without CUDA graphs) where onnxruntime-gpu sees a GPU, and
    PyTorch where torch and the student bundle the engine came from are both on this machine."""
    providers = onnxruntime_providers()
    backends = ["onnxruntime-cpu"] if "CPUExecutionProvider" in providers else []
    if "CUDAExecutionProvider" in providers:
        backends += ["onnxruntime-cuda", "onnxruntime-cudagraph"]
    bundle = manifest.get("student", {}).get("bundle")
    if find_spec("torch") is not None and bundle and Path(bundle).is_dir():
        backends.append("pytorch")
    return backends


def find_teacher(manifest: dict) -> Path | None:
    """The teacher the engine's student was distilled from, when it is on this machine. A student of the committed
    digits teacher trained in another checkout names that checkout's copy; this package's own copy stands in."""
    recorded = manifest.get("student", {}).get("teacher")
    if not recorded:
        return None
    path = Path(recorded)
    if path.is_dir():
        return path
    spec = find_spec("distill")
    if path.parts[-3:] == ("distill", "assets", "digits_teacher") and spec and spec.origin:
        own = Path(spec.origin).parent / "assets" / "digits_teacher"
        return own if own.is_dir() else None
    return None


def enlarge(image: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 -> nearest-neighbour enlarged (H*k, W*k) or (H*k, W*k, C), so 16x16 digits can be seen."""
    k = max(1, DISPLAY_PX // max(image.shape[:2]))
    big = image.repeat(k, axis=0).repeat(k, axis=1)
    return big[..., 0] if big.shape[-1] == 1 else big


def whole_number(value, what: str) -> int:
    """An integer from a form or API value (the number box sends floats such as 3.0)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a whole number, got {value!r}") from None
    if not number.is_integer():
        raise UserError(f"{what} must be a whole number, got {value!r}")
    return int(number)


class Demo:
    """One engine folder, the controls it offers, and one Pipeline per (backend, precision), loaded once and shared
    by every request (a Pipeline holds no per-request state). The teacher is loaded on the first side-by-side."""

    def __init__(self, engine_dir: str | Path, backend: str | None = None, precision: str | None = None):
        self.engine_dir = Path(engine_dir)
        self.manifest = read_manifest(self.engine_dir)
        cond = self.manifest["conditioning"]
        self.kind = cond.get("kind", "none")  # "class", "text" or "none"
        self.num_classes = cond.get("num_classes") if self.kind == "class" else None
        self.precisions = [k for k, v in self.manifest["files"].items() if v["path"].endswith(".onnx")]
        self.backends = available_backends(self.manifest)
        if not self.backends:
            raise UserError("no backend is installed: pip install onnxruntime (or the [onnx] extra)")
        self.backend = backend or self.backends[0]
        self.precision = precision or ("fp32" if "fp32" in self.precisions else self.precisions[0])
        self.teacher_dir = find_teacher(self.manifest)
        self._pipes: dict[tuple[str, str], Pipeline] = {}
        self._teacher = None
        self._pipe_lock, self._teacher_lock = threading.Lock(), threading.Lock()
        # the NFEs the runtime serves; text engines (which it cannot load yet: their page says so on request) list
        # their manifest's schedules
        self.nfes = (sorted(int(k) for k in self.manifest["schedules"]) if self.kind == "text"
                     else self.pipeline(self.backend, self.precision).nfes)
        default = self.manifest.get("schedule", {}).get("nfe")
        self.default_nfe = default if default in self.nfes else self.nfes[-1]

    def pipeline(self, backend: str, precision: str) -> Pipeline:
        """The shared Pipeline for (backend, precision), loaded (and run once, so that the first request's latency
        is not the session's warm-up) on first use."""
        if backend not in self.backends:
            raise UserError(f"backend {backend!r} is not available here; choose one of {', '.join(self.backends)}")
        if precision not in self.precisions:
            raise UserError(f"precision {precision!r} is not in this engine; it has {', '.join(self.precisions)}")
        key = (backend, "fp32" if backend == "pytorch" else precision)  # the PyTorch student is fp32 only
        if key in self._pipes:  # loaded: no lock, so that loading another one never stalls requests for this one
            return self._pipes[key]
        with self._pipe_lock:
            if key not in self._pipes:
                if backend == "pytorch":  # the PyTorch student behind the same loop (verify/reference.py)
                    from verify.reference import reference_pipeline

                    pipe = reference_pipeline(self.engine_dir)
                else:
                    pipe = Pipeline.load(self.engine_dir, backend, key[1])
                pipe.generate([0] if pipe.num_classes else None, n=None if pipe.num_classes else 1, nfe=pipe.nfes[0])
                self._pipes[key] = pipe
            return self._pipes[key]

    def describe(self) -> str:
        teacher = f"side by side with the teacher in {self.teacher_dir}" if self.teacher_dir else "no local teacher"
        return (f"serving {self.engine_dir}: {self.manifest.get('method', '?')} student, NFE "
                f"{', '.join(map(str, self.nfes))}; backends {', '.join(self.backends)}; precisions "
                f"{', '.join(self.precisions)}; {teacher}")

    def teacher(self):
        with self._teacher_lock:
            if self._teacher is None:
                from distill.teachers import load_teacher

                self._teacher = load_teacher(self.teacher_dir)
            return self._teacher

    def condition_choices(self) -> list[tuple[str, str]]:
        names = [str(k) for k in range(self.num_classes or 0)]
        return [(f"all ({names[0]}–{names[-1]}, cycling)" if names else "all", ALL)] + [(s, s) for s in names]

    def parse_request(self, condition, prompt, nfe, seed, random_seed, n, backend, precision, compare) -> Request:
        """Check one request's form values; a UserError names what is wrong."""
        n = whole_number(n, "the number of images")
        if not 1 <= n <= MAX_IMAGES:
            raise UserError(f"the number of images must lie in 1..{MAX_IMAGES}; got {n}")
        nfe = whole_number(nfe, "NFE")
        if nfe not in self.nfes:
            raise UserError(f"this engine serves NFE {', '.join(map(str, self.nfes))}, not {nfe}")
        if random_seed:
            seed = secrets.randbelow(MAX_SEED + 1)
        else:
            seed = whole_number(seed, "the seed")
            if not 0 <= seed <= MAX_SEED:
                raise UserError(f"the seed must lie in 0..{MAX_SEED}; got {seed} (or tick 'random')")
        labels = None
        if self.kind == "text":
            if not str(prompt or "").strip():
                raise UserError("the prompt is empty: describe the image to generate")
            raise UserError("this is a text-to-image engine; the runtime samples class-conditional and "
                            "unconditional pixel engines so far")
        if self.kind == "class":
            if str(condition) == ALL:
                labels = np.arange(n, dtype=np.int64) % self.num_classes
            else:
                label = whole_number(condition, "the class")
                if not 0 <= label < self.num_classes:
                    raise UserError(f"the class must lie in 0..{self.num_classes - 1}; got {label}")
                labels = np.full(n, label, dtype=np.int64)
        if compare and self.teacher_dir is None:
            gr.Warning("the teacher this engine was distilled from is not on this machine: showing the student only")
            compare = False
        return Request(labels, n, nfe, seed, backend, precision, bool(compare))

    def generate(self, condition, prompt, nfe, seed, random_seed, n, backend, precision, compare):
        """The page's (and the API's) one action: (student images, teacher images, latency text, timings, seed)."""
        try:
            req = self.parse_request(condition, prompt, nfe, seed, random_seed, n, backend, precision, compare)
            pipe = self.pipeline(req.backend, req.precision)
            out = pipe.generate(req.labels, n=None if req.labels is not None else req.n, nfe=req.nfe, seed=req.seed)
            teacher_images, teacher_ms = (self.run_teacher(req) if req.compare else (None, None))
        except UserError as e:
            raise gr.Error(str(e)) from None
        t = out.timings
        timings = {"total_ms": t["total_ms"], "step_ms": t["step_ms"], "backend_ms": t["backend_ms"],
                   "per_image_ms": t["total_ms"] / req.n, "images": req.n, "nfe": out.nfe, "seed": req.seed,
                   "backend": t["backend"], "precision": t["precision"], "teacher_ms": teacher_ms}
        return (self.gallery(out.images, req.labels), self.gallery(teacher_images, req.labels),
                latency_text(req, timings), timings, req.seed)

    def run_teacher(self, req: Request) -> tuple[np.ndarray, float]:
        """The teacher's many-step sampler on the student's starting noise (draw 0 of the runtime's generator):
        (images (N, H, W, C) uint8, milliseconds)."""
        import torch

        from distill.data import to_uint8
        from distill.teachers.denoiser import guided
        from distill.teachers.samplers import sample

        teacher = self.teacher()
        x_shape = tuple(teacher.x_shape)
        noise = torch.from_numpy(noise_gen.request_noise(req.seed, 0, req.n, 1, x_shape)[:, 0]).to(teacher.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            cond = teacher.cond(labels=torch.from_numpy(req.labels)) if req.labels is not None else teacher.cond()
            D = guided(teacher.denoiser, teacher.guidance_scale, teacher.uncond(req.n))
            x0 = sample(D, noise, teacher.denoiser.schedule, TEACHER_SAMPLER, TEACHER_NFE, cond)
            images = to_uint8(teacher.decode(x0).float().cpu()).numpy()
        return images, 1000 * (time.perf_counter() - t0)

    def gallery(self, images: np.ndarray | None, labels: np.ndarray | None) -> list | None:
        if images is None:
            return None
        return [(enlarge(img), str(labels[k]) if labels is not None else None) for k, img in enumerate(images)]

    def quality_text(self) -> str:
        """The engine's measured quality (from its manifest) beside the teacher's, where both are recorded."""
        metrics = self.manifest.get("student", {}).get("metrics", {}).get(str(self.default_nfe))
        if not metrics or "fd" not in metrics:
            return ""
        text = f"digits FD **{metrics['fd']:.3f}**"
        if "accuracy" in metrics:
            text += f", class accuracy {100 * metrics['accuracy']:.1f} %"
        baseline = teacher_baseline(self.teacher_dir)
        if baseline:
            text += (f"; the teacher with {TEACHER_SAMPLER} {TEACHER_NFE} steps: FD {baseline['fd']:.3f}, "
                     f"class accuracy {100 * baseline['accuracy']:.1f} %")
        return f"{text} ({metrics.get('n', '?')} samples each, lower FD is better)"


def teacher_baseline(teacher_dir: Path | None) -> dict | None:
    """The teacher's own FD at its many-step reference sampler, from fewstep_baselines.json (python -m
    benchmarks.teacher_baselines --teacher), when recorded."""
    path = teacher_dir / "fewstep_baselines.json" if teacher_dir else None
    if not path or not path.exists():
        return None
    try:
        rows = json.loads(path.read_text()).get("rows", [])
    except (OSError, ValueError):
        return None
    return next((r for r in rows if r.get("sampler") == TEACHER_SAMPLER and r.get("nfe") == TEACHER_NFE), None)


def latency_text(req: Request, t: dict) -> str:
    """The headline: how many images, of what, in how many steps and milliseconds."""
    what = f"{req.n} image{'s' * (req.n > 1)}"
    if req.labels is not None:
        what = f"{req.n} × digit {req.labels[0]}" if len(set(req.labels.tolist())) == 1 else f"{req.n} digits"
    steps = f"{t['nfe']} step{'s' * (t['nfe'] > 1)}"
    per_step = " / ".join(f"{ms:.1f}" for ms in t["step_ms"])
    text = (f"## {what} in {steps}: {t['total_ms']:.1f} ms\n"
            f"per step {per_step} ms · network {t['backend_ms']:.1f} ms · {t['backend']} {t['precision']} · "
            f"seed {req.seed}")
    if t.get("teacher_ms") is not None:
        text += (f"\n\n### the teacher, {TEACHER_SAMPLER} {TEACHER_NFE} steps (PyTorch): {t['teacher_ms']:.0f} ms — "
                 f"{t['teacher_ms'] / t['total_ms']:.0f}× the student's time")
    return text


def build_app(engine_dir: str | Path, backend: str | None = None, precision: str | None = None,
              concurrency: int = 2, max_queue: int = 32) -> gr.Blocks:
    """The page over one engine folder. Requests go through Gradio's queue: at most `concurrency` run at once and
    at most `max_queue` wait; the API endpoint is api_name="generate"."""
    demo = Demo(engine_dir, backend, precision)
    m = demo.manifest
    with gr.Blocks(title="fewstep demo", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"# {TITLE}\n{m.get('method', '?').upper()} student served by the fewstep runtime "
                    f"(`{demo.engine_dir}`). {demo.quality_text()}")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                condition = gr.Dropdown(demo.condition_choices(), value=ALL, label="digit class",
                                        visible=demo.kind == "class")
                prompt = gr.Textbox("", label="prompt", lines=2, visible=demo.kind == "text")
                nfe = gr.Dropdown(demo.nfes, value=demo.default_nfe, label="NFE (network calls per image)")
                with gr.Row():
                    seed = gr.Number(0, label="seed", precision=0)
                    random_seed = gr.Checkbox(False, label="random")
                n = gr.Slider(1, MAX_IMAGES, value=8, step=1, label="number of images")
                with gr.Row():
                    backend_box = gr.Dropdown(demo.backends, value=demo.backend, label="backend")
                    precision_box = gr.Dropdown(demo.precisions, value=demo.precision, label="precision")
                compare = gr.Checkbox(False, label=f"side by side with the teacher ({TEACHER_SAMPLER}, "
                                                   f"{TEACHER_NFE} steps)", visible=demo.teacher_dir is not None)
                button = gr.Button("Generate", variant="primary")
            with gr.Column(scale=3):
                latency = gr.Markdown("press Generate", label="latency", elem_id="latency")
                with gr.Row():
                    student = gr.Gallery(label="student", elem_id="student", columns=4, format="png",
                                         height="auto", object_fit="contain")
                    teacher = gr.Gallery(label=f"teacher, {TEACHER_NFE} steps", elem_id="teacher", columns=4,
                                         format="png", height="auto", object_fit="contain", visible=False)
                with gr.Accordion("timings (ms)", open=False):
                    timings = gr.JSON(label="timings (ms)")
        inputs = [condition, prompt, nfe, seed, random_seed, n, backend_box, precision_box, compare]
        outputs = [student, teacher, latency, timings, seed]
        button.click(demo.generate, inputs, outputs, api_name="generate")
        compare.change(lambda on: gr.update(visible=on), compare, teacher, api_visibility="private")
        if demo.kind != "text":  # the first screen shows images and their latency without a click
            app.load(demo.generate, inputs, outputs, api_visibility="private")
    app.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    app.fewstep_demo = demo  # for tests and the load check
    return app
