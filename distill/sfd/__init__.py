"""SFD (Zhou et al., "Simple and Fast Distillation of Diffusion Models", NeurIPS 2024; docs/design.md):

- config.py         the paper's reference settings and what a user sets
- trajectory.py     student timestamps with the analytical first step, the teacher's DPM-Solver++(3M) trajectory
- train.py          the student walking its own Euler trajectory, L1 to the teacher at each timestamp (SFD, SFD-v)
- nfe_condition.py  SFD-v: the step count as an extra condition of one student for every NFE
- one_step.py       the second stage: an SFD / SFD-v student distilled into one call
"""

from distill.sfd.config import SFD_NFES, SFDConfig
from distill.sfd.one_step import perceptual_loss, train_sfd_one_step
from distill.sfd.train import train_sfd
from distill.sfd.trajectory import afs_step, student_sigmas, teacher_sigmas, teacher_trajectory

__all__ = ["SFD_NFES", "SFDConfig", "afs_step", "perceptual_loss", "student_sigmas", "teacher_sigmas",
           "teacher_trajectory", "train_sfd", "train_sfd_one_step"]
