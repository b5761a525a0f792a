"""DMD2's peak GPU memory per process and seconds per step at the public teachers' sizes, on this machine's GPUs:
`python -m benchmarks.gpu_memory_bench --out docs/gpu_memory_bench [--teachers sd15,sdxl,sd3-medium] [--latent 64]`.

The teachers are random networks from the public configs (benchmarks/memory_bench.py: SD 1.5's and SDXL's UNets,
SD3-medium's transformer), built on the GPU from their config.json (no weights on disk, nothing downloaded), in
their real folder layouts with tiny random text encoders and VAE of the widths the denoiser takes: what is measured
is DMD2's three copies of the denoiser, the optimizer state and the activations. A FLUX.1-size transformer (11.9 B
parameters) needs at least 177 GB in any single-process configuration (memory_bench's formula), so it is left to
the formula and to FSDP across several GPUs.

Each configuration runs DMD2 for `--steps` steps (batch `--batch` per process, 1-step student, the GAN on, the
family's preset otherwise) and reports `torch.cuda.max_memory_allocated` of the largest process and the seconds per
step after the first. The single-process configurations run one after another in one process per teacher (the
teacher built again for each: teacher_dtype casts it); an out-of-memory is recorded as such. With two or more GPUs
the DDP and FSDP configurations run under torchrun on all of them. Checkpoints and bundles are not written (disk,
not GPU memory: the worker replaces the two writers). Writes OUT.md and OUT.json.

`--tiny` runs the same code on the CPU with tiny configs (resident memory instead of GPU memory; the DDP / FSDP rows
on two CPU processes): a check that the script works, for machines without a GPU.
"""

import argparse
import dataclasses
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.memory_bench import SD3_MEDIUM_TRANSFORMER, SD15_UNET, SDXL_UNET
from benchmarks.runtime_bench import write_report
from fewstep.errors import UserError, cli_main

ROOT = Path(__file__).resolve().parent.parent
GB = 1024**3

SINGLE = {  # name: --set values, one process
    "full": [],
    "full + gradient checkpointing": ["gradient_checkpointing=true"],
    "full, teacher bf16": ["teacher_dtype=bf16"],
    "full, 8-bit AdamW": ["optimizer=8bit"],
    "full, teacher bf16 + 8-bit AdamW + checkpointing": ["teacher_dtype=bf16", "optimizer=8bit",
                                                         "gradient_checkpointing=true"],
    "LoRA 64": ["lora_rank=64"],
    "LoRA 64, teacher bf16 + 8-bit AdamW + checkpointing": ["lora_rank=64", "teacher_dtype=bf16", "optimizer=8bit",
                                                            "gradient_checkpointing=true"],
}
MULTI = {  # name: --set values, one process per GPU
    "full, DDP": [],
    "full, FSDP": ["fsdp=true"],
    "full, FSDP, teacher sharded in bf16": ["fsdp=true", "fsdp_shard_teacher=true", "teacher_dtype=bf16"],
    "full, FSDP, teacher sharded in bf16 + checkpointing": ["fsdp=true", "fsdp_shard_teacher=true",
                                                            "teacher_dtype=bf16", "gradient_checkpointing=true"],
}
# teacher: (preset, folder kind, denoiser config, text widths)
TEACHERS = {
    "sd15": ("sd15", "sd", dict(SD15_UNET), {"clip": 768}),
    "sdxl": ("sdxl", "sdxl", dict(SDXL_UNET), {"clip": 768, "clip_2": 1280}),
    "sd3-medium": ("sd3", "sd3", dict(SD3_MEDIUM_TRANSFORMER), {"clip": 768, "clip_2": 1280, "t5": 4096}),
}
TINY = {  # --tiny: the same layouts at test size
    "sd15": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=2,
                 cross_attention_dim=32, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
    "sdxl": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=2,
                 cross_attention_dim=32, transformer_layers_per_block=1, addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=6 * 4 + 16,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
    "sd3-medium": dict(num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                       caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16),
}
TINY_TEXT = {"sd15": {"clip": 32}, "sdxl": {"clip": 16, "clip_2": 16}, "sd3-medium": {"clip": 16, "clip_2": 16,
                                                                                      "t5": 32}}


