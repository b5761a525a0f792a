"""DMD2 (Yin et al., "Improved Distribution Matching Distillation", NeurIPS 2024; docs/design.md), one file per part:

- config.py               the paper's reference settings and the recipe knobs the presets use
- losses.py               the DM loss, the fake score's denoising loss, the GAN losses (and the anchor)
- fake_score.py           the fake score with its GAN head on the bottleneck (a forward hook)
- backward_simulation.py  each step's randomness; multi-step students trained on their own loop's inputs
- updates.py              the generator update and the fake-score update (the two time scales)
- train.py                the loop that alternates them, checkpoints, and writes the student bundle
"""

from distill.dmd2.backward_simulation import draw_batch, student_input
from distill.dmd2.config import DMD2Config, lr_at
from distill.dmd2.train import make_regression_pairs, train_dmd2

__all__ = ["DMD2Config", "draw_batch", "lr_at", "make_regression_pairs", "student_input", "train_dmd2"]
