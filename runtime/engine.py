"""Few-step sampling over an exported engine folder with ONNX Runtime: numpy in, numpy out, no torch.

    sampler = EngineSampler("runs/x/engine", precision="fp32")
    images = sampler.sample(noise, labels)          # noise (N, C, H, W) unit Gaussian; images in [-1, 1]

Everything it needs is in the folder: the engine manifest (schedule, inputs, prediction type) and the ONNX file.
"""

import json
from pathlib import Path

import numpy as np

from .convention import x0_from_output

ENGINE_MANIFEST = "fewstep_engine.json"


class EngineSampler:
    def __init__(self, engine_dir: str | Path, precision: str = "fp32", providers: list[str] | None = None):
        import onnxruntime as ort

        self.dir = Path(engine_dir)
        self.manifest = json.loads((self.dir / ENGINE_MANIFEST).read_text())
        files = self.manifest["files"]
        if precision not in files:
            raise ValueError(f"{self.dir} has no {precision} file; it has {', '.join(files)}")
        self.session = ort.InferenceSession(str(self.dir / files[precision]["path"]),
                                            providers=providers or ["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in self.manifest["inputs"]]
        self.schedule = self.manifest["schedule"]

    def denoise(self, x: np.ndarray, i: int, labels: np.ndarray | None) -> np.ndarray:
        """x0 at the schedule's i-th sigma (one network call)."""
        n, s = len(x), self.schedule
        feed = {"x": x.astype(np.float32), "sigma": np.full(n, s["sigmas"][i], np.float32),
                "timestep": np.full(n, s["timesteps"][i], np.float32)}
        if "class_labels" in self.inputs:
            feed["class_labels"] = np.asarray(labels, dtype=np.int64)
        if "nfe" in self.inputs:
            feed["nfe"] = np.full(n, s["nfe"], np.int64)
        out = self.session.run(["prediction"], feed)[0]
        return x0_from_output(out, x, feed["sigma"], self.manifest["prediction_type"])

    def sample(self, noise: np.ndarray, labels: np.ndarray | None = None, fresh: np.ndarray | None = None,
               seed: int = 0) -> np.ndarray:
        """The student's loop: SFD's Euler steps (AFS first), or DMD2's x0-then-fresh-noise steps. `fresh`
        ((nfe - 1, N, C, H, W)) is DMD2's re-noising; drawn from `seed` when not given."""
        s = self.schedule
        sigmas = s["sigmas"]
        x = noise.astype(np.float64) * sigmas[0]
        if s["renoise"] == "none":
            for i in range(len(sigmas) - 1):
                if i == 0 and s["afs"]:
                    d = x / np.sqrt(1 + sigmas[0] ** 2)
                else:
                    d = (x - self.denoise(x, i, labels)) / sigmas[i]
                x = x + (sigmas[i + 1] - sigmas[i]) * d
            return x
        rng = np.random.default_rng(seed)
        for i in range(len(sigmas)):
            x0 = self.denoise(x, i, labels)
            if i + 1 < len(sigmas):
                eps = fresh[i] if fresh is not None else rng.standard_normal(x.shape)
                x = x0 + sigmas[i + 1] * eps
        return x0
