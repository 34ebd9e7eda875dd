"""The models the step benchmark trains and encodes with, and its batches: a tiny SD1.5, SD3 or
FLUX.1 pipeline, or one of Stable Diffusion 1.5's published sizes with random weights."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Callable

import torch

from fastpref.train.families import FAMILIES
from fastpref.train.models import ModelSource

SD15 = FAMILIES["sd15"]

MODELS = {
    "tiny": dict(resolution=64, batch=4, dtype="fp32"),
    "sd15-random": dict(resolution=512, batch=8, dtype="bf16"),
    # fastpref.testing.tiny_model's flow-matching pipelines (CPU): the family's own defaults
    # (SD3: logit-normal sigmas, preconditioned outputs, 77 T5 tokens; FLUX.1 dev: guidance 3.5, 512 T5 tokens)
    "tiny-sd3": dict(resolution=64, batch=4, dtype="fp32"),
    "tiny-flux": dict(resolution=64, batch=4, dtype="fp32"),
}

# Stable Diffusion 1.5's published component configs (runwayml/stable-diffusion-v1-5: unet/, vae/,
# text_encoder/ config.json), written out so that nothing is downloaded; weights are random.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    act_fn="silu",
    center_input_sample=False,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_TEXT = dict(  # CLIP ViT-L/14's text tower
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
)
CAPTIONS = (
    "a red circle on a blue background",
    "a photo of a small green triangle with a yellow stripe",
    "a painting of a large purple diamond in the dark",
    "a drawing of a white cross on an orange background",
    "a bright cyan ring next to a pink dot",
)


@dataclasses.dataclass
class Components:
    """What the benchmark trains and encodes with: ``new_unet()`` makes a fresh policy denoiser
    (a UNet, or a flow family's transformer) of model ``family``."""

    new_unet: Callable[[], object]
    noise_scheduler: object
    vae: object
    tokenizers: list
    text_encoders: list
    description: str
    family: object = SD15


def build_components(
    model: str, device: torch.device, weight_dtype: torch.dtype, workdir: Path, seed: int
) -> Components:
    """The models of ``model``: ``tiny`` (default, :func:`tiny_components`) or ``sd15-random``
    (:func:`sd15_random_components`)."""
    builders = {
        "tiny": tiny_components,
        "sd15-random": sd15_random_components,
        "tiny-sd3": functools.partial(tiny_flow_components, "sd3"),
        "tiny-flux": functools.partial(tiny_flow_components, "flux"),
    }
    if model not in builders:
        raise ValueError(f"model must be one of {tuple(MODELS)}, got {model!r}")
    return builders[model](device, weight_dtype, workdir, seed)


def tiny_components(device: torch.device, weight_dtype: torch.dtype, workdir: Path, seed: int) -> Components:
    """``fastpref.testing.tiny_model``'s SD1.5 pipeline written to ``workdir`` (64 px, 4 pairs,
    fp32 by default)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from fastpref.testing.tiny_model import make_tiny_model

    path = make_tiny_model(workdir / "tiny-sd15", arch="sd15", seed=seed)
    vae, tokenizers, text_encoders = SD15.load_encoders(ModelSource(str(path)), dtype=weight_dtype, device=device)
    scheduler = DDPMScheduler.from_pretrained(str(path), subfolder="scheduler")  # as fastpref train

    def new_unet():
        return UNet2DConditionModel.from_pretrained(str(path), subfolder="unet")

    return Components(
        new_unet,
        scheduler,
        vae,
        tokenizers,
        text_encoders,
        "fastpref.testing.tiny_model SD1.5 (random weights, tiny widths)",
    )


def tiny_flow_components(arch: str, device: torch.device, weight_dtype: torch.dtype, workdir: Path, seed: int):
    """``fastpref.testing.tiny_model``'s ``arch`` pipeline (``sd3`` or ``flux``: a flow-matching
    transformer, CLIP and T5 encoders) written to ``workdir``, loaded as ``fastpref train`` loads it."""
    from fastpref.testing.tiny_model import make_tiny_model

    path = make_tiny_model(workdir / f"tiny-{arch}", arch=arch, seed=seed)
    source = ModelSource(str(path))
    family = source.family
    vae, tokenizers, text_encoders = family.load_encoders(source, dtype=weight_dtype, device=device)
    return Components(
        lambda: family.load_denoiser(source, torch.float32),
        family.load_noise_scheduler(source),
        vae,
        tokenizers,
        text_encoders,
        f"fastpref.testing.tiny_model {family.title} (random weights, tiny widths)",
        family,
    )


def sd15_random_components(device: torch.device, weight_dtype: torch.dtype, workdir: Path, seed: int) -> Components:
    """A UNet, VAE and CLIP text encoder of Stable Diffusion 1.5's published sizes with random
    weights (512 px, 8 pairs, bf16 by default), meant for a GPU."""
    import copy

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from fastpref.testing.tiny_model import load_tokenizer, write_tokenizer

    write_tokenizer(workdir / "tokenizer")
    tokenizer = load_tokenizer(workdir / "tokenizer")  # byte-level BPE, 77 tokens as CLIP's; ids fit CLIP's vocab
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):  # initialise on the device: an 860M-parameter init is slow on a CPU
            template = UNet2DConditionModel(**SD15_UNET)
            vae = AutoencoderKL(**SD15_VAE)
            text_config = CLIPTextConfig(
                **SD15_TEXT,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            text_encoder = CLIPTextModel(text_config)
    vae = vae.to(device, weight_dtype).eval().requires_grad_(False)
    text_encoder = text_encoder.to(device, weight_dtype).eval().requires_grad_(False)
    template = template.requires_grad_(False).to("cpu")  # each trainer moves its copy to the device

    def new_unet():
        return copy.deepcopy(template)

    scheduler = DDPMScheduler(**SD15_SCHEDULER)
    return Components(
        new_unet,
        scheduler,
        vae,
        [tokenizer],
        [text_encoder],
        "SD1.5-sized UNet/VAE/CLIP-L text encoder, random weights",
    )


def make_batches(components: Components, pairs: int, resolution: int, seed: int):
    """``raw``: pixels and captions (host memory, as a DataLoader gives them); ``cached``: the
    latents and text embeddings of the same batch, encoded once (host memory, as the latent
    cache serves them)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(2 * pairs, 3, resolution, resolution, generator=generator) * 2 - 1  # winners, losers
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(pairs)]
    raw = {"pixel_values": pixels, "captions": captions}
    encoded = encode(components, raw)
    cached = {k: v.detach().float().cpu() for k, v in encoded.items()}
    return raw, cached


def encode(components: Components, raw: dict) -> dict:
    """The trainer's batch from pixels and captions: VAE latents of the 2B images and the text
    conditioning of the B captions (the family's ``encode_images``, ``encode_prompts`` and
    ``batch_conditioning``), as ``fastpref train`` does without ``--cache_latents``."""
    family, pixels = components.family, raw["pixel_values"]
    device = next(components.vae.parameters()).device
    latents = family.encode_images(components.vae, pixels.to(device))
    text = family.encode_prompts(raw["captions"], components.tokenizers, components.text_encoders)
    return {"latents": latents.float(), **family.batch_conditioning(text, pixels.shape[-1])}
