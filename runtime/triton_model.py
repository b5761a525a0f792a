"""fewstep's model for Triton Inference Server's Python backend: the runtime's Pipeline behind Triton's dynamic
batcher. `python -m runtime.serve` serves it on one machine; `python -m runtime.triton` writes it into a model
repository (its model.py imports this class), next to the sampler-graph models.

One row of a request is one image. Inputs, batch first (Triton's dims leave the batch out):
- `class_labels` int64 (N, 1) for class-conditional engines, `prompt` bytes (N, 1) for text-to-image engines;
  unconditional engines take no condition;
- `seed` int64 (N, 1): row j of a request draws the runtime's noise for image j of seed[j]. The same seed in every
  row gives exactly `Pipeline.generate(labels, seed=seed)`; different seeds give independent images.
Output: `images` uint8 (N, H, W, C).

Triton's batcher hands `execute` the requests that arrived within the queue delay; their rows run as one batch
(one Pipeline.generate with the requests' noise stacked, so the images do not depend on the batching). A request
that is wrong (a label out of range, a negative seed, an empty prompt) gets its own error response with one line
saying what is wrong; the others in the batch are served. Triton itself refuses wrong dtypes, shapes and batches
over max_batch_size before they reach the model.
"""

import json
from pathlib import Path

import numpy as np

from .errors import UserError
from .noise import request_noise
from .pipeline import MAX_SEED, Pipeline


def model_parameters(config: dict) -> dict[str, str]:
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


class TritonPythonModel:
    """The class Triton's Python backend instantiates (the name is the backend's contract)."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = model_parameters(config)
        engine = Path(params["engine"])
        if not engine.is_absolute():  # inside the repository: <model>/<version>/<engine>
            engine = Path(args["model_repository"]) / args["model_version"] / engine
        threads = int(params["threads"]) if params.get("threads") else None
        self.pipe = Pipeline.load(engine, params.get("backend", "auto"), params.get("precision", "fp32"), threads)
        self.nfe = self.pipe.schedule(int(params["nfe"]) if params.get("nfe") else None)["nfe"]
        self.condition = "prompt" if self.pipe.text is not None else \
            "class_labels" if self.pipe.num_classes is not None else None

    def read(self, request) -> tuple[list | None, np.ndarray]:
        """(the request's conditions, its noise (N, draws, C, H, W)); UserError for a request that is wrong."""
        import triton_python_backend_utils as pb_utils

        seeds = pb_utils.get_input_tensor_by_name(request, "seed").as_numpy().reshape(-1)
        if seeds.min() < 0:
            raise UserError(f"seed must lie in 0..{MAX_SEED}; got {int(seeds.min())}")
        conditions = None
        if self.condition == "class_labels":
            labels = pb_utils.get_input_tensor_by_name(request, "class_labels").as_numpy().reshape(-1)
            conditions = self.pipe.check_labels(labels, None).tolist()
        elif self.condition == "prompt":
            raw = pb_utils.get_input_tensor_by_name(request, "prompt").as_numpy().reshape(-1)
            conditions = [p.decode("utf-8", "replace") if isinstance(p, bytes) else str(p) for p in raw]
            conditions = self.pipe.text.check_prompts(conditions)
        if conditions is not None and len(conditions) != len(seeds):
            raise UserError(f"give one seed per row: {len(conditions)} conditions, {len(seeds)} seeds")
        draws, shape = self.pipe.draws(self.nfe), self.pipe.x_shape
        if (seeds == seeds[0]).all():  # the common case: image j of one seed's request
            noise = request_noise(int(seeds[0]), 0, len(seeds), draws, shape)
        else:
            noise = np.concatenate([request_noise(int(s), j, 1, draws, shape) for j, s in enumerate(seeds)])
        return conditions, noise

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        responses: list = [None] * len(requests)
        rows = []  # (request index, conditions, noise) of the requests that read cleanly
        for k, request in enumerate(requests):
            try:
                rows.append((k, *self.read(request)))
            except UserError as e:
                responses[k] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
        if rows:
            conditions = None if self.condition is None else [c for _, cond, _ in rows for c in cond]
            noise = np.concatenate([noise for _, _, noise in rows])
            try:
                images = self.pipe.generate(conditions, n=len(noise), nfe=self.nfe, noise=noise).images
            except UserError as e:
                for k, _, _ in rows:
                    responses[k] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
                return responses
            start = 0
            for k, _, noise_k in rows:
                stop = start + len(noise_k)
                responses[k] = pb_utils.InferenceResponse([pb_utils.Tensor("images", images[start:stop])])
                start = stop
        return responses

    def finalize(self) -> None:
        self.pipe = None
