"""Latent text-to-image teachers: SD 1.5 / SDXL diffusers folders (UNet2DConditionModel + VAE + CLIP).

The denoiser works on VAE latents already multiplied by the VAE's scaling factor (what the UNet was
trained on); `decode` / `encode` convert between those latents and images in [-1, 1]. The SD 1.5 and
SDXL differences (one or two text encoders, SDXL's pooled embedding and size ids) live in the backbone
and prompt-encoder pairs below; the teacher itself has no SDXL branches.
"""

from pathlib import Path

import torch
from torch import nn

from ..denoiser import VPDenoiser
from ..errors import UserError
from ..schedule import VPSchedule
from .backbone import DiffusersBackbone
from .base import Teacher
from .loading import find_weights, load_diffusers_model, load_strict, read_json, read_weights
from .pixel import LORA_TARGETS

DEFAULT_GUIDANCE_SCALE = 7.5  # the diffusers SD / SDXL pipelines' default


class SDUNetBackbone(DiffusersBackbone):
    """SD 1.5 UNet2DConditionModel as `net(x, t, encoder_hidden_states) -> tensor` (flat tensors, ONNX-ready)."""

    lora_targets = LORA_TARGETS

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def check_context(self, prompt_encoder, source: str) -> None:
        if prompt_encoder.context_dim != self.unet.config.cross_attention_dim:
            raise UserError(f"{source}: the text encoders give {prompt_encoder.context_dim}-dim embeddings but the "
                            f"UNet's cross_attention_dim is {self.unet.config.cross_attention_dim}")

    def forward(self, x, t, encoder_hidden_states):
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states).sample


class SDXLUNetBackbone(SDUNetBackbone):
    """SDXL UNet2DConditionModel as `net(x, t, encoder_hidden_states, text_embeds, time_ids) -> tensor`."""

    def forward(self, x, t, encoder_hidden_states, text_embeds, time_ids):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added).sample


def _token_ids(tokenizer, text_encoder, prompts: list[str], device) -> torch.Tensor:
    """Prompts -> (N, L) ids padded / truncated to the text encoder's context (77 for CLIP)."""
    length = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return ids.input_ids.to(device)