def make_teacher(path: Path, name: str, latent: int, tiny: bool) -> Path:
    """The teacher's folder: the denoiser's config.json only (the worker builds it with random weights), a tiny VAE
    (latent = image / 2) and tiny text encoders of the widths the denoiser takes, the family's scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    from tests.tiny_sd import T5_TOKENS, write_tiny_t5, write_tiny_text_encoder, write_tiny_tokenizer

    _, kind, config, text = TEACHERS[name]
    config = config | (TINY[name] if tiny else {})
    text = TINY_TEXT[name] if tiny else text
    torch.manual_seed(0)
    channels = 16 if kind == "sd3" else 4
    if kind == "sd3":
        from diffusers import SD3Transformer2DModel as cls
        config |= dict(sample_size=latent, in_channels=channels, out_channels=channels,
                       pos_embed_max_size=max(config.get("pos_embed_max_size", 0), latent // 2))
    else:
        from diffusers import UNet2DConditionModel as cls
        config |= dict(sample_size=latent)
    folder = path / ("transformer" if kind == "sd3" else "unet")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": cls.__name__, **config}))
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=channels, block_out_channels=(8, 16),
                  layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=2 * latent,
                  scaling_factor=0.18215).save_pretrained(path / "vae", safe_serialization=True)
    components = {folder.name: ["diffusers", cls.__name__], "vae": ["diffusers", "AutoencoderKL"]}
    if kind == "sd3":
        write_tiny_text_encoder(path / "text_encoder", text["clip"], projection_dim=text["clip"])
        write_tiny_text_encoder(path / "text_encoder_2", text["clip_2"], projection_dim=text["clip_2"])
        write_tiny_t5(path / "text_encoder_3", text["t5"])
        for suffix in ("", "_2", "_3"):
            write_tiny_tokenizer(path / f"tokenizer{suffix}")
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(path / "scheduler")
        (path / "fewstep_teacher.json").write_text(json.dumps({"max_sequence_length": T5_TOKENS}))
        components |= {"text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                       "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                       "text_encoder_3": ["transformers", "T5EncoderModel"],
                       "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
        pipeline = "StableDiffusion3Pipeline"
    else:
        xl = kind == "sdxl"
        write_tiny_text_encoder(path / "text_encoder", text["clip"])
        write_tiny_tokenizer(path / "tokenizer")
        if xl:
            write_tiny_text_encoder(path / "text_encoder_2", text["clip_2"], text["clip_2"])
            write_tiny_tokenizer(path / "tokenizer_2")
            components |= {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
        scheduler = EulerDiscreteScheduler if xl else DDPMScheduler
        scheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="epsilon").save_pretrained(path / "scheduler")
        components |= {"text_encoder": ["transformers", "CLIPTextModel"], "scheduler": ["diffusers",
                                                                                        scheduler.__name__]}
        pipeline = "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"
    (path / "model_index.json").write_text(json.dumps({"_class_name": pipeline, **components}))
    return path


def make_data(path: Path, size: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    path.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path / f"{i}.png")
        (path / f"{i}.txt").write_text(f"a random picture number {i}")
    return path


def random_denoisers(device: torch.device) -> None:
    """Make the teacher loaders build a denoiser folder without weights from its config, randomly initialised on
    `device` (seconds on a GPU, where reading billions of weights from disk would take minutes)."""
    import distill.teachers.latent as latent
    import distill.teachers.sd3 as sd3
    from distill.teachers.loading import WEIGHT_NAMES

    original = latent.load_diffusers_model

    def load(cls, folder):
        folder = Path(folder)
        if any((folder / name).exists() for name in WEIGHT_NAMES):
            return original(cls, folder)
        torch.manual_seed(0)
        with torch.device(device):
            model = cls.from_config(cls.load_config(folder))
        return model.float().eval()

    latent.load_diffusers_model = sd3.load_diffusers_model = load


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # --tiny: the process's high-water mark


def run_one(teacher_dir: Path, data: Path, preset: str, sets: list[str], steps: int, batch: int, out: Path,
            accelerator) -> dict:
    """One DMD2 training; {"peak_gib", "seconds_per_step"} or {"error": "out of memory"}."""
    import distill.dmd2.train as dmd2
    import distill.training as training
    from distill.data import load_captioned_folder
    from distill.dmd2 import train_dmd2
    from distill.run import PRESETS, parse_overrides
    from distill.teachers import load_teacher

    device = accelerator.device
    training.save_state = lambda path, state: None  # no checkpoint: disk, not GPU memory
    dmd2.write_bundle = lambda *args, **kw: None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        teacher = load_teacher(teacher_dir)
        teacher.to(device)
        real = load_captioned_folder(data, teacher.image_size)
        cfg = dataclasses.replace(PRESETS[preset].config, steps=steps, batch_size=batch, warmup=0, log_every=1,
                                  checkpoint_every=steps, student_timesteps=None, dfake_gen_update_ratio=2,
                                  lora_rank=None)
        cfg = dataclasses.replace(cfg, **parse_overrides(sets))
        train_dmd2(cfg, teacher, real, out, progress=False, accelerator=accelerator)
        seconds = [json.loads(line)["seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        row = {"peak_gib": peak_bytes(device) / GB,
               "seconds_per_step": (seconds[-1] - seconds[0]) / max(len(seconds) - 1, 1)}
    except torch.OutOfMemoryError:
        row = {"error": "out of memory"}
    finally:
        teacher = real = None
        gc.collect()
    return row


def worker(args) -> None:
    """Every configuration of `args.configs` for one teacher, in this process (or this torchrun group)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=args.tiny)
    random_denoisers(accelerator.device)
    table = MULTI if accelerator.num_processes > 1 else SINGLE
    rows = {}
    for name in args.configs.split(";"):
        out = args.out / f"{len(rows)}"
        rows[name] = run_one(args.teacher, args.data, TEACHERS[args.name][0], table[name], args.steps, args.batch,
                             out, accelerator)
        if accelerator.is_main_process:
            print(json.dumps({"teacher": args.name, "config": name, **rows[name]}), flush=True)
    # the largest process's peak: every process writes its own
    (args.out / f"rows_{accelerator.process_index}.json").write_text(json.dumps(rows))


