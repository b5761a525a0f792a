"""The exported computation and how it is traced: the student network with its input scaling, in sigma space
(docs/engine_spec.md, "the rule for every family"), the inputs its own loop feeds it, and the ONNX export itself."""

import contextlib
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

OPSET = 17
# Weights past this many bytes go to an external data file next to the graph: a protobuf cannot exceed 2 GB, and
# constant folding adds tensors to the weights (SD 1.5's UNet is 3.4 GB in fp32, SDXL's 10 GB).
EXTERNAL_DATA_BYTES = 1.5 * 2**30


def condition_names(manifest: dict) -> list[str]:
    """The graph inputs after (x, sigma, timestep) that carry a student's conditioning, in order."""
    cond = manifest["conditioning"]
    # a text student's manifest names its backbone's condition inputs; older SD / SDXL bundles said only "sdxl"
    text = cond.get("inputs") or ["encoder_hidden_states", *(["text_embeds", "time_ids"] if cond.get("sdxl") else [])]
    names = {"class": ["class_labels"], "text": list(text)}
    return names.get(cond["kind"], []) + (["nfe"] if "nfe_condition" in manifest else [])


class GraphStudent(nn.Module):
    """The exported computation: the UNet's raw prediction at x / sqrt(1 + sigma^2), in float32 ops."""

    output_names = ["prediction"]

    def __init__(self, bundle):
        super().__init__()
        self.denoiser = bundle.denoiser
        self.net = bundle.denoiser.net
        self.prediction_type = bundle.denoiser.prediction_type
        self.input_names = ["x", "sigma", "timestep", *condition_names(bundle.manifest)]

    def forward(self, x, sigma, timestep, *extra):
        cond = dict(zip(self.input_names[3:], extra))
        s = sigma.reshape(-1, 1, 1, 1)
        # the family's input scaling (x / sqrt(1 + sigma^2), EDM's c_in, x / (1 + sigma)), in float32
        return self.net(self.denoiser.scale_input(x, s), self.denoiser.graph_time(timestep), **cond)


def loop_inputs(bundle, nfe: int, batch: int, seed: int = 0, cond: dict | None = None) -> list[dict]:
    """The inputs the student's own loop feeds its network at each call (numpy, named as the graph's)."""
    return run_loop(bundle, nfe, batch, seed, cond)[0]


def run_loop(bundle, nfe: int, batch: int, seed: int = 0, cond: dict | None = None) -> tuple[list[dict], torch.Tensor]:
    """The student's own loop on seeded noise: (the graph's feed at each call, the final x0 (batch, C, H, W)).
    `cond`: the condition tensors (text students: the encoded prompts); default: classes cycling, or none."""
    from distill.bundle import sample_dmd2, sample_sfd

    entry = bundle.manifest["nfe"][str(nfe)]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((batch, *bundle.x_shape), generator=g)
    if cond is None:
        cond = bundle.cond(torch.arange(batch) % bundle.num_classes if bundle.num_classes else None)
    if "nfe_condition" in bundle.manifest:
        cond = cond | {"nfe": torch.full((batch,), nfe, dtype=torch.long)}
    calls = []

    def recorder(x, sigma, c):
        calls.append((x.clone(), sigma.clone()))
        return bundle.denoiser(x, sigma, c)

    sigmas = bundle.sigmas(nfe)
    with torch.no_grad():
        if bundle.manifest["renoise"] == "none":
            x0 = sample_sfd(recorder, noise * sigmas[0].item(), sigmas, cond, afs=entry.get("afs", False))
        else:
            fresh = torch.randn((nfe, batch, *bundle.x_shape), generator=g)
            x0 = sample_dmd2(recorder, noise * sigmas[0].item(), sigmas, cond, fresh)
    feeds = [{"x": x.numpy().astype(np.float32), "sigma": sigma.float().numpy(),
              "timestep": bundle.denoiser.net_time(sigma.double()).float().numpy(), **feed_of(cond)}
             for x, sigma in calls]
    return feeds, x0


def feed_of(cond: dict) -> dict:
    """Condition tensors as graph inputs: floats as float32, ids (class labels, the step count) as int64."""
    return {k: v.cpu().numpy().astype(np.float32 if v.is_floating_point() else np.int64) for k, v in cond.items()}


def needs_external_data(weight_bytes: float) -> bool:
    """Whether a graph with this many bytes of weights must keep them outside the protobuf (2 GB limit)."""
    return weight_bytes > EXTERNAL_DATA_BYTES


@contextlib.contextmanager
def constant_attention_scale():
    """Attention's softmax scale as a constant in the graph. Without an explicit `scale`, the exporter computes
    1/sqrt(head_dim) from the query's runtime shape (Shape -> Sqrt); ONNX Runtime puts those shape ops on the CPU,
    so on CUDA every attention block waited for a host-to-device copy, and the copies ruled out CUDA graphs. The
    head dimension is static, so the scale is too."""
    sdpa = F.scaled_dot_product_attention

    def with_scale(query, key, value, *args, scale=None, **kwargs):
        if len(args) > 3:  # attn_mask, dropout_p, is_causal, then scale
            raise TypeError("pass scaled_dot_product_attention's scale by keyword")
        scale = float(query.shape[-1]) ** -0.5 if scale is None else scale
        return sdpa(query, key, value, *args, scale=scale, **kwargs)

    F.scaled_dot_product_attention = with_scale
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def export_graph(model: nn.Module, feed: dict, path: Path) -> None:
    """Trace `model` (with `input_names` / `output_names`, batch first everywhere) on `feed` into `path`; weights
    past EXTERNAL_DATA_BYTES go to one external file, `path.name + ".data"`, beside it."""
    import warnings

    import onnx

    args = tuple(torch.from_numpy(feed[name]) for name in model.input_names)
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # diffusers' shape asserts, all static here
    dynamic = {name: {0: "batch"} for name in [*model.input_names, *model.output_names]}
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    large = needs_external_data(weight_bytes)
    # Past 2 GB the exporter writes one file per tensor: export into a scratch folder, then gather them into one.
    target = path.parent / f"{path.stem}.export" / path.name if large else path
    target.parent.mkdir(exist_ok=True)
    # The TorchScript exporter: diffusers UNets and CLIP trace cleanly through it, it needs no onnxscript, and at
    # opset 17 it decomposes scaled_dot_product_attention into MatMul / Softmax (it does from opset 14 on).
    with constant_attention_scale():
        torch.onnx.export(model, args, str(target), input_names=model.input_names,
                          output_names=model.output_names, dynamic_axes=dynamic, opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)
    if large:
        onnx.save_model(onnx.load(str(target)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
        shutil.rmtree(target.parent)
    onnx.checker.check_model(str(path))  # the path form: the in-memory form refuses models past 2 GB


def module_outputs(model: nn.Module, feeds: list[dict]) -> list[list[np.ndarray]]:
    """PyTorch's outputs of a graph module (`input_names`; one tensor or a tuple out) for each feed."""
    outs = []
    with torch.no_grad():
        for feed in feeds:
            out = model(*(torch.from_numpy(feed[n]) for n in model.input_names))
            outs.append([o.numpy() for o in (out if isinstance(out, tuple) else (out,))])
    return outs


def io_specs(names: list[str], feed: dict) -> list[dict]:
    """Name, dtype and shape (batch first) of graph inputs or outputs, read off one feed."""
    return [{"name": n, "dtype": str(feed[n].dtype), "shape": ["batch", *feed[n].shape[1:]]} for n in names]
