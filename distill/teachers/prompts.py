"""Prompts -> a text-to-image backbone's condition, for every latent family (SD 1.5, SDXL, SD3) by one rule.

A teacher's prompt encoder is a list of text encoders (each with its tokenizer, the hidden layer it gives and
whether its pooled projection is used) and how their outputs are put together:
- `groups`: encoders in one group sit side by side on the feature axis, zero-padded on the right to `width`;
  groups follow one another on the token axis (SD3: [CLIP-L | CLIP-G | 0-pad] then T5's tokens);
- `pooled`: the pooled projections of the listed encoders side by side, under the backbone's name for them
  (SDXL: text_encoder_2's as `text_embeds`; SD3: both CLIPs' as `pooled_projections`);
- `constants`: per-sample rows that do not depend on the prompt (SDXL's size ids, `time_ids`).
The engine manifest writes the same description (`layout()`), and the runtime applies it to the ONNX encoders'
outputs (runtime/text.py), so the rule is stated here once per family, never in the export or the runtime.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from distill.errors import UserError
from distill.teachers.loading import find_weights, load_strict, read_weights


@dataclass
class TextPart:
    """One text encoder of a teacher. `folder` / `tokenizer_dir` are its sub-folders in the teacher's directory."""

    folder: str  # text_encoder, text_encoder_2, text_encoder_3: also the engine file's stem
    tokenizer_dir: str
    tokenizer: object
    encoder: nn.Module
    layer: str  # "last" (the final hidden state, after the final norm) or "penultimate" (before the last layer)
    pooled: bool  # its pooled projection (`text_embeds`) is used
    max_length: int  # prompts are padded and truncated to this many tokens

    def token_ids(self, prompts: list[str], device="cpu") -> torch.Tensor:
        """(N, max_length) ids, padded / truncated as the diffusers pipelines do."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        return ids.input_ids.to(device)

    def run(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states (N, L, D) of `layer`, pooled projection (N, P) or None)."""
        penultimate = self.layer == "penultimate"
        out = self.encoder(input_ids, output_hidden_states=penultimate)
        hidden = out.hidden_states[-2] if penultimate else out.last_hidden_state
        return hidden, (out.text_embeds if self.pooled else None)

    @property
    def width(self) -> int:
        config = self.encoder.config
        return getattr(config, "hidden_size", None) or config.d_model  # CLIP / T5


@dataclass
class PromptEncoder:
    parts: list[TextPart]
    groups: list[list[int]]  # part indices: side by side within a group, groups one after another on tokens
    width: int | None = None  # zero-pad each group's features to this width (SD3); None: no padding
    pooled_name: str | None = None  # the backbone's input for the pooled projections
    constants: dict = field(default_factory=dict)  # name -> one row (a list of floats), repeated per prompt

    def __post_init__(self):
        widths = [sum(self.parts[i].width for i in group) for group in self.groups]
        if self.width is None and len(set(widths)) > 1:
            raise UserError(f"text encoder groups give {widths}-wide features; token-axis groups need one width")
        if self.width is not None and max(widths) > self.width:
            raise UserError(f"text encoders give {max(widths)}-wide features, more than the {self.width} expected")
        self.context_dim = self.width or widths[0]
        self.projection_dim = sum(p.encoder.config.projection_dim for p in self.parts if p.pooled)

    @property
    def modules(self) -> list[nn.Module]:
        return [p.encoder for p in self.parts]

    @property
    def tokenizers(self) -> list:
        return [p.tokenizer for p in self.parts]

    @property
    def text_encoders(self) -> list[nn.Module]:
        return self.modules

    def __call__(self, prompts: list[str]) -> dict:
        outs = [part.run(part.token_ids(prompts, part.encoder.device)) for part in self.parts]
        return combine(self.layout(), [h for h, _ in outs], [p for _, p in outs], len(prompts))

    def layout(self) -> dict:
        """The combination rule as JSON (the engine manifest's `text` section holds it; runtime/text.py reads it)."""
        return {"groups": self.groups, "width": self.width,
                "pooled": {"name": self.pooled_name, "from": [i for i, p in enumerate(self.parts) if p.pooled]}
                if self.pooled_name else None, "constants": self.constants}


def combine(layout: dict, hidden: list, pooled: list, n: int) -> dict:
    """The backbone's condition from each encoder's (hidden states, pooled projection), by the layout's rule."""
    width = layout["width"]
    blocks = []
    for group in layout["groups"]:
        block = torch.cat([hidden[i] for i in group], dim=-1)  # (N, L_g, sum of widths)
        if width is not None and block.shape[-1] < width:
            block = nn.functional.pad(block, (0, width - block.shape[-1]))
        blocks.append(block)
    cond = {"encoder_hidden_states": torch.cat(blocks, dim=-2)}  # (N, sum of L_g, width)
    if layout["pooled"]:
        cond[layout["pooled"]["name"]] = torch.cat([pooled[i] for i in layout["pooled"]["from"]], dim=-1)
    device = cond["encoder_hidden_states"].device
    for name, row in layout["constants"].items():
        cond[name] = torch.tensor([row] * n, dtype=torch.float32, device=device)
    return cond


def load_text_encoder(cls, folder: Path):
    """A transformers text encoder (CLIP, CLIP with projection, T5 encoder) built from folder/config.json, weights
    loaded strictly."""
    from transformers import AutoConfig

    if not (folder / "config.json").exists():
        raise UserError(f"{folder} has no config.json: not a transformers model folder")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        if type(config) is not cls.config_class:  # the CLIP text models read a CLIPTextConfig, T5 a T5Config
            config = cls.config_class.from_pretrained(folder, local_files_only=True)
        model = cls(config)
    except Exception as e:
        raise UserError(f"{folder}/config.json does not describe a {cls.__name__} ({type(e).__name__}: {e})") from None
    load_strict(model, _align_keys(model, read_weights(find_weights(folder))), f"{cls.__name__} from {folder}")
    return model.float().eval()


def _align_keys(model: nn.Module, state: dict) -> dict:
    """Known differences between transformers versions, and nothing else (the load stays strict): real SD / SDXL
    folders say "text_model.embeddings..." where transformers 5's flattened CLIPTextModel says "embeddings..." (its
    own loader strips the prefix too); transformers < 4.31 saved the position_ids buffer, a fixed arange the model
    now rebuilds itself; T5 encoders save their tied input embedding twice (shared.weight, encoder.embed_tokens)."""
    own = set(model.state_dict())
    rebuilt = {f"{name}.{b}" if name else b for name, m in model.named_modules() for b in m._non_persistent_buffers_set}
    prefix = "text_model."

    def rename(k):
        for candidate in (k, prefix + k, k.removeprefix(prefix)):
            if candidate in own or candidate in rebuilt:
                return candidate
        return k  # left for load_strict to name

    state = {rename(k): v for k, v in state.items()}
    tied = "encoder.embed_tokens.weight"
    if tied not in own and tied in state and "shared.weight" in state:
        state.pop(tied)
    if tied in own and tied not in state and "shared.weight" in state:
        state[tied] = state["shared.weight"]
    return {k: v for k, v in state.items() if k not in rebuilt}


def load_tokenizer(folder: Path):
    """The tokenizer saved in `folder` (CLIP's, T5's: whatever its tokenizer_config.json names)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise UserError(f"cannot load a tokenizer from {folder} ({type(e).__name__}: {e})") from None


def clip_max_length(tokenizer, encoder) -> int:
    """CLIP's context: the tokenizer's model_max_length, capped by the encoder's position table (77)."""
    return min(tokenizer.model_max_length, encoder.config.max_position_embeddings)
