"""What every fewstep training method shares (DMD2, SFD): precision, optimizer steps, NaN checks, and the loop
that resumes, checkpoints atomically, logs metrics.jsonl, shows progress and stops cleanly on Ctrl-C.

A method supplies three functions: `train_step(step) -> logs`, `get_state() -> dict` (its networks, optimizers,
RNG streams...) and `set_state(dict)`. The loop owns the step counter, the wall time, the global RNG state and the
config check, so a re-run of the same command continues where the last checkpoint left off, and one with other
settings is refused.
"""

import contextlib
import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from distill.checkpoint import load_state, rng_state, save_state, set_rng_state, truncate_log
from distill.errors import UserError

# Settings a resumed run may change: they do not alter the optimisation done so far.
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "log_every")
STATE_NAME = "state.safetensors"


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """bf16 autocast on CUDA, fp32 on CPU unless asked (DMD2's authors found fp16 to diverge)."""
    precision = precision or ("bf16" if device.type == "cuda" else "no")
    if precision not in ("no", "bf16", "fp16"):
        raise UserError(f"mixed_precision must be no, bf16 or fp16, got {precision!r}")
    return precision


TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_teacher_dtype(name: str) -> None:
    if name == "fp16":
        raise UserError("teacher_dtype=fp16 is refused: DMD2's reference diverged in fp16; use teacher_dtype=bf16"
                        " (half the memory too) or fp32")
    if name not in TEACHER_DTYPES:
        raise UserError(f"teacher_dtype must be fp32 or bf16, got {name!r}")


