"""The methods' optimizers (DMD2's AdamW, SFD's Adam) in the implementation a config names.

- "default": PyTorch's (its multi-tensor "foreach" kernels where they apply).
- "fused": PyTorch's fused kernel: one kernel per step and none of foreach's full-size temporaries (less peak
  memory at the step, faster on GPUs), the same numbers up to rounding.
- "8bit": bitsandbytes' Adam8bit / AdamW8bit (what diffusers' training scripts use for --use_8bit_adam): both
  moments quantized blockwise to 8 bits, 2 bytes per parameter instead of 8 (tensors under 4096 elements stay
  fp32). Its state is plain tensors, so checkpoints and resume work as with the others. Not with fsdp: it does not
  take FSDP's sharded (DTensor) parameters.
"""

import torch

from distill.errors import UserError

OPTIMIZERS = ("default", "fused", "8bit")


def check_optimizer(name: str, fsdp: bool) -> None:
    if name not in OPTIMIZERS:
        raise UserError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if name == "8bit" and fsdp:
        raise UserError("optimizer=8bit with fsdp is not supported (bitsandbytes does not take sharded parameters): "
                        "use fsdp with optimizer=default or fused (FSDP already divides the optimizer state by the "
                        "process count), or optimizer=8bit without fsdp")
    if name == "8bit":
        _bitsandbytes()


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise UserError("optimizer=8bit needs bitsandbytes: pip install 'fewstep[memory]' (or pip install "
                        "bitsandbytes), or use optimizer=default / fused") from None
    return bitsandbytes


def make_optimizer(params, name: str, decoupled_decay: bool, lr: float, betas: tuple[float, float],
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW (decoupled_decay) or Adam over `params` in the implementation `name` (OPTIMIZERS)."""
    params = list(params)
    kw = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if name == "8bit":
        optim = _bitsandbytes().optim
        return (optim.AdamW8bit if decoupled_decay else optim.Adam8bit)(params, **kw)
    cls = torch.optim.AdamW if decoupled_decay else torch.optim.Adam
    return cls(params, **kw, fused=True) if name == "fused" else cls(params, **kw)
