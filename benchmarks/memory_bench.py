"""DMD2's memory per process: measured on this machine at reduced size, and the formula that extrapolates it to
SD 1.5, SDXL and FLUX-transformer teachers: `python -m benchmarks.memory_bench --out docs/memory_bench
[--widths 32,64] [--steps 3]`.

1. The teachers' sizes: the public configs of SD 1.5's and SDXL's UNets and FLUX.1's transformer (and SD3-medium's),
   built on PyTorch's meta device (no memory, no download), parameters counted.
2. The formula, bytes per teacher parameter held by each process, fp32 weights and AdamW (two fp32 moments):
   the frozen real score 4 (teacher_dtype=bf16: 2; sharded: / N), each trained copy (generator, fake score)
   4 weights + 4 gradients + 8 optimizer = 16 (optimizer=8bit: 4 + 4 + 2 = 10; sharded: / N), a LoRA generator 4
   (its adapters are negligible). So a full fine-tune holds 36 bytes per parameter on DDP, 4 + 32 / N on FSDP
   (8 at N = 8), 24 with LoRA. Activations come on top and scale with batch and resolution (what gradient
   checkpointing cuts); FSDP also gathers one block at a time.
3. The check on this CPU: a pixel UNet teacher at two widths (SD 1.5's channel ratios 1:2:4:4), DMD2 with the
   pixel preset's settings for `--steps` steps (training only: no sample grid, no evaluation) in each
   configuration of VARIANTS (one process with each memory option; LoRA; two processes DDP; two processes FSDP,
   the teacher replicated, sharded, sharded in bf16). Peak resident memory of the largest process and seconds
   per step are read off each run; the slope between the two widths, in bytes per parameter, is set against the
   formula's. Writes OUT.md and OUT.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.runtime_bench import cpu_name, write_report
from fewstep.errors import cli_main

ROOT = Path(__file__).resolve().parent.parent
GB = 1024**3

# The public configs (the fields that decide the parameter count; the rest are the classes' defaults)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))
SD3_MEDIUM_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                              num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                              pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)

# glibc's malloc raises its mmap threshold (up to 32 MB) each time a large block is freed, so later blocks come from
# the heap and stay in the resident set after they are freed: FSDP's per-block gathers then read as held memory (15
# bytes per parameter more than the formula at 2 processes). A fixed threshold returns freed blocks to the system,
# so resident memory counts what is held (the formula to within a few bytes). It changes the measurement, not
# training; a GPU's memory is the CUDA allocator's, which this does not touch.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "131072"}

# bytes per teacher parameter held by one process of N: the frozen teacher 4 (bf16: 2), each trained copy 4 weights
# + 4 gradients + 8 AdamW moments (8-bit: 2) = 16 (10), a LoRA generator 4; sharded parts divided by N
VARIANTS = {  # name: (processes, extra distill.run --set values, formula bytes per parameter)
    "full, 1 process": (1, [], lambda n: 4 + 16 + 16),
    "full + gradient checkpointing, 1 process": (1, ["gradient_checkpointing=true"], lambda n: 36),
    "full, teacher bf16, 1 process": (1, ["teacher_dtype=bf16"], lambda n: 2 + 16 + 16),
    "full, fused AdamW, 1 process": (1, ["optimizer=fused"], lambda n: 36),
    "full, 8-bit AdamW, 1 process": (1, ["optimizer=8bit"], lambda n: 4 + 10 + 10),
    "LoRA 8, 1 process": (1, ["lora_rank=8"], lambda n: 4 + 16 + 4),
    "LoRA 8, teacher bf16, 8-bit AdamW, 1 process": (1, ["lora_rank=8", "teacher_dtype=bf16", "optimizer=8bit"],
                                                     lambda n: 2 + 10 + 4),
    "full, 2 processes DDP": (2, [], lambda n: 36),
    "full, 2 processes FSDP": (2, ["fsdp=true"], lambda n: 4 + 32 / n),
    "full, 2 processes FSDP, teacher sharded": (2, ["fsdp=true", "fsdp_shard_teacher=true"], lambda n: (4 + 32) / n),
    "full, 2 processes FSDP, teacher sharded in bf16": (2, ["fsdp=true", "fsdp_shard_teacher=true",
                                                            "teacher_dtype=bf16"], lambda n: (2 + 32) / n),
}


def teacher_sizes() -> dict:
    """Parameters of the public teachers, counted on the meta device."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    sizes = {}
    for name, cls, config in (("SD 1.5 UNet", UNet2DConditionModel, SD15_UNET),
                              ("SDXL UNet", UNet2DConditionModel, SDXL_UNET),
                              ("SD3-medium transformer", SD3Transformer2DModel, SD3_MEDIUM_TRANSFORMER),
                              ("FLUX.1 transformer", FluxTransformer2DModel, FLUX_TRANSFORMER)):
        with torch.device("meta"):
            model = cls(**config)
        sizes[name] = sum(p.numel() for p in model.parameters())
    return sizes