class LowPrecisionTeacher(nn.Module):
    """The frozen teacher with its network's weights cast to `dtype` in place (bf16: half of fp32's memory),
    called under autocast to that dtype so fp32 inputs meet them; x0 comes back in fp32. The denoiser's scalings
    around the network (c_skip, c_out, in float64 / fp32) and its buffers stay as they were. The teacher object is
    changed: load it again to use it in full precision afterwards."""

    def __init__(self, denoiser: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.denoiser, self.dtype = denoiser, dtype
        with torch.no_grad():
            for p in denoiser.net.parameters():
                p.data = p.data.to(dtype)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.denoiser(x, sigma, cond).float()


def autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def optimizer_step(loss, opt, scaler, params, grad_clip: float, accelerator) -> float:
    """backward, unscale, clip to grad_clip, step; returns the gradient norm before clipping."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    grad_norm = accelerator.clip_grad_norm_(params, grad_clip)
    scaler.step(opt)
    scaler.update()
    return float(grad_norm)


class NonFiniteLoss(UserError):
    """A NaN / inf loss: training stops before the bad update reaches any weights or checkpoint."""


def check_finite(losses: dict, step: int, accelerator) -> None:
    """Raise NonFiniteLoss on every process when any process has a NaN / inf loss (none may hang)."""
    values = torch.stack([v.detach().float() for v in losses.values()])
    bad = (~torch.isfinite(values)).float()
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bool(bad.any()):
        name, value = next((k, v) for (k, v), b in zip(losses.items(), bad) if b)
        raise NonFiniteLoss(f"step {step}: the {name} loss is {value.item()}")


def jsonable(d: dict) -> dict:
    """A config dict as it reads back from JSON (tuples become lists), so saved and current compare equal."""
    return json.loads(json.dumps(d))


@contextlib.contextmanager
def deferred_interrupt():
    """Ctrl-C (SIGINT) sets a flag instead of raising, so the loop stops between two steps and checkpoints.

    Yields a function returning whether Ctrl-C was pressed. A second Ctrl-C interrupts at once. Outside the
    main thread (where signal handlers cannot be set) it does nothing.
    """
    pressed = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(True)
        print("\nCtrl-C: stopping after this step and saving the state (press again to quit at once)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


def any_process(flag: bool, accelerator) -> bool:
    """True when the flag is set on any process (all must stop at the same step, or DDP hangs)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum") > 0)


def run_loop(*, out_dir: Path, config: dict, steps: int, checkpoint_every: int, log_every: int, accelerator,
             train_step: Callable[[int], dict], get_state: Callable[[], dict], set_state: Callable[[dict], None],
             progress: bool = True, desc: str = "train",
             resumable: tuple[str, ...] = RESUMABLE_CHANGES, defaults: dict | None = None,
             collective_state: bool = False, main_only: tuple[str, ...] = ()) -> tuple[int, float]:
    """Run `train_step(step)` for step = (resumed step) .. steps-1; returns (steps done, training seconds).

    out_dir/state.safetensors holds the method's state plus the step, wall time, global RNG state and config;
    it is written atomically every `checkpoint_every` steps, at the end and on Ctrl-C. out_dir/metrics.jsonl
    gets the logs of every `log_every`-th step (and the last); on resume, records past the checkpoint are
    dropped so every step appears once. `resumable`: the config keys a resumed run may change (a method whose
    schedule depends on `steps` leaves it out). `defaults`: the config's default values; a setting the saved
    config lacks (added to fewstep after the state was written) counts as its default, which by convention is the
    behaviour the older version had. `collective_state`: get_state gathers sharded tensors, so every process calls
    it (the main one writes the file). `main_only`: entries of the state that only the main process reads on
    resume (the others get {}): set_state sends them on (sharded weights and optimizer state), so no other process
    holds the whole checkpoint.
    """
    out_dir = Path(out_dir)
    state_path = out_dir / STATE_NAME
    config = jsonable(config)
    step, elapsed = 0, 0.0
    if state_path.exists():
        state = load_state(state_path, leave_out=() if accelerator.is_main_process else main_only)
        saved = jsonable(defaults or {}) | state.get("config", {})
        saved = {k: v for k, v in saved.items() if k not in resumable}
        wanted = {k: v for k, v in config.items() if k not in resumable}
        changed = sorted(k for k in wanted.keys() | saved.keys() if wanted.get(k) != saved.get(k))
        if changed:
            raise UserError(f"{state_path} was written with a different config ({', '.join(changed)}); "
                            "use another --out folder, or the settings it was started with")
        try:
            set_state(state)
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"{state_path} does not match these networks ({str(e).splitlines()[0]}); "
                            "it belongs to another teacher or fewstep version: use another --out folder") from None
        set_rng_state(state["rng"])
        step, elapsed = state["step"], state["elapsed"]
        if accelerator.is_main_process:
            print(f"resuming from step {step} ({state_path})")

    main = accelerator.is_main_process

    def checkpoint():
        state = get_state() if main or collective_state else None
        if main:
            save_state(state_path, state | {"config": config, "rng": rng_state(), "step": step, "elapsed": elapsed})
        accelerator.wait_for_everyone()

    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "metrics.jsonl"
    if main:
        truncate_log(log_path, step)  # lines past the checkpoint were written by the run that stopped
    log = open(log_path, "a") if main else None
    bar = tqdm(total=steps, initial=step, desc=desc, unit="step", disable=not (progress and main))
    last_saved = step if state_path.exists() else None
    try:
        with deferred_interrupt() as interrupted:
            while step < steps and not any_process(interrupted(), accelerator):
                t0 = time.perf_counter()
                logs = {"step": step} | train_step(step)
                step += 1
                elapsed += time.perf_counter() - t0
                logs["seconds"] = round(elapsed, 2)
                bar.update(1)
                bar.set_postfix({k.removeprefix("loss_"): f"{v:.4g}" for k, v in logs.items() if k.startswith("loss_")})
                # a step's record is kept every log_every steps, at the last, and whenever it asks to be
                # ("log": True, e.g. a checkpoint rating that falls between)
                if main and (logs.pop("log", False) or (step - 1) % log_every == 0 or step == steps):
                    log.write(json.dumps(logs) + "\n")
                if step % checkpoint_every == 0 or step == steps:
                    if main:
                        log.flush()
                    checkpoint()
                    last_saved = step
        if step < steps:  # Ctrl-C: the loop stopped between steps, so the state is consistent
            checkpoint()
            raise UserError(f"interrupted at step {step}; the state is saved in {state_path}: run the same "
                            "command to resume")
    except NonFiniteLoss as e:
        kept = (f"the checkpoint at step {last_saved} in {state_path} is kept" if last_saved is not None
                else "no checkpoint was written yet")
        raise UserError(f"{e}; training stopped ({kept}). Lower the learning rates or check the data") from None
    finally:
        bar.close()
        if log is not None:
            log.close()
    return step, elapsed
