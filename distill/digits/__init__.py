"""The embedded default: the digits data (data.py), how the committed teachers were trained (teacher.py, a diffusers
UNet; flow_teacher.py, a factory flow-matching network), where they and the metric classifier live, and their
shapes."""

from pathlib import Path

from distill.digits.data import IMAGE_SIZE, NUM_CLASSES

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TEACHER_DIR = ASSETS / "digits_teacher"
CLASSIFIER_DIR = ASSETS / "digits_classifier"
# the second embedded teacher: a hand-written flow-matching network, loaded through its fewstep_factory.json
FLOW_TEACHER_DIR = ASSETS / "digits_flow_teacher"
STUDENT_DIR = ASSETS / "digits_student"  # the embedded student (SFD-v's 1-NFE stage), for commands given none
QUICKSTART_RUN = Path("runs/quickstart")  # where `make quickstart` writes, relative to the working directory

NULL_CLASS = NUM_CLASSES  # the extra class embedding used for classifier-free guidance


def teacher_unet_config() -> dict:
    """A 1.2 M-parameter class-conditional diffusers UNet2DModel for 16x16 single-channel digits."""
    return dict(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=32,
        num_class_embeds=NUM_CLASSES + 1,  # + the null class for CFG
    )


def teacher_scheduler_config() -> dict:
    """DDPM linear betas with a small beta_start, so sigma spans [0.0032, 154] ⊃ EDM's [0.006, 80]."""
    return dict(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-5,
        beta_end=0.02,
        prediction_type="v_prediction",
        clip_sample=False,
    )


def default_student() -> tuple[Path, str]:
    """The student bundle a command uses when it is given none, and a phrase saying which: the quickstart student
    where `make quickstart` has made one in this folder, else the embedded digits student."""
    quickstart = QUICKSTART_RUN / "student"
    if (quickstart / "fewstep_student.json").exists():
        return quickstart, f"the quickstart student ({quickstart}, made by make quickstart)"
    return STUDENT_DIR, (f"the embedded digits student ({STUDENT_DIR}: no {quickstart} here; make quickstart "
                         "trains one)")
