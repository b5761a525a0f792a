"""Fully sharded training (PyTorch's FSDP2, `torch.distributed.fsdp.fully_shard`) for the methods' trainable
copies of the teacher: each process holds 1/N of their weights, gradients and optimizer state, and gathers a
block's weights only while that block runs.

Why FSDP2 applied here rather than accelerate's FSDP plugin: accelerate enables FSDP on GPUs only (its CPU
multi-process mode is DDP) and prepares one model per FSDP2 call, while DMD2 trains two (generator, fake score) and
calls them in no-grad passes as well; FSDP2 shards a module in place, so every call of the same object — trained,
no-grad, frozen — gathers its weights the same way, on GPUs (NCCL) and on CPUs (gloo) alike. accelerate still
starts the processes and owns the process group (`accelerate launch` or torchrun).

Checkpoints hold full tensors, gathered from the shards (a collective: every process calls `full_state`), so a
run resumes under FSDP with any process count, or without it.
"""

import copy
import itertools

import torch
from torch import nn

from distill.errors import UserError


def check_fsdp(accelerator, lora_rank: int | None, mixed_precision: str | None) -> None:
    """One-line errors for what FSDP cannot do here, each naming what works."""
    if accelerator.num_processes < 2:
        raise UserError("fsdp shards the networks across processes, and this run has one: launch several "
                        "(accelerate launch --num_processes N, or torchrun --nproc_per_node N), or drop fsdp")
    if lora_rank:
        raise UserError("fsdp with LoRA is not supported: LoRA trains a few adapters, which DDP replicates cheaply "
                        "(drop fsdp), or train all weights with fsdp (drop lora_rank)")
    if mixed_precision == "fp16":
        raise UserError("fsdp with mixed_precision=fp16 is refused: DMD2's reference diverged in fp16; use bf16 "
                        "(or no)")
    if accelerator.distributed_type.name not in ("MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU"):
        raise UserError(f"fsdp is fewstep's own (FSDP2 on a plain multi-process launch); accelerate's "
                        f"{accelerator.distributed_type.name} mode is not: launch without accelerate's FSDP / "
                        "DeepSpeed settings (configs/accelerate/multi_gpu.yaml)")


def blocks(module: nn.Module) -> list[nn.Module]:
    """The units to shard one by one: every composite member of every ModuleList / ModuleDict (a UNet's down / up
    blocks and their resnets and attentions, a transformer's blocks), outermost first. The rest of the module
    (embeddings, in / out convolutions, heads) forms the root unit."""
    units = []
    for child in module.modules():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            # composite members only: a lone layer (attention's to_out Linear) is too small to be worth a gather,
            # and its output, a view, would lose FSDP's backward hook to an in-place op downstream
            units.extend(m for m in child.children() if next(m.children(), None) is not None
                         and any(p.numel() for p in m.parameters()))
    return units


def shard(module: nn.Module) -> nn.Module:
    """Shard `module` in place across the default process group: its blocks, innermost first, then the root."""
    from torch.distributed.fsdp import fully_shard

    for unit in reversed(blocks(module)):
        fully_shard(unit)
    # The root reshards after its forward too (FSDP2 keeps a root's weights gathered until its backward by
    # default): the loop also calls these modules without grad, and a root left gathered by such a call trained
    # wrong on its next update (2 processes drifted from 1 by 5 % of the weights' movement in 3 steps).
    fully_shard(module, reshard_after_forward=True)
    return module


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters and buffers are on PyTorch's meta device: its structure, no memory."""
    memo = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(module, memo)


def tensors(module: nn.Module) -> dict:
    """Every parameter and buffer of `module` by name, persistent or not (what a meta copy is filled from)."""
    return dict(module.named_parameters()) | dict(module.named_buffers())


def shard_from(module: nn.Module, values: dict, device: torch.device) -> nn.Module:
    """Shard `module`, built by meta_copy (plus any real-valued parts added since, such as a fresh head), and fill
    it: `values[name]` (full tensors, e.g. the teacher's) for what is on the meta device, its own values for the
    rest. So each process holds only its shards of the copy, never the whole (the teacher's full weights, which
    every process has loaded anyway, are the only full copy)."""
    own = {k: v.detach().clone() for k, v in tensors(module).items() if not v.is_meta}
    missing = [k for k, v in tensors(module).items() if v.is_meta and k not in values]
    if missing:
        raise ValueError(f"no values for {', '.join(missing[:3])}")
    full = {k: own[k] if k in own else values[k] for k in tensors(module)}
    module.to_empty(device="meta")  # all of it on meta, so the shards are made without memory
    shard(module)
    module.to_empty(device=device)
    load_full_state(module, {k: full[k] for k in module.state_dict()})
    with torch.no_grad():  # FSDP2 leaves buffers whole; non-persistent ones are not in the state dict
        for name, buffer in module.named_buffers():
            buffer.copy_(full[name])
    return module


def filled(template: nn.Module, weights: dict, buffers_from: nn.Module) -> nn.Module:
    """`template` (a meta_copy) made real on the CPU: `weights` (a full state dict) loaded strictly, the buffers
    outside the state dict (non-persistent ones) copied from `buffers_from`, a module of the same layout."""
    template.to_empty(device="cpu")
    template.load_state_dict(weights, strict=True)
    source = dict(buffers_from.named_buffers())
    with torch.no_grad():
        for name, buffer in template.named_buffers():
            if name not in weights:
                buffer.copy_(source[name])
    return template


def full_state(module: nn.Module) -> dict:
    """The module's full (unsharded) state dict, in CPU memory on the main process (the others get an empty dict):
    a collective, every process calls it. Gathered a tensor at a time, so no device ever holds the whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(module: nn.Module, state: dict, from_main: bool = False) -> None:
    """Load a full state dict into a sharded module (each process keeps its shard). from_main: only the main
    process has read `state` (the others pass {}); it sends each tensor in turn, so no other process ever holds the
    full state (a resumed checkpoint)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=True,
                                                                 broadcast_from_rank0=from_main))


def full_optimizer_state(module: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer's full state, as full_state: on the main process's CPU memory, a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(module: nn.Module, opt: torch.optim.Optimizer, state: dict,
                              from_main: bool = False) -> None:
    """As load_full_state, for the optimizer's state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, opt, state, options=StateDictOptions(full_state_dict=True,
                                                                          broadcast_from_rank0=from_main))


def full_tensors(tensors: dict) -> dict:
    """{name: full tensor} in CPU memory of a dict of (possibly sharded) tensors, e.g. an EMA of sharded weights;
    a collective, gathered a tensor at a time."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in tensors.items()}


def like(full: dict, sharded: dict) -> dict:
    """Full tensors (a checkpoint's EMA, read by the main process only: the others pass {}) laid out as the
    matching sharded ones: the main process sends them, each process keeps its shard."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = {}
    for k, ref in sharded.items():
        value = full[k].to(ref.device, ref.dtype) if k in full else torch.empty(ref.shape, dtype=ref.dtype,
                                                                                device=ref.device)
        if isinstance(ref, DTensor):  # scattered from rank 0 (distribute_tensor's default source)
            out[k] = distribute_tensor(value, ref.device_mesh, ref.placements)
        else:
            dist.broadcast(value, src=0)
            out[k] = value
    return out
