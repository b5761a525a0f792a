"""What a text-to-image engine needs around its UNet: tokenizers, text encoder(s) and the VAE decoder, run as the
engine manifest's `text` and `vae_decoder` sections describe (written by export/latent.py).

Tokenizing uses the tokenizers copied into the engine folder (CLIP's, T5's) through `transformers` (its tokenizer
classes import no torch); the encoders and the decoder run on ONNX Runtime like the network. How the encoders'
outputs become the network's condition is the manifest's layout rule (`text.groups`, `width`, `pooled`,
`constants`), the same one distill/teachers/prompts.py applies in PyTorch.
"""

import json
from pathlib import Path

import numpy as np

from .backends import OnnxRuntimeBackend
from .errors import UserError


class TextParts:
    def __init__(self, engine_dir: Path, manifest: dict, device: str = "cpu", threads: int | None = None):
        files, text = manifest["files"], manifest["text"]
        self.encoders = []
        for spec in text["encoders"]:
            tokenizer = load_tokenizer(engine_dir / spec["tokenizer"])
            session = OnnxRuntimeBackend(engine_dir / files[spec["files"]["fp32"]]["path"], device, threads)
            self.encoders.append((tokenizer, session, spec["max_length"]))
        self.layout = text_layout(text)
        vae = manifest["vae_decoder"]
        self.vae = OnnxRuntimeBackend(engine_dir / files[vae["files"]["fp32"]]["path"], device, threads)

    @staticmethod
    def check_prompts(conditions) -> list[str]:
        if isinstance(conditions, str):
            conditions = [conditions]
        if not conditions or not all(isinstance(c, str) for c in conditions):
            raise UserError("this engine is text-to-image: give a list of prompts (strings), not class labels")
        return list(conditions)

    def encode(self, prompts: list[str]) -> dict:
        """The network's condition inputs for `prompts` (encoder_hidden_states, and per family text_embeds +
        time_ids (SDXL) or pooled_projections (SD3)), by the manifest's layout rule."""
        outs = []
        for tokenizer, session, max_length in self.encoders:
            ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                            return_tensors="np").input_ids.astype(np.int64)
            outs.append(session.run_all({"input_ids": ids}))
        return combine(self.layout, outs, len(prompts))

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Images (N, 3, H, W) in [-1, 1] from the loop's final latents."""
        return self.vae.run({"latents": latents.astype(np.float32)})


def load_tokenizer(folder: Path):
    """The tokenizer class its tokenizer_config.json names (CLIPTokenizer, T5TokenizerFast, ...), taken from
    `transformers` by name: its AutoTokenizer would import torch, the tokenizer classes themselves do not."""
    try:
        import transformers
    except ImportError:
        raise UserError("text-to-image engines need the `transformers` package for their tokenizers: "
                        "pip install transformers") from None
    try:
        name = json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"{folder}/tokenizer_config.json is missing or names no tokenizer_class: the engine folder "
                        "is incomplete; export it again") from None
    cls = getattr(transformers, name, None)
    if cls is None:
        raise UserError(f"{folder}: tokenizer class {name!r} is not in this transformers {transformers.__version__}")
    return cls.from_pretrained(folder, local_files_only=True)


def text_layout(text: dict) -> dict:
    """The manifest's rule for putting the encoders' outputs together. Engines written before the rule was stated
    hold SD 1.5 (one encoder) or SDXL (two side by side, the second's text_embeds, constant time_ids)."""
    if "groups" in text:
        return {k: text[k] for k in ("groups", "width", "pooled", "constants")}
    n = len(text["encoders"])
    sdxl = "time_ids" in text
    return {"groups": [list(range(n))], "width": None,
            "pooled": {"name": "text_embeds", "from": [n - 1]} if sdxl else None,
            "constants": {"time_ids": text["time_ids"]} if sdxl else {}}


def combine(layout: dict, outs: list[dict], n: int) -> dict:
    """Each group's encoders side by side on the feature axis (zero-padded to `width`), the groups one after another
    on the token axis; the pooled projections side by side; constant rows repeated per prompt."""
    blocks = []
    for group in layout["groups"]:
        block = np.concatenate([outs[i]["hidden_states"] for i in group], axis=-1)  # (N, L_g, sum of widths)
        width = layout["width"]
        if width is not None and block.shape[-1] < width:
            block = np.pad(block, ((0, 0), (0, 0), (0, width - block.shape[-1])))
        blocks.append(block)
    cond = {"encoder_hidden_states": np.concatenate(blocks, axis=1).astype(np.float32)}
    pooled = layout["pooled"]
    if pooled:
        cond[pooled["name"]] = np.concatenate([outs[i]["text_embeds"] for i in pooled["from"]], axis=-1)
    for name, row in layout["constants"].items():
        cond[name] = np.tile(np.float32(row), (n, 1))
    return cond