class SDPromptEncoder:
    """SD 1.5: the CLIP text encoder's last hidden state (after its final layer norm)."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.modules = [text_encoder]
        self.context_dim = text_encoder.config.hidden_size

    def __call__(self, prompts: list[str]) -> dict:
        device = self.text_encoder.device
        out = self.text_encoder(_token_ids(self.tokenizer, self.text_encoder, prompts, device))
        return {"encoder_hidden_states": out.last_hidden_state}  # (N, L, D)


class SDXLPromptEncoder:
    """SDXL: both encoders' penultimate hidden states side by side, the second's pooled projection,
    and the size / crop ids (as StableDiffusionXLPipeline.encode_prompt and _get_add_time_ids do)."""

    def __init__(self, tokenizers, text_encoders, image_size: tuple[int, int]):
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.modules = list(text_encoders)
        self.context_dim = sum(e.config.hidden_size for e in text_encoders)
        self.projection_dim = text_encoders[-1].config.projection_dim
        # (original_h, original_w, crop_top, crop_left, target_h, target_w): an uncropped image at the output size
        self.size_ids = (*image_size, 0, 0, *image_size)

    def __call__(self, prompts: list[str]) -> dict:
        hidden = []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            out = encoder(_token_ids(tokenizer, encoder, prompts, encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # (N, L, D_i), before the last layer and final norm
        time_ids = torch.tensor([self.size_ids] * len(prompts), dtype=torch.float32, device=out.text_embeds.device)
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1),  # (N, L, D_1 + D_2)
                "text_embeds": out.text_embeds,  # (N, projection_dim): text_encoder_2's pooled projection
                "time_ids": time_ids}  # (N, 6)


class LatentTeacher(Teacher):
    family = "latent"

    def __init__(self, backbone: nn.Module, vae, prompt_encoder, scheduler_config: dict,
                 image_size: tuple[int, int], meta: dict | None = None, source: str = "", denoiser=None):
        """`denoiser`: the wrapper around `backbone` (default: a VP one from the scheduler config, SD / SDXL)."""
        meta = meta or {}
        if denoiser is None:
            prediction_type = scheduler_config.get("prediction_type", "epsilon")
            denoiser = VPDenoiser(backbone, VPSchedule.from_scheduler_config(scheduler_config), prediction_type)
        self.denoiser = denoiser
        self.vae = vae
        self.prompt_encoder = prompt_encoder
        self.vae_scale_factor = _vae_scale_factor(vae)
        self.image_size = tuple(image_size)  # (H, W) pixels; the latents are 1 / vae_scale_factor of that
        in_channels = backbone.network.config.in_channels
        self.x_shape = (in_channels, *(s // self.vae_scale_factor for s in self.image_size))
        if in_channels != vae.config.latent_channels:
            raise UserError(f"{source}: the {type(backbone.network).__name__} takes {in_channels} channels but the "
                            f"VAE makes {vae.config.latent_channels}-channel latents")
        backbone.check_context(prompt_encoder, source)
        # Latent <-> VAE space: z = (mean - shift) * scale. SD / SDXL: shift 0, scale = scaling_factor;
        # VAEs with shift_factor (SD3-style) or per-channel latents_mean / latents_std follow the diffusers pipelines.
        shift = vae.config.get("shift_factor") or 0.0
        scale = vae.config.scaling_factor
        if vae.config.get("latents_mean") is not None and vae.config.get("latents_std") is not None:
            shift = torch.tensor(vae.config.latents_mean, dtype=torch.float32).reshape(1, -1, 1, 1)
            scale = scale / torch.tensor(vae.config.latents_std, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.latent_shift, self.latent_scale = shift, scale
        # SDXL-base sets this in model_index.json: its pipeline then uses zeros (not the "" encoding) as the null text
        self.zero_uncond = bool(meta.get("force_zeros_for_empty_prompt", False))
        self.guidance_scale = float(meta.get("guidance_scale", DEFAULT_GUIDANCE_SCALE))
        self.scheduler_config = dict(scheduler_config)
        self.source = source
        self._empty = None  # the "" prompt's encoding, computed once

        for module in (vae, *prompt_encoder.modules):
            module.eval().requires_grad_(False)

    @property
    def conditioning(self) -> str:
        return "text"

    def conditioning_entry(self) -> dict:
        return {"kind": "text", "teacher": self.source, "sdxl": isinstance(self.denoiser.net, SDXLUNetBackbone),
                "encoder": type(self.prompt_encoder).__name__}

    def cond(self, labels=None, prompts=None) -> dict:
        if labels is not None:
            raise UserError("this teacher is text-conditional: give prompts, not class labels")
        if prompts is None:
            raise UserError("this teacher is text-conditional: give a list of prompts")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise UserError("the prompt list is empty")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise UserError(f"prompts must be strings, got {type(bad[0]).__name__} {bad[0]!r}")
        return self.prompt_encoder(prompts)

    def uncond(self, n: int) -> dict:
        if self._empty is None:
            empty = self.prompt_encoder([""])
            if self.zero_uncond:  # the size ids stay: the pipeline passes the same ones with the null text
                empty = {k: v if k == "time_ids" else torch.zeros_like(v) for k, v in empty.items()}
            self._empty = empty
        return {k: v.repeat(n, *([1] * (v.ndim - 1))) for k, v in self._empty.items()}

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Clean latents (sigma = 0) -> images in [-1, 1], (N, 3, H, W)."""
        x = x.to(self.vae.dtype)
        return self.vae.decode(x / self._on(self.latent_scale, x) + self._on(self.latent_shift, x)).sample.clamp(-1, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> latents. The posterior mean, not a sample (diffusers' training scripts sample):
        the same image always gives the same latent, so data and tests are reproducible, and the SD VAEs'
        posterior is narrow, so a sample would differ little from its mean."""
        mean = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean
        return (mean - self._on(self.latent_shift, mean)) * self._on(self.latent_scale, mean)

    @staticmethod
    def _on(value, x):
        return value.to(x.device, x.dtype) if isinstance(value, torch.Tensor) else value

    def to(self, device) -> "LatentTeacher":
        self.denoiser.to(device)
        self.vae.to(device)
        for module in self.prompt_encoder.modules:
            module.to(device)
        self._empty = None
        return self

    def describe(self) -> str:
        kind = type(self.denoiser.net.network).__name__
        return f"{super().describe()} ({kind}, images {self.image_size[0]}x{self.image_size[1]})"


def _vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)  # each encoder block but the last halves H and W


def _image_size(size, sample_size, factor: int, source: str) -> tuple[int, int]:
    """(H, W) in pixels: metadata's image_size, else the UNet's sample_size times the VAE's factor."""
    if size is None:
        size = sample_size * factor if isinstance(sample_size, int) else [s * factor for s in sample_size]
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) != 2 or any(s % factor for s in size):
        raise UserError(f"{source}: image size {size} must be (H, W), each a multiple of the VAE factor {factor}")
    return size


def load_text_encoder(cls, folder: Path):
    """A transformers CLIP text encoder built from folder/config.json, weights loaded strictly."""
    from transformers import CLIPTextConfig

    if not (folder / "config.json").exists():
        raise UserError(f"{folder} has no config.json: not a transformers model folder")
    try:
        model = cls(CLIPTextConfig.from_pretrained(folder, local_files_only=True))
    except Exception as e:
        raise UserError(f"{folder}/config.json does not describe a {cls.__name__} ({type(e).__name__}: {e})") from None
    load_strict(model, _align_clip_keys(model, read_weights(find_weights(folder))), f"{cls.__name__} from {folder}")
    return model.float().eval()


def _align_clip_keys(model: nn.Module, state: dict) -> dict:
    """Two known differences between transformers versions, and nothing else (the load stays strict):
    real SD / SDXL folders say "text_model.embeddings..." where transformers 5's flattened CLIPTextModel
    says "embeddings..." (its own loader strips the prefix too), and transformers < 4.31 saved the
    position_ids buffer, a fixed arange the model now rebuilds itself."""
    own = set(model.state_dict())
    rebuilt = {f"{name}.{b}" if name else b for name, m in model.named_modules() for b in m._non_persistent_buffers_set}
    prefix = "text_model."

    def rename(k):
        for candidate in (k, prefix + k, k.removeprefix(prefix)):
            if candidate in own or candidate in rebuilt:
                return candidate
        return k  # left for load_strict to name

    state = {rename(k): v for k, v in state.items()}
    return {k: v for k, v in state.items() if k not in rebuilt}


def load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise UserError(f"cannot load a CLIPTokenizer from {folder} ({type(e).__name__}: {e})") from None


def load_latent_teacher(path: Path) -> LatentTeacher:
    """An SD 1.5 / SDXL pipeline folder: unet/, vae/, text_encoder/ + tokenizer/ (SDXL: text_encoder_2/ +
    tokenizer_2/), scheduler/ (+ model_index.json, fewstep_teacher.json). SDXL is told by the UNet's
    "text_time" added embedding or by text_encoder_2/ being there."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"teacher folder {path} does not exist")
    unet_config = read_json(path / "unet" / "config.json") if (path / "unet" / "config.json").exists() else {}
    xl_unet = unet_config.get("addition_embed_type") == "text_time"
    xl = xl_unet or (path / "text_encoder_2").is_dir()
    parts = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    parts += ["text_encoder_2", "tokenizer_2"] if xl else []
    missing = [f"{p}/" for p in parts if not (path / p).is_dir()]
    if missing:
        layout = "an SDXL" if xl else "an SD"
        raise UserError(f"{path} is missing {', '.join(missing)}: {layout} teacher folder needs {', '.join(parts)}")
    if not xl_unet and xl:
        raise UserError(f"{path} has text_encoder_2/ but its UNet has no SDXL (text_time) added embedding")
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    if not scheduler_file.exists():
        raise UserError(f"{path} has no scheduler/scheduler_config.json: the noise schedule is needed")
    scheduler_config = read_json(scheduler_file)
    if "FlowMatch" in scheduler_config.get("_class_name", ""):
        raise UserError(f"{path}: flow-matching teachers ({scheduler_config['_class_name']}) are not supported")

    meta = read_json(path / "fewstep_teacher.json") if (path / "fewstep_teacher.json").exists() else {}
    index = read_json(path / "model_index.json") if (path / "model_index.json").exists() else {}
    meta.setdefault("force_zeros_for_empty_prompt", index.get("force_zeros_for_empty_prompt", False))

    unet = load_diffusers_model(UNet2DConditionModel, path / "unet")
    vae = load_diffusers_model(AutoencoderKL, path / "vae")
    image_size = _image_size(meta.get("image_size"), unet.config.sample_size, _vae_scale_factor(vae), str(path))
    if xl:
        encoders = [load_text_encoder(CLIPTextModel, path / "text_encoder"),
                    load_text_encoder(CLIPTextModelWithProjection, path / "text_encoder_2")]
        prompt_encoder = SDXLPromptEncoder([load_tokenizer(path / "tokenizer"), load_tokenizer(path / "tokenizer_2")],
                                           encoders, image_size)
        expected = 6 * unet.config.addition_time_embed_dim + prompt_encoder.projection_dim
        takes = unet.config.projection_class_embeddings_input_dim
        if takes != expected:
            raise UserError(f"{path}: the UNet's added embedding takes {takes} inputs, but 6 size ids and "
                            f"text_encoder_2's projection give {expected} "
                            "(an SDXL refiner or another variant is not supported)")
        backbone = SDXLUNetBackbone(unet)
    else:
        prompt_encoder = SDPromptEncoder(load_tokenizer(path / "tokenizer"),
                                         load_text_encoder(CLIPTextModel, path / "text_encoder"))
        backbone = SDUNetBackbone(unet)
    return LatentTeacher(backbone, vae, prompt_encoder, scheduler_config, image_size, meta, source=str(path))
