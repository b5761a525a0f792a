"""Tiny random SD 1.5 / SDXL / SD3 diffusers folders, built from configs in about a second on CPU.

The layout is the real one (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/,
and for SDXL text_encoder_2/ + tokenizer_2/), so the latent adapter is tested on what users have
on disk. Nothing is downloaded: the tokenizer is a byte-level BPE with no merges, written here.
"""

import json
from pathlib import Path

import torch

VOCAB_SIZE = 2 * 256 + 2  # every byte bare and with "</w>", then <|startoftext|>, <|endoftext|>
BOS_ID, EOS_ID = 512, 513
MAX_LENGTH = 77
IMAGE_SIZE = 16  # unet sample_size 8 * vae scale factor 2


def bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP's byte -> printable character table (byte b is the b-th entry)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def write_tiny_tokenizer(folder: Path) -> None:
    """A CLIPTokenizer over single bytes: ids 0-255 bytes, 256-511 word-final bytes, 512/513 bos/eos."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": BOS_ID, "<|endoftext|>": EOS_ID})
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_LENGTH)
    ids = tokenizer("a photo of a cat").input_ids
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID and len(ids) == len("a photo of a cat") - 4 + 2, ids
    tokenizer.save_pretrained(folder)


def write_tiny_text_encoder(folder: Path, hidden_size: int, projection_dim: int | None = None) -> None:
    """CLIPTextModel (SD 1.5, SDXL's first) or CLIPTextModelWithProjection (SDXL's second)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=37,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_LENGTH,
                            projection_dim=projection_dim or hidden_size, hidden_act="quick_gelu",
                            bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    model = CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)
    model.save_pretrained(folder)  # transformers 5 always writes model.safetensors


def make_tiny_sd_dir(path: Path, xl: bool = False) -> Path:
    """Write a complete random SD 1.5 (or, with xl, SDXL) diffusers folder at path and return it."""
    from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    hidden_1, hidden_2, projection_dim = (16, 16, 8) if xl else (32, None, None)
    cross_attention_dim = hidden_1 + (hidden_2 or 0)
    unet_kwargs = {}
    if xl:  # SDXL: pooled text embedding + 6 size/crop ids, each embedded to addition_time_embed_dim
        unet_kwargs = dict(addition_embed_type="text_time", addition_time_embed_dim=4,
                           projection_class_embeddings_input_dim=6 * 4 + projection_dim, use_linear_projection=True)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=2, cross_attention_dim=cross_attention_dim, **unet_kwargs)
    unet.save_pretrained(path / "unet", safe_serialization=True)

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=IMAGE_SIZE, scaling_factor=0.13025 if xl else 0.18215)
    vae.save_pretrained(path / "vae", safe_serialization=True)

    write_tiny_text_encoder(path / "text_encoder", hidden_1)
    write_tiny_tokenizer(path / "tokenizer")
    if xl:
        write_tiny_text_encoder(path / "text_encoder_2", hidden_2, projection_dim)
        write_tiny_tokenizer(path / "tokenizer_2")

    scheduler_cls = EulerDiscreteScheduler if xl else DDPMScheduler
    scheduler_cls(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="epsilon").save_pretrained(path / "scheduler")

    components = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                  "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                  "scheduler": ["diffusers", scheduler_cls.__name__]}
    if xl:
        components.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                          tokenizer_2=["transformers", "CLIPTokenizer"])
    pipeline = "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"
    (path / "model_index.json").write_text(json.dumps({"_class_name": pipeline, **components}, indent=2))
    return path


def write_tiny_t5(folder: Path, d_model: int) -> None:
    """A T5EncoderModel (SD3's third text encoder) over the tiny byte vocabulary."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=VOCAB_SIZE, d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, pad_token_id=EOS_ID, eos_token_id=EOS_ID)
    T5EncoderModel(config).save_pretrained(folder)


T5_TOKENS = 16  # max_sequence_length of the tiny SD3 (the pipeline's default is 256)


def make_tiny_sd3_dir(path: Path, shift: float = 3.0) -> Path:
    """A complete random SD3 diffusers folder: SD3Transformer2DModel, a VAE with shift_factor, two CLIP text encoders
    with projection, a T5 encoder, tokenizers (the byte-level one for all three: a T5 sentencepiece model cannot be
    written offline; fewstep loads each with AutoTokenizer, as it does T5TokenizerFast in real SD3 folders) and a
    FlowMatchEulerDiscreteScheduler with `shift`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    clip_1, clip_2, t5 = 8, 16, 32  # hidden widths; joint_attention_dim 32 >= 8 + 16 (CLIPs are zero-padded)
    SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=t5,
                          caption_projection_dim=16, pooled_projection_dim=clip_1 + clip_2,
                          pos_embed_max_size=8).save_pretrained(path / "transformer", safe_serialization=True)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=4, sample_size=IMAGE_SIZE, scaling_factor=1.5305,
                  shift_factor=0.0609).save_pretrained(path / "vae", safe_serialization=True)
    write_tiny_text_encoder(path / "text_encoder", clip_1, projection_dim=clip_1)
    write_tiny_text_encoder(path / "text_encoder_2", clip_2, projection_dim=clip_2)
    write_tiny_t5(path / "text_encoder_3", t5)
    for suffix in ("", "_2", "_3"):
        write_tiny_tokenizer(path / f"tokenizer{suffix}")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).save_pretrained(path / "scheduler")
    (path / "fewstep_teacher.json").write_text(json.dumps({"max_sequence_length": T5_TOKENS}))
    components = {"transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
                  "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                  "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                  "text_encoder_3": ["transformers", "T5EncoderModel"],
                  "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                  "tokenizer_3": ["transformers", "CLIPTokenizer"],
                  "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline", **components},
                                                      indent=2))
    return path
