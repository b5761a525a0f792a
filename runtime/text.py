"""What a text-to-image engine needs around its UNet: tokenizers, text encoder(s) and the VAE decoder, run as the
engine manifest's `text` and `vae_decoder` sections describe (written by export/latent.py).

Tokenizing uses the CLIP tokenizers copied into the engine folder through `transformers` (its tokenizer classes
import no torch); the encoders and the decoder run on ONNX Runtime like the UNet.
"""

from pathlib import Path

import numpy as np

from .backends import OnnxRuntimeBackend
from .errors import UserError


class TextParts:
    def __init__(self, engine_dir: Path, manifest: dict, device: str = "cpu", threads: int | None = None):
        try:
            from transformers import CLIPTokenizer
        except ImportError:
            raise UserError("text-to-image engines need the `transformers` package for their tokenizers: "
                            "pip install transformers") from None
        files, text = manifest["files"], manifest["text"]
        self.encoders = []
        for spec in text["encoders"]:
            tokenizer = CLIPTokenizer.from_pretrained(engine_dir / spec["tokenizer"], local_files_only=True)
            session = OnnxRuntimeBackend(engine_dir / files[spec["files"]["fp32"]]["path"], device, threads)
            self.encoders.append((tokenizer, session, spec["max_length"]))
        self.time_ids = np.float32(text["time_ids"]) if "time_ids" in text else None  # SDXL's added condition
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
        """The UNet's condition inputs for `prompts`: encoder_hidden_states [, text_embeds, time_ids (SDXL)]."""
        outs = []
        for tokenizer, session, max_length in self.encoders:
            ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                            return_tensors="np").input_ids.astype(np.int64)
            outs.append(session.run_all({"input_ids": ids}))
        cond = {"encoder_hidden_states": np.concatenate([o["hidden_states"] for o in outs], axis=-1)}
        if self.time_ids is not None:
            cond |= {"text_embeds": outs[-1]["text_embeds"], "time_ids": np.tile(self.time_ids, (len(prompts), 1))}
        return cond

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Images (N, 3, H, W) in [-1, 1] from the loop's final latents."""
        return self.vae.run({"latents": latents.astype(np.float32)})