def make_teacher(path: Path, width: int) -> int:
    """A class-conditional pixel UNet teacher (DDPMPipeline layout) with SD 1.5's channel ratios; its parameters."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(width, 2 * width, 4 * width, 4 * width), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=8, num_class_embeds=4)
    unet.save_pretrained(path / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon",
                  clip_sample=False).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    (path / "fewstep_teacher.json").write_text(json.dumps({"num_classes": 3, "null_class": 3,
                                                            "guidance_scale": 2.0}))
    return sum(p.numel() for p in unet.parameters())


def make_data(path: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(3):
        (path / str(c)).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path / str(c) / f"{i}.png")
    return path


def worker(teacher_dir: Path, data: Path, out: Path, steps: int, sets: list[str]) -> None:
    """One DMD2 training (the pixel preset's settings, batch 2 per process) and nothing else: no sample grid, no
    evaluation, so the process's peak is training's. Run by measure(), under torchrun for several processes."""
    import dataclasses

    from accelerate import Accelerator

    import distill.dmd2.train as dmd2  # the loop looks fake_step up here: every training step ends with it
    from distill.data import load_class_folder
    from distill.dmd2 import train_dmd2
    from distill.run import PRESETS, parse_overrides
    from distill.teachers import load_teacher

    teacher = load_teacher(teacher_dir)
    c, h, w = teacher.x_shape
    real = load_class_folder(data, (h, w), c, teacher.num_classes)
    cfg = dataclasses.replace(PRESETS["pixel"].config, steps=steps, batch_size=2, warmup=0, checkpoint_every=steps)
    cfg = dataclasses.replace(cfg, **parse_overrides(sets))
    accelerator = Accelerator(cpu=True)
    fake_step, resident = dmd2.fake_step, []

    def measured_fake_step(*args, **kw):  # the resident memory at the end of every step (activations freed)
        logs = fake_step(*args, **kw)
        resident.append(int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
        return logs

    dmd2.fake_step = measured_fake_step
    train_dmd2(cfg, teacher, real, out, progress=False, accelerator=accelerator)
    (out / f"resident_{accelerator.process_index}.json").write_text(json.dumps(resident))


def measure(teacher: Path, data: Path, out: Path, processes: int, extra: list[str], steps: int, port: int) -> dict:
    """Peak resident memory of the largest process (bytes) and seconds per step of one training."""
    args = ["--worker", "--teacher", str(teacher), "--data", str(data), "--steps", str(steps), "--out", str(out),
            *extra]
    launch = [sys.executable, "-m", "benchmarks.memory_bench"] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
         str(port), "-m", "benchmarks.memory_bench"]
    # a fresh parent per run: RUSAGE_CHILDREN's peak is the largest of its (waited-for) descendants
    probe = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
             "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);"
             "sys.stderr.write(done.stderr[-2000:] if done.returncode else '')")
    done = subprocess.run([sys.executable, "-c", probe, *launch, *args], cwd=ROOT, capture_output=True, text=True,
                          env=os.environ | {"OMP_NUM_THREADS": "1", **ALLOCATOR}, timeout=1800)
    code, peak_kb = map(int, done.stdout.split())
    if code:
        raise RuntimeError(f"training failed: {done.stderr}")
    training = json.loads((out / "student" / "fewstep_student.json").read_text())["training"]
    steady = max(max(json.loads(f.read_text())) for f in out.glob("resident_*.json"))
    return {"peak_bytes": peak_kb * 1024, "steady_bytes": steady,
            "seconds_per_step": training["train_seconds"] / training["steps_done"]}


def bench(widths: list[int], steps: int) -> dict:
    sizes = teacher_sizes()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_data(root / "data")
        params = {w: make_teacher(root / f"teacher{w}", w) for w in widths}
        for name, (processes, extra, _) in VARIANTS.items():
            runs[name] = {}
            for w in widths:
                out = root / f"run_{len(runs)}_{w}"
                sets = [a for s in extra for a in ("--set", s)]
                runs[name][w] = measure(root / f"teacher{w}", data, out, processes, sets, steps,
                                        29600 + 10 * len(runs) + widths.index(w))
                print(f"{name}, width {w} ({params[w] / 1e6:.1f} M parameters): "
                      f"{runs[name][w]['peak_bytes'] / 2**20:.0f} MiB peak, "
                      f"{runs[name][w]['seconds_per_step']:.2f} s/step", flush=True)
    lo, hi = widths[0], widths[-1]
    table = []
    for name, (processes, _, formula) in VARIANTS.items():
        def slope(key: str, name: str = name) -> float:
            return (runs[name][hi][key] - runs[name][lo][key]) / (params[hi] - params[lo])

        table.append({"variant": name, "processes": processes, "formula_bytes_per_param": formula(processes),
                      "measured_bytes_per_param": slope("steady_bytes"), "peak_bytes_per_param": slope("peak_bytes"),
                      "steady_mib": {str(w): runs[name][w]["steady_bytes"] / 2**20 for w in widths},
                      "peak_mib": {str(w): runs[name][w]["peak_bytes"] / 2**20 for w in widths},
                      "seconds_per_step": {str(w): runs[name][w]["seconds_per_step"] for w in widths}})
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "steps": steps, "widths": widths,
            "parameters": {str(w): params[w] for w in widths}, "teachers": sizes, "table": table}


EXTRAPOLATED = {  # column: bytes per parameter (the formula above)
    "full, DDP": 36, "full, DDP, teacher bf16 + 8-bit AdamW": 2 + 10 + 10, "LoRA, DDP": 24,
    "LoRA, teacher bf16 + 8-bit AdamW": 2 + 10 + 4, "FSDP, 8 GPUs": 4 + 32 / 8,
    "FSDP, 8 GPUs, teacher sharded in bf16": (2 + 32) / 8, "FSDP, 64 GPUs, teacher sharded in bf16": (2 + 32) / 64,
}


def extrapolation(report: dict) -> list[str]:
    """The formula at the public teachers' sizes, weights and optimizer state only."""
    lines = ["| teacher | parameters | " + " | ".join(f"{k} ({v:.3g} B)" for k, v in EXTRAPOLATED.items()) + " |",
             "|---|---|" + "---|" * len(EXTRAPOLATED)]
    for name, p in report["teachers"].items():
        cells = [p * b / GB for b in EXTRAPOLATED.values()]
        lines.append(f"| {name} | {p / 1e9:.2f} B | " + " | ".join(f"{c:.1f} GiB" for c in cells) + " |")
    return lines


def markdown(report: dict) -> str:
    w = report["widths"]
    sizes = ", ".join(f"{report['parameters'][str(x)] / 1e6:.1f} M" for x in w)
    lines = ["# DMD2 memory per process: measured at reduced size, extrapolated by formula", "",
             f"`python -m benchmarks.memory_bench {' '.join(sys.argv[1:])}` on {report['cpu']} "
             f"({report['cores']} cores), CPU processes (gloo), pixel UNet teachers with SD 1.5's channel ratios at "
             f"widths {', '.join(map(str, w))} ({sizes} parameters), 16x16 images, batch 2 per process, "
             f"{report['steps']} steps, fp32.", "",
             "Per process (the largest): **resident** memory at the end of a training step (what training holds: "
             "weights, gradients, optimizer state, activations freed) and the **high-water** mark of the whole "
             "run (loading, the end-of-run checkpoint, for which FSDP gathers the full state on the main process, and "
             "the bundle). Bytes per parameter: the slope between the two widths. The runs set glibc's "
             "`MALLOC_MMAP_THRESHOLD_=131072` (`ALLOCATOR`): with its default, freed blocks of FSDP's per-block "
             "gathers stay in the resident set and read as held memory.", "",
             "| configuration | processes | resident MiB (" + " / ".join(f"width {x}" for x in w) +
             ") | high-water MiB | s/step | B/param, resident | B/param, formula | B/param, high-water |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["table"]:
        lines.append(f"| {r['variant']} | {r['processes']} | "
                     + " / ".join(f"{r['steady_mib'][str(x)]:.0f}" for x in w) + " | "
                     + " / ".join(f"{r['peak_mib'][str(x)]:.0f}" for x in w) + " | "
                     + " / ".join(f"{r['seconds_per_step'][str(x)]:.2f}" for x in w) + " | "
                     f"{r['measured_bytes_per_param']:.1f} | {r['formula_bytes_per_param']:.1f} | "
                     f"{r['peak_bytes_per_param']:.1f} |")
    lines += ["", "The formula at the public teachers' sizes (weights, gradients and AdamW state per process; "
              "activations come on top):", "", *extrapolation(report)]
    return "\n".join(lines) + "\n"


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="32,64")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one training run (measure())
    p.add_argument("--teacher", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.teacher, args.data, args.out, args.steps, args.set)
    report = bench([int(x) for x in args.widths.split(",")], args.steps)
    write_report(args.out, report, markdown(report))


if __name__ == "__main__":
    main()