def bench(teachers: list[str], latent: int, steps: int, batch: int, tiny: bool) -> dict:
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    gpus = 0 if tiny else torch.cuda.device_count()
    if not tiny and gpus == 0:
        raise UserError("no CUDA GPU here: this benchmark measures GPU memory (run benchmarks.memory_bench on a "
                        "CPU, or pass --tiny to check the script)")
    report = {"device": "CPU (--tiny)" if tiny else torch.cuda.get_device_name(0), "gpus": gpus, "latent": latent,
              "steps": steps, "batch": batch, "tiny": tiny, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in teachers:
            teacher = make_teacher(root / name, name, latent, tiny)
            data = make_data(root / f"data_{name}", 2 * latent)
            cls = SD3Transformer2DModel if TEACHERS[name][1] == "sd3" else UNet2DConditionModel
            with torch.device("meta"):
                params = sum(p.numel() for p in cls.from_config(cls.load_config(teacher / (
                    "transformer" if cls is SD3Transformer2DModel else "unet"))).parameters())
            multi = 2 if tiny else gpus  # --tiny: two CPU processes (gloo)
            groups = [(1, SINGLE)] + ([(multi, MULTI)] if multi > 1 else [])
            for processes, table in groups:
                out = root / f"runs_{name}_{processes}"
                out.mkdir()
                args = ["--worker", "--name", name, "--teacher", str(teacher), "--data", str(data), "--steps",
                        str(steps), "--batch", str(batch), "--configs", ";".join(table), "--out", str(out)]
                args += ["--tiny"] if tiny else []
                launch = [sys.executable, "-m", "benchmarks.gpu_memory_bench"] if processes == 1 else \
                    [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m",
                     "benchmarks.gpu_memory_bench"]
                done = subprocess.run(launch + args, cwd=ROOT, text=True, stderr=subprocess.PIPE,
                                      env=os.environ | {"OMP_NUM_THREADS": "1"} if tiny else os.environ)
                if done.returncode:
                    raise RuntimeError(f"{name}, {processes} process(es) failed:\n{done.stderr[-3000:]}")
                per_process = [json.loads(f.read_text()) for f in sorted(out.glob("rows_*.json"))]
                for config in table:
                    runs = [p[config] for p in per_process]
                    failed = next((r["error"] for r in runs if "error" in r), None)
                    report["rows"].append({
                        "teacher": name, "parameters": params, "config": config, "processes": processes,
                        "error": failed, "peak_gib": None if failed else max(r["peak_gib"] for r in runs),
                        "seconds_per_step": None if failed else max(r["seconds_per_step"] for r in runs)})
    return report


def markdown(report: dict) -> str:
    lines = ["# DMD2 peak GPU memory per process", "",
             f"`python -m benchmarks.gpu_memory_bench {' '.join(sys.argv[1:])}` on {report['device']} "
             f"(x{report['gpus']}), random teachers from the public configs, latents {report['latent']}x"
             f"{report['latent']}, batch {report['batch']} per process, {report['steps']} steps, bf16 autocast.",
             "", "| teacher | parameters | configuration | processes | peak memory per process | s/step |",
             "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        peak = r["error"] or f"{r['peak_gib']:.1f} GiB"
        step = "" if r["error"] else f"{r['seconds_per_step']:.2f}"
        size = f"{r['parameters'] / 1e9:.2f} B" if r["parameters"] >= 1e8 else f"{r['parameters'] / 1e6:.2f} M"
        lines.append(f"| {r['teacher']} | {size} | {r['config']} | {r['processes']} | "
                     f"{peak} | {step} |")
    return "\n".join(lines) + "\n"


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_memory_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--teachers", default="sd15,sdxl,sd3-medium")
    p.add_argument("--latent", type=int, default=64, help="latent size (64: SD 1.5 at 512 px)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=1, help="per process")
    p.add_argument("--tiny", action="store_true", help="tiny configs on the CPU: checks the script")
    p.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--teacher", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--configs", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    teachers = args.teachers.split(",")
    unknown = [t for t in teachers if t not in TEACHERS]
    if unknown:
        raise UserError(f"unknown teacher(s) {', '.join(unknown)}: choose from {', '.join(TEACHERS)}")
    started = time.perf_counter()
    report = bench(teachers, args.latent, args.steps, args.batch, args.tiny)
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_report(args.out, report, markdown(report))


if __name__ == "__main__":
    main()
