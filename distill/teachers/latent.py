"""Latent text-to-image teachers: SD 1.5 / SDXL diffusers folders (UNet2DConditionModel + VAE + CLIP).

The denoiser works on VAE latents already multiplied by the VAE's scaling factor (what the UNet was
trained on); `decode` / `encode` convert between those latents and images in [-1, 1]. The SD 1.5 and
SDXL differences (one or two text encoders, SDXL's pooled embedding and size ids) live in the backbone
and prompt encoders below (prompts.py states the rule that puts text encoders together); SD3's flow-matching
transformer is the same teacher with another backbone, prompt encoder and denoiser (sd3.py).
"""

from pathlib import Path

import torch
from torch import nn

from distill.errors import UserError
from distill.teachers.backbone import DiffusersBackbone
from distill.teachers.base import Teacher
from distill.teachers.denoiser import VPDenoiser
from distill.teachers.loading import load_diffusers_model, read_json
from distill.teachers.pixel import LORA_TARGETS
from distill.teachers.prompts import PromptEncoder, TextPart, clip_max_length, load_text_encoder, load_tokenizer
from distill.teachers.schedule import VPSchedule

DEFAULT_GUIDANCE_SCALE = 7.5  # the diffusers SD / SDXL pipelines' default


class SDUNetBackbone(DiffusersBackbone):
    """SD 1.5 UNet2DConditionModel as `net(x, t, encoder_hidden_states) -> tensor` (flat tensors, ONNX-ready)."""

    lora_targets = LORA_TARGETS
    cond_names = ("encoder_hidden_states",)  # the condition inputs, in the exported graph's order

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

    cond_names = ("encoder_hidden_states", "text_embeds", "time_ids")

    def forward(self, x, t, encoder_hidden_states, text_embeds, time_ids):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added).sample


def sd_prompt_encoder(folder: Path) -> PromptEncoder:
    """SD 1.5: the CLIP text encoder's last hidden state (after its final layer norm)."""
    from transformers import CLIPTextModel

    tokenizer, encoder = load_tokenizer(folder / "tokenizer"), load_text_encoder(CLIPTextModel, folder / "text_encoder")
    part = TextPart("text_encoder", "tokenizer", tokenizer, encoder, "last", False, clip_max_length(tokenizer, encoder))
    return PromptEncoder([part], groups=[[0]])


def sdxl_prompt_encoder(folder: Path, image_size: tuple[int, int]) -> PromptEncoder:
    """SDXL: both encoders' penultimate hidden states side by side, the second's pooled projection as text_embeds,
    and the size / crop ids as time_ids (StableDiffusionXLPipeline.encode_prompt and _get_add_time_ids)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    parts = []
    for suffix, cls, pooled in (("", CLIPTextModel, False), ("_2", CLIPTextModelWithProjection, True)):
        tokenizer = load_tokenizer(folder / f"tokenizer{suffix}")
        encoder = load_text_encoder(cls, folder / f"text_encoder{suffix}")
        parts.append(TextPart(f"text_encoder{suffix}", f"tokenizer{suffix}", tokenizer, encoder, "penultimate",
                              pooled, clip_max_length(tokenizer, encoder)))
    # (original_h, original_w, crop_top, crop_left, target_h, target_w): an uncropped image at the output size
    size_ids = [float(v) for v in (*image_size, 0, 0, *image_size)]
    return PromptEncoder(parts, groups=[[0, 1]], pooled_name="text_embeds", constants={"time_ids": size_ids})


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
        net = self.denoiser.net
        return {"kind": "text", "teacher": self.source, "sdxl": isinstance(net, SDXLUNetBackbone),
                "backbone": type(net).__name__, "inputs": list(net.cond_names)}

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


def load_latent_teacher(path: Path) -> LatentTeacher:
    """An SD 1.5 / SDXL pipeline folder: unet/, vae/, text_encoder/ + tokenizer/ (SDXL: text_encoder_2/ +
    tokenizer_2/), scheduler/ (+ model_index.json, fewstep_teacher.json). SDXL is told by the UNet's
    "text_time" added embedding or by text_encoder_2/ being there."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

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
        raise UserError(f"{path}: a UNet with a flow-matching scheduler ({scheduler_config['_class_name']}) is not "
                        "supported; flow-matching teachers load as SD3 transformers (transformer/) or factory networks")

    meta = read_json(path / "fewstep_teacher.json") if (path / "fewstep_teacher.json").exists() else {}
    index = read_json(path / "model_index.json") if (path / "model_index.json").exists() else {}
    meta.setdefault("force_zeros_for_empty_prompt", index.get("force_zeros_for_empty_prompt", False))

    unet = load_diffusers_model(UNet2DConditionModel, path / "unet")
    vae = load_diffusers_model(AutoencoderKL, path / "vae")
    image_size = _image_size(meta.get("image_size"), unet.config.sample_size, _vae_scale_factor(vae), str(path))
    if xl:
        prompt_encoder = sdxl_prompt_encoder(path, image_size)
        expected = 6 * unet.config.addition_time_embed_dim + prompt_encoder.projection_dim
        takes = unet.config.projection_class_embeddings_input_dim
        if takes != expected:
            raise UserError(f"{path}: the UNet's added embedding takes {takes} inputs, but 6 size ids and "
                            f"text_encoder_2's projection give {expected} "
                            "(an SDXL refiner or another variant is not supported)")
        backbone = SDXLUNetBackbone(unet)
    else:
        prompt_encoder = sd_prompt_encoder(path)
        backbone = SDUNetBackbone(unet)
    return LatentTeacher(backbone, vae, prompt_encoder, scheduler_config, image_size, meta, source=str(path))
