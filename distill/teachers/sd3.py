"""Flow-matching latent transformers: Stable Diffusion 3 diffusers folders (SD3Transformer2DModel + VAE + two CLIP
text encoders + T5, FlowMatchEulerDiscreteScheduler with its shift).

The teacher is a LatentTeacher (latents, VAE, prompts as for SD / SDXL) with three parts of its own:
- the backbone: the transformer as `net(x_t, 1000 t, encoder_hidden_states, pooled_projections) -> velocity`, its
  GAN tap (a middle joint block's image tokens, laid back on the latent grid), its time embedding and LoRA targets;
- the prompt encoder: as StableDiffusion3Pipeline.encode_prompt: both CLIPs' penultimate hidden states side by side,
  zero-padded to the transformer's joint_attention_dim, then T5's last hidden state on the token axis; the two
  pooled projections side by side as pooled_projections;
- the denoiser: FlowDenoiser (x_t = x / (1 + sigma), x0 = x_t - t v), the scheduler's shift on every time.
"""

from pathlib import Path

from distill.errors import UserError
from distill.teachers.backbone import DiffusersBackbone
from distill.teachers.denoiser import FlowDenoiser
from distill.teachers.latent import LatentTeacher, _image_size, _vae_scale_factor
from distill.teachers.loading import load_diffusers_model, read_json
from distill.teachers.prompts import PromptEncoder, TextPart, clip_max_length, load_text_encoder, load_tokenizer
from distill.teachers.schedule import FlowSchedule

DEFAULT_GUIDANCE_SCALE = 7.0  # StableDiffusion3Pipeline's default
MAX_SEQUENCE_LENGTH = 256  # T5 tokens, StableDiffusion3Pipeline's default max_sequence_length
# Attention projections of the image and the text stream (the diffusers SD3 LoRA training script's targets)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class SD3TransformerBackbone(DiffusersBackbone):
    """SD3Transformer2DModel as `net(x, t, encoder_hidden_states, pooled_projections) -> tensor`."""

    network_attr = "transformer"
    folder_name = "transformer"
    time_embedding_name = "time_text_embed"  # timestep embedding + pooled text projection, (N, inner_dim)
    lora_targets = LORA_TARGETS
    cond_names = ("encoder_hidden_states", "pooled_projections")

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer
        # the GAN head reads the middle joint block: DMD2's head sits on the bottleneck; a transformer has none, and
        # its middle carries both layout and detail (the last block has no text stream output)
        self.tap_name = f"transformer_blocks.{transformer.config.num_layers // 2}"
        self.grid = None  # (h, w) tokens of the last forward, to lay the tapped tokens back on the latent grid

    def check_context(self, prompt_encoder, source: str) -> None:
        config = self.transformer.config
        if (prompt_encoder.context_dim, prompt_encoder.projection_dim) != (config.joint_attention_dim,
                                                                           config.pooled_projection_dim):
            raise UserError(f"{source}: the text encoders give {prompt_encoder.context_dim}-wide hidden states and "
                            f"{prompt_encoder.projection_dim}-wide pooled projections, but the transformer takes "
                            f"{config.joint_attention_dim} and {config.pooled_projection_dim}")

    def tap_features(self, output):
        """The joint block's image tokens (N, h * w, D) -> (N, D, h, w) (the block returns (text, image) streams)."""
        tokens = output[1] if isinstance(output, tuple) else output
        n, length, width = tokens.shape
        h, w = self.grid
        return tokens.transpose(1, 2).reshape(n, width, h, w)

    def forward(self, x, t, encoder_hidden_states, pooled_projections):
        p = self.transformer.config.patch_size
        self.grid = (x.shape[-2] // p, x.shape[-1] // p)
        return self.transformer(hidden_states=x, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, timestep=t).sample


def sd3_prompt_encoder(folder: Path, joint_attention_dim: int, max_sequence_length: int) -> PromptEncoder:
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    parts = []
    for suffix in ("", "_2"):
        tokenizer = load_tokenizer(folder / f"tokenizer{suffix}")
        encoder = load_text_encoder(CLIPTextModelWithProjection, folder / f"text_encoder{suffix}")
        parts.append(TextPart(f"text_encoder{suffix}", f"tokenizer{suffix}", tokenizer, encoder, "penultimate", True,
                              clip_max_length(tokenizer, encoder)))
    parts.append(TextPart("text_encoder_3", "tokenizer_3", load_tokenizer(folder / "tokenizer_3"),
                          load_text_encoder(T5EncoderModel, folder / "text_encoder_3"), "last", False,
                          max_sequence_length))
    return PromptEncoder(parts, groups=[[0, 1], [2]], width=joint_attention_dim, pooled_name="pooled_projections")


def load_sd3_teacher(path: Path) -> LatentTeacher:
    """An SD3 pipeline folder: transformer/, vae/, text_encoder{,_2,_3}/ + tokenizer{,_2,_3}/, scheduler/
    (+ fewstep_teacher.json: image_size, guidance_scale, max_sequence_length)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    path = Path(path)
    parts = ["transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
             "tokenizer_3", "scheduler"]
    missing = [f"{p}/" for p in parts if not (path / p).is_dir()]
    if missing:
        raise UserError(f"{path} is missing {', '.join(missing)}: an SD3 teacher folder needs {', '.join(parts)} "
                        "(the T5 encoder too: fewstep distils with the text condition the transformer was trained on)")
    scheduler_config = read_json(path / "scheduler" / "scheduler_config.json") \
        if (path / "scheduler" / "scheduler_config.json").exists() else {}
    if not scheduler_config.get("_class_name", "").startswith("FlowMatch"):
        raise UserError(f"{path}: an SD3 transformer samples with a flow-matching scheduler; scheduler/ holds "
                        f"{scheduler_config.get('_class_name', 'no scheduler_config.json')}")
    meta = read_json(path / "fewstep_teacher.json") if (path / "fewstep_teacher.json").exists() else {}
    meta.setdefault("guidance_scale", DEFAULT_GUIDANCE_SCALE)

    transformer = load_diffusers_model(SD3Transformer2DModel, path / "transformer")
    vae = load_diffusers_model(AutoencoderKL, path / "vae")
    image_size = _image_size(meta.get("image_size"), transformer.config.sample_size, _vae_scale_factor(vae), str(path))
    prompt_encoder = sd3_prompt_encoder(path, transformer.config.joint_attention_dim,
                                        int(meta.get("max_sequence_length", MAX_SEQUENCE_LENGTH)))
    backbone = SD3TransformerBackbone(transformer)
    schedule = FlowSchedule.from_scheduler_config(scheduler_config)
    # the transformer takes 1000 t: the pipeline passes the scheduler's timesteps, sigmas x num_train_timesteps
    denoiser = FlowDenoiser(backbone, schedule, "flow", time_scale=schedule.num_train_timesteps)
    return LatentTeacher(backbone, vae, prompt_encoder, scheduler_config, image_size, meta, source=str(path),
                         denoiser=denoiser)
