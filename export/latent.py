"""What a latent text-to-image student's engine needs besides its UNet: the teacher's text encoder(s), VAE decoder
and tokenizers (SD 1.5 and SDXL layouts). export/onnx.py exports the UNet and calls in here.

    engine/
      student_fp32.onnx          UNet: (x, sigma, timestep, encoder_hidden_states[, text_embeds, time_ids])
      text_encoder_fp32.onnx     input_ids -> hidden_states
      text_encoder_2_fp32.onnx   SDXL: input_ids -> hidden_states, text_embeds
      vae_decoder_fp32.onnx      latents (the student's x0) -> image in [-1, 1]
      tokenizer/ (tokenizer_2/)  copied from the teacher folder, for a torch-free runtime to tokenize with

What the runtime computes around the graphs (written in the manifest's "text" section): tokenize each prompt with
each tokenizer (padded and truncated to max_length); SD 1.5: encoder_hidden_states = text_encoder's hidden_states
(the last layer, after the final layer norm); SDXL: the two encoders' hidden_states (penultimate layers)
concatenated on the last axis, text_embeds = text_encoder_2's pooled projection, time_ids = the manifest's
constant (H, W, 0, 0, H, W). These are exactly the tensors distill/teachers/latent.py's prompt encoders give the
UNet, and parity is measured against them, not against the wrappers below.

Why torch.onnx.export and not optimum's exporters: optimum-onnx (their home since optimum 2) requires
transformers < 4.58, and this project runs transformers 5; and its CLIP text configs export the last hidden state
and the pooled output (optionally every hidden state), not the one penultimate layer SDXL feeds its UNet.
Three small wrappers traced with the same exporter as the UNet give exactly the adapter's tensors.
"""

import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fewstep.errors import UserError

# Prompts the text encoders are checked on (and the UNet's loop is conditioned on): the empty prompt, short and
# long ones, and one past the 77-token context (truncated).
PARITY_PROMPTS = ["", "a photo of a cat", "an astronaut riding a horse on the moon, oil painting, highly detailed",
                  "a red square on blue noise, " * 12]
# fp32 bound on the VAE decoder's images (in [-1, 1]): 1e-3, an eighth of one 8-bit level, instead of the UNet's 1e-4.
# A full-size SD VAE decoder (random weights, 512x512) already gave 4.6e-5, half the UNet's bound, through ~30 conv
# layers at 512^2 whose activations are far from unit scale in trained VAEs (SDXL's overflow fp16); the images are
# quantized to 8 bits next, so 1e-3 still cannot move a pixel by more than one level.
VAE_TOLERANCE = 1e-3


class TextEncoderGraph(nn.Module):
    """input_ids (N, L) -> hidden states (N, L, D) of the layer the prompt encoder uses [, pooled text_embeds]."""

    input_names = ["input_ids"]

    def __init__(self, encoder, penultimate: bool, pooled: bool):
        super().__init__()
        self.encoder = encoder
        self.penultimate = penultimate
        self.output_names = ["hidden_states", *(["text_embeds"] if pooled else [])]

    def forward(self, input_ids):
        # The pooled output gathers each row's end-of-text position (arange, argmax: never negative, so the exporter's
        # warning about negative indices in advanced indexing does not apply)
        out = self.encoder(input_ids, output_hidden_states=self.penultimate)
        hidden = out.hidden_states[-2] if self.penultimate else out.last_hidden_state
        return (hidden, out.text_embeds) if len(self.output_names) == 2 else hidden


class VAEDecoderGraph(nn.Module):
    """latents (N, C, h, w), as the student makes them -> images (N, 3, H, W) in [-1, 1]: the teacher's own decode
    (latents / scaling_factor + shift, the VAE decoder, clamp)."""

    input_names = ["latents"]
    output_names = ["image"]

    def __init__(self, teacher):
        super().__init__()
        self.vae = teacher.vae  # a submodule, so that its weights are the graph's
        self.decode = teacher.decode

    def forward(self, latents):
        return self.decode(latents)


def text_graphs(teacher) -> list[tuple]:
    """(part, its graph) for each text encoder of the teacher's prompt encoder (distill/teachers/prompts.py)."""
    return [(part, TextEncoderGraph(part.encoder, penultimate=part.layer == "penultimate", pooled=part.pooled).eval())
            for part in teacher.prompt_encoder.parts]


def load_teacher_parts(bundle, teacher_dir: str | Path | None = None):
    """The latent teacher whose text encoders, VAE and tokenizers the engine ships (default: the one the bundle
    names), checked against the student; its own denoiser is released (the export does not need it)."""
    from distill.bundle import MANIFEST_NAME
    from distill.teachers import load_teacher

    m = bundle.manifest
    path = teacher_dir or m["conditioning"].get("teacher") or m.get("teacher")
    if not path or not Path(path).is_dir():
        raise UserError(f"{bundle.source}: its teacher folder {path} (conditioning.teacher in {MANIFEST_NAME}) is not "
                        "there; the engine needs that teacher's text encoders, tokenizers and VAE: pass --teacher "
                        "with the folder's current location")
    teacher = load_teacher(Path(path))
    if teacher.conditioning != "text":
        raise UserError(f"{path} is not a text-to-image teacher; pass the student's own teacher with --teacher")
    backbone = type(teacher.denoiser.net)
    teacher.denoiser = None  # the teacher's network: released before the export's memory peak (10 GB for SDXL)
    student = bundle.denoiser.net
    student = getattr(student, "backbone", student)  # SFD-v: the backbone inside its step-count conditioning
    if type(student) is not backbone or tuple(teacher.x_shape) != tuple(bundle.x_shape):
        raise UserError(f"{path} does not fit the student {bundle.source}: a {backbone.__name__} teacher with latents "
                        f"{tuple(teacher.x_shape)}, a {type(student).__name__} student with {tuple(bundle.x_shape)}; "
                        "pass its own teacher")
    try:
        student.check_context(teacher.prompt_encoder, str(path))
    except UserError as e:
        raise UserError(f"{e}; pass the student's own teacher with --teacher") from None
    return teacher


