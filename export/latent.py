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
constant (H, W, 0, 0, H, W). These are exactly the tensors distill/adapters/latent.py's prompt encoders give the
UNet, and parity is measured against them, not against the wrappers below.

Why torch.onnx.export and not optimum's exporters: optimum-onnx (their home since optimum 2) requires
transformers < 4.58, and this project runs transformers 5; and its CLIP text configs export the last hidden state
and the pooled output (optionally every hidden state), not the one penultimate layer SDXL feeds its UNet.
Three small wrappers traced with the same exporter as the UNet give exactly the adapter's tensors.
"""

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distill.errors import UserError

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


@dataclass
class TextPart:
    """One text encoder of the teacher and where its output goes in the UNet's condition."""

    name: str  # text_encoder / text_encoder_2: the teacher's folder, the engine file's stem
    tokenizer_dir: str  # tokenizer / tokenizer_2
    tokenizer: object
    graph: TextEncoderGraph
    hidden: slice  # its columns of encoder_hidden_states
    layer: str  # which hidden state, in words


def text_parts(teacher) -> list[TextPart]:
    """The teacher's text encoders as the adapter's prompt encoder uses them (SDPromptEncoder / SDXLPromptEncoder)."""
    from distill.adapters.latent import SDXLPromptEncoder

    encoder = teacher.prompt_encoder
    if not isinstance(encoder, SDXLPromptEncoder):
        return [TextPart("text_encoder", "tokenizer", encoder.tokenizer,
                         TextEncoderGraph(encoder.text_encoder, penultimate=False, pooled=False).eval(),
                         slice(0, encoder.context_dim), "last (after the final layer norm)")]
    parts, start = [], 0
    for i, (tokenizer, text_encoder) in enumerate(zip(encoder.tokenizers, encoder.text_encoders)):
        suffix = f"_{i + 1}" if i else ""
        width = text_encoder.config.hidden_size
        last = i == len(encoder.text_encoders) - 1  # the second encoder's pooled projection is text_embeds
        parts.append(TextPart(f"text_encoder{suffix}", f"tokenizer{suffix}", tokenizer,
                              TextEncoderGraph(text_encoder, penultimate=True, pooled=last).eval(),
                              slice(start, start + width), "penultimate (before the last layer and final norm)"))
        start += width
    return parts


def load_teacher_parts(bundle, teacher_dir: str | Path | None = None):
    """The latent teacher whose text encoders, VAE and tokenizers the engine ships (default: the one the bundle
    names), checked against the student; its own UNet is released (the export does not need it)."""
    from distill.adapters.latent import load_latent_teacher
    from distill.bundle import MANIFEST_NAME

    m = bundle.manifest
    path = teacher_dir or m["conditioning"].get("teacher") or m.get("teacher")
    if not path or not Path(path).is_dir():
        raise UserError(f"{bundle.source}: its teacher folder {path} (conditioning.teacher in {MANIFEST_NAME}) is not "
                        "there; the engine needs that teacher's text encoders, tokenizers and VAE: pass --teacher "
                        "with the folder's current location")
    teacher = load_latent_teacher(Path(path))
    teacher.denoiser = None  # the teacher's UNet: released before the export's memory peak (10 GB for SDXL)
    student = bundle.denoiser.net.unet.config
    xl = m["conditioning"].get("sdxl", False)
    if (tuple(teacher.x_shape) != tuple(bundle.x_shape) or teacher.prompt_encoder.context_dim !=
            student.cross_attention_dim or (len(teacher.prompt_encoder.modules) == 2) != xl):
        raise UserError(f"{path} does not fit the student {bundle.source}: latents {tuple(teacher.x_shape)} vs "
                        f"{tuple(bundle.x_shape)}, text width {teacher.prompt_encoder.context_dim} vs "
                        f"{student.cross_attention_dim}, {'SDXL' if xl else 'SD 1.5'} student; pass its own teacher")
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


def token_ids(part: TextPart, prompts: list[str]) -> np.ndarray:
    """(N, L) int64 ids, tokenized as the adapter does (padded / truncated to the encoder's context)."""
    from distill.adapters.latent import _token_ids

    return _token_ids(part.tokenizer, part.graph.encoder, prompts, "cpu").numpy().astype(np.int64)


def max_length(part: TextPart) -> int:
    return int(token_ids(part, [""]).shape[1])


def export_parts(teacher, x0: torch.Tensor, out: Path) -> tuple[dict, dict]:
    """Export the text encoder(s) and the VAE decoder into `out` in fp32, each checked against the adapter's own
    tensors, and copy the tokenizers. Returns (files entries, manifest sections)."""
    from .onnx import checked_file, export_graph, io_specs

    files, encoders = {}, []
    # the whole prompt set (batch 4) and one prompt (batch 1): the batch axis is dynamic
    prompt_sets = [PARITY_PROMPTS, PARITY_PROMPTS[1:2]]
    with torch.no_grad():
        conds = [teacher.cond(prompts=prompts) for prompts in prompt_sets]
    for part in text_parts(teacher):
        t0 = time.perf_counter()
        feeds = [{"input_ids": token_ids(part, prompts)} for prompts in prompt_sets]
        wants = [[c["encoder_hidden_states"][..., part.hidden].numpy(), *([c["text_embeds"].numpy()]
                  if "text_embeds" in part.graph.output_names else [])] for c in conds]
        path = out / f"{part.name}_fp32.onnx"
        export_graph(part.graph, feeds[0], path)
        # CLIP's hidden states are not unit-scale (residual streams reach tens to hundreds): the fp32 bound is
        # relative to their largest magnitude
        files[f"{part.name}_fp32"] = checked_file(path, feeds, wants, "fp32", part.name, time.perf_counter() - t0,
                                                  scaled=True)
        shutil.copytree(Path(teacher.source) / part.tokenizer_dir, out / part.tokenizer_dir)
        encoders.append({"component": part.name, "files": {"fp32": f"{part.name}_fp32"},
                         "tokenizer": part.tokenizer_dir, "max_length": max_length(part), "padding": "max_length",
                         "truncation": True, "hidden_states": part.layer,
                         "encoder_hidden_states_columns": [part.hidden.start, part.hidden.stop],
                         "inputs": io_specs(part.graph.input_names, feeds[0]),
                         "outputs": io_specs(part.graph.output_names, dict(zip(part.graph.output_names, wants[0])))})

    t0 = time.perf_counter()
    vae = VAEDecoderGraph(teacher).eval()
    feeds = [{"latents": x0.float().numpy()}]
    with torch.no_grad():
        wants = [[teacher.decode(x0).numpy()]]
    path = out / "vae_decoder_fp32.onnx"
    export_graph(vae, feeds[0], path)
    files["vae_decoder_fp32"] = checked_file(path, feeds, wants, "fp32", "vae_decoder", time.perf_counter() - t0,
                                               base=VAE_TOLERANCE)

    text = {"encoders": encoders,
            "encoder_hidden_states": "the encoders' hidden_states concatenated on the last axis, in this order",
            "prompts_checked": PARITY_PROMPTS}
    if len(encoders) == 2:
        text |= {"text_embeds": f"{encoders[-1]['component']}'s text_embeds (its pooled projection)",
                 "time_ids": list(teacher.prompt_encoder.size_ids)}
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
