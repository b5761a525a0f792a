"""The quality gate for digits students: FD / class accuracy of 1,000 samples through each exported file, against
the PyTorch student on the same noise. The student's own loop (distill/bundle.py) runs with its network replaced by
the file (ONNX Runtime, or OpenVINO where the file is served there), so the gate measures the file alone; that the
runtime's loop is the student's loop is the runtime's own test (tests/test_runtime.py, golden vectors)."""

import importlib.util
from pathlib import Path

import numpy as np
import torch

from .graph import feed_of
from .parity import onnxruntime_runner, openvino_runner

CHUNK = 250  # samples per network call: 1,000 at once would set the export's peak memory


def is_digits_student(bundle) -> bool:
    image, cond = bundle.manifest["image"], bundle.manifest["conditioning"]
    return (image["channels"], image["height"], image["width"]) == (1, 16, 16) and cond.get("num_classes") == 10


def file_denoiser(bundle, run):
    """D(x, sigma, cond) -> x0 with the student's network replaced by an exported file (`run`: feed -> outputs):
    the graph's feed (x, sigma, the network's time, the condition), then x0 = c_skip x + c_out prediction in float64,
    as the runtime computes it."""
    d = bundle.denoiser

    def D(x, sigma, cond):
        s = sigma.double()
        feed = {"x": x.float().numpy(), "sigma": sigma.float().numpy(), "timestep": d.net_time(s).float().numpy(),
                **feed_of(cond)}
        prediction = torch.from_numpy(run(feed)[0]).double()
        c_skip, c_out = d.scalings(s.reshape(-1, 1, 1, 1))
        return (c_skip * x.double() + c_out * prediction).float()

    return D


def runner_for(path: Path, entry: dict, backend: str | None):
    """How a file is run: OpenVINO where the entry says it is served there (bf16) or `backend` asks for it."""
    if backend == "openvino-cpu" or entry.get("backend") == "openvino-cpu":
        return openvino_runner(path, entry.get("inference_precision", "f32"))
    return onnxruntime_runner(path)


def quality_gate(bundle, engine_dir: Path, nfe: int, files: dict, precisions: list[str], n: int = 1000,
                 backend: str | None = None) -> dict:
    """Digits students: {precision: FD, accuracy, the PyTorch student's FD and the change} for the loop run through
    each file; {} for other students (no metric for them here)."""
    if not is_digits_student(bundle):
        return {}
    from distill.data import to_uint8
    from distill.eval.metrics import digits_metric
    from distill.sample import noise_for

    metric = digits_metric()
    labels = torch.arange(n) % 10
    draws = noise_for(1, 0, n, (nfe, *bundle.x_shape))  # (N, nfe, C, H, W): start noise, then re-noising draws

    def images(denoiser=None):
        out = []
        for start in range(0, n, CHUNK):
            part = slice(start, start + CHUNK)
            with torch.no_grad():
                x0 = bundle.generate(draws[part, 0], bundle.cond(labels[part]), nfe,
                                     fresh_noise=draws[part, 1:].transpose(0, 1), denoiser=denoiser)
            out.append(to_uint8(x0).numpy())
        return metric(np.concatenate(out), labels.numpy())

    ref = images()
    out = {}
    for precision in precisions:
        run = runner_for(engine_dir / files[precision]["path"], files[precision], backend)
        got = images(file_denoiser(bundle, run))
        out[precision] = {"n": n, "fd": got["fd"], "accuracy": got["accuracy"], "fd_pytorch_fp32": ref["fd"],
                          "fd_change": got["fd"] / ref["fd"] - 1}
    return out


def openvino_serves(files: dict) -> bool:
    """Whether OpenVINO is installed and this engine has int8 files for it to run (their FD through OpenVINO differs
    from ONNX Runtime's, so the quality gate measures it too)."""
    return importlib.util.find_spec("openvino") is not None and any(p in files for p in ("int8", "int8-cpu"))