def check_precisions(precisions) -> None:
    other = [p for p in precisions if p != "fp32"]
    if other:
        raise UserError(f"precision {other[0]} is not yet for latent bundles (their text encoders and VAE are "
                        "exported in fp32 only so far); use --precision fp32")


def loop_condition(teacher, batch: int) -> dict:
    """The UNet's condition for `batch` of the parity prompts, as the student is conditioned at sampling time."""
    with torch.no_grad():
        return teacher.cond(prompts=[PARITY_PROMPTS[i % len(PARITY_PROMPTS)] for i in range(batch)])


def export_parts(teacher, x0: torch.Tensor, out: Path) -> tuple[dict, dict]:
    """Export the text encoder(s) and the VAE decoder into `out` in fp32, each checked against the adapter's own
    tensors, and copy the tokenizers. Returns (files entries, manifest sections)."""
    from .graph import export_graph, io_specs
    from .parity import checked_file

    files, encoders = {}, []
    # the whole prompt set (batch 4) and one prompt (batch 1): the batch axis is dynamic
    prompt_sets = [PARITY_PROMPTS, PARITY_PROMPTS[1:2]]
    for part, graph in text_graphs(teacher):
        t0 = time.perf_counter()
        feeds = [{"input_ids": part.token_ids(prompts).numpy().astype(np.int64)} for prompts in prompt_sets]
        with torch.no_grad():  # the adapter's own tensors for this encoder
            wants = [[t.numpy() for t in part.run(torch.from_numpy(f["input_ids"])) if t is not None] for f in feeds]
        path = out / f"{part.folder}_fp32.onnx"
        export_graph(graph, feeds[0], path)
        # text encoders' hidden states are not unit-scale (residual streams reach tens to hundreds): the fp32 bound
        # is relative to their largest magnitude
        files[f"{part.folder}_fp32"] = checked_file(path, feeds, wants, "fp32", part.folder, time.perf_counter() - t0,
                                                    scaled=True)
        shutil.copytree(Path(teacher.source) / part.tokenizer_dir, out / part.tokenizer_dir)
        encoders.append({"component": part.folder, "files": {"fp32": f"{part.folder}_fp32"},
                         "tokenizer": part.tokenizer_dir, "max_length": part.max_length, "padding": "max_length",
                         "truncation": True, "hidden_states": part.layer,
                         "inputs": io_specs(graph.input_names, feeds[0]),
                         "outputs": io_specs(graph.output_names, dict(zip(graph.output_names, wants[0])))})
    t0 = time.perf_counter()
    vae = VAEDecoderGraph(teacher).eval()
    feeds = [{"latents": x0.float().numpy()}]
    with torch.no_grad():
        wants = [[teacher.decode(x0).numpy()]]
    path = out / "vae_decoder_fp32.onnx"
    export_graph(vae, feeds[0], path)
    files["vae_decoder_fp32"] = checked_file(path, feeds, wants, "fp32", "vae_decoder", time.perf_counter() - t0,
                                               base=VAE_TOLERANCE)

    text = {"encoders": encoders, **teacher.prompt_encoder.layout(),
            "rule": "encoder_hidden_states: the encoders of each group side by side on the last axis (zero-padded on "
                    "the right to width, if set), the groups one after another on the token axis; pooled: the "
                    "listed encoders' text_embeds side by side, under its name; constants: one row per prompt",
            "prompts_checked": PARITY_PROMPTS}
    shift = teacher.latent_shift
    vae_section = {"files": {"fp32": "vae_decoder_fp32"},
                   "graph": "image = clamp(VAE.decode(latents / scale + shift), -1, 1): the student's final x0 in, "
                            "images (N, 3, H, W) in [-1, 1] out",
                   "scale": _json_number(teacher.latent_scale), "shift": _json_number(shift),
                   "inputs": io_specs(vae.input_names, feeds[0]),
                   "outputs": io_specs(vae.output_names, {"image": wants[0][0]})}
    return files, {"text": text, "vae_decoder": vae_section}


def _json_number(value):
    """A float, or a per-channel tensor as a list (VAEs with latents_mean / latents_std)."""
    return value.flatten().tolist() if isinstance(value, torch.Tensor) else float(value)


def guidance(bundle, teacher) -> dict:
    """CFG is distilled into the student: its loop runs the UNet once per step on the prompt's condition."""
    scale = bundle.manifest.get("training", {}).get("guidance_scale")
    return {"unconditional_pass": False, "distilled_scale": teacher.guidance_scale if scale is None else scale,
            "note": "the student samples without classifier-free guidance: one UNet call per step, no empty-prompt "
                    "batch; distilled_scale is the teacher CFG it was trained against"}
