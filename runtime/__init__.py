"""fewstep's runtime: few-step sampling over exported engine folders, numpy plus one backend (no torch).

    from runtime import Pipeline
    pipe = Pipeline.load("runs/quickstart/engine")
    images = pipe.generate([0, 1, 2], seed=0).images      # (3, H, W, C) uint8
"""

from .errors import UserError
from .pipeline import Generation, Pipeline

__all__ = ["Generation", "Pipeline", "UserError"]
