"""The models the step benchmark trains and encodes with, and its batches: a tiny SD1.5, SD3 or
FLUX.1 pipeline, or Stable Diffusion 1.5, SD3.5 Medium or FLUX.1 dev at their published sizes
with random weights (for a GPU)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path
from typing import Callable

import torch

from fastpref.train.families import FAMILIES
from fastpref.train.models import ModelSource

SD15 = FAMILIES["sd15"]

MODELS = {
    "tiny": dict(family="sd15", resolution=64, batch=4, dtype="fp32"),
    "sd15-random": dict(family="sd15", resolution=512, batch=8, dtype="bf16"),
    # fastpref.testing.tiny_model's flow-matching pipelines (CPU): the family's own defaults
    # (SD3: logit-normal sigmas, preconditioned outputs, 77 T5 tokens; FLUX.1 dev: guidance 3.5, 512 T5 tokens)
    "tiny-sd3": dict(family="sd3", resolution=64, batch=4, dtype="fp32"),
    "tiny-flux": dict(family="flux", resolution=64, batch=4, dtype="fp32"),
    # the published transformers and encoders, random weights, bf16 (GPU): SD3.5 Medium at its 1024 px,
    # FLUX.1 dev (12B) at 512 px and one pair, so that two LoRA policies and their activations fit 80 GB
    "sd35m-random": dict(family="sd3", resolution=1024, batch=2, dtype="bf16"),
    "flux-random": dict(family="flux", resolution=512, batch=1, dtype="bf16"),
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
# SD3.5 Medium's and FLUX.1 dev's published configs (stabilityai/stable-diffusion-3.5-medium,
# black-forest-labs/FLUX.1-dev: transformer/, vae/, scheduler/, text_encoder*/ config.json; the text
# encoders are CLIP ViT-L/14's text tower, OpenCLIP ViT-bigG/14's and T5 v1.1 XXL's encoder),
# written out so that nothing is downloaded; weights are random.
SD35M_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLOW_VAE = dict(  # SD3's and FLUX's VAE: 16 latent channels, no quant convs; the latent normalisation differs
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=1024,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
)
CLIP_L_TEXT = dict(SD15_TEXT, hidden_act="quick_gelu")  # SD3's text_encoder, FLUX's text_encoder
CLIP_G_TEXT = dict(  # SD3's text_encoder_2
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)
T5_XXL = dict(  # SD3's text_encoder_3, FLUX's text_encoder_2
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    is_encoder_decoder=False,
    use_cache=False,
)

#: what differs between the two random-weight flow models: the name, the transformer's config, the
#: CLIP text towers (SD3's with projections), the VAE's latent normalisation and the scheduler
RANDOM_FLOW = {
    "sd3": dict(
        title="SD3.5 Medium",
        transformer=SD35M_TRANSFORMER,
        clip_class="CLIPTextModelWithProjection",
        clips=(CLIP_L_TEXT, CLIP_G_TEXT),
        vae=dict(scaling_factor=1.5305, shift_factor=0.0609),
        scheduler=dict(num_train_timesteps=1000, shift=3.0),
    ),
    "flux": dict(
        title="FLUX.1 dev",
        transformer=FLUX_TRANSFORMER,
        clip_class="CLIPTextModel",
        clips=(CLIP_L_TEXT,),
        vae=dict(scaling_factor=0.3611, shift_factor=0.1159),
        scheduler=dict(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
    ),
}
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

    def release_encoders(self) -> None:
        """Drop the VAE and the text encoders (once the cached batch is made, where no variant
        encodes): a 12B transformer's runs need the device memory T5-XXL holds."""
        self.vae, self.text_encoders = None, []


def build_components(
    model: str, device: torch.device, weight_dtype: torch.dtype, workdir: Path, seed: int
) -> Components:
    """The models of ``model`` (a key of :data:`MODELS`): ``tiny`` (default, :func:`tiny_components`),
    ``tiny-sd3`` / ``tiny-flux`` (:func:`tiny_flow_components`), ``sd15-random``
    (:func:`sd15_random_components`), ``sd35m-random`` / ``flux-random`` (:func:`random_flow_components`)."""
    builders = {
        "tiny": tiny_components,
        "sd15-random": sd15_random_components,
        "tiny-sd3": functools.partial(tiny_flow_components, "sd3"),
        "tiny-flux": functools.partial(tiny_flow_components, "flux"),
        "sd35m-random": functools.partial(random_flow_components, "sd3"),
        "flux-random": functools.partial(random_flow_components, "flux"),
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


@contextlib.contextmanager
def built_on(device, dtype: torch.dtype, seed: int):
    """Modules made inside are initialised on ``device`` directly in ``dtype`` (a 12B-parameter
    model never exists in float32 nor on the CPU), from ``seed``; the global RNG and default
    dtype are restored afterwards."""
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)


def random_flow_transformer(arch: str, device, dtype: torch.dtype, seed: int):
    """SD3.5 Medium's (``arch`` "sd3", 2.5B parameters) or FLUX.1 dev's (``"flux"``, 11.9B)
    transformer with random weights, made on ``device`` in ``dtype``, frozen."""
    import diffusers

    transformer_class = getattr(diffusers, FAMILIES[arch].transformer_class)
    with built_on(device, dtype, seed):
        model = transformer_class(**RANDOM_FLOW[arch]["transformer"])
    return model.requires_grad_(False)


def random_flow_encoders(arch: str, device, dtype: torch.dtype, seed: int, workdir: Path):
    """``(vae, tokenizers, text_encoders)`` of SD3.5 Medium (``arch`` "sd3": CLIP-L and CLIP-G with
    projections, T5-XXL) or FLUX.1 dev (``"flux"``: CLIP-L, T5-XXL) at their published sizes,
    random weights, on ``device`` in ``dtype``, eval mode; offline tokenizers whose ids fit the
    encoders' vocabularies (``fastpref.testing.tiny_model``'s)."""
    import transformers
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, T5Config, T5EncoderModel

    from fastpref.testing.tiny_model import build_t5_tokenizer, load_tokenizer, write_tokenizer

    model = RANDOM_FLOW[arch]
    write_tokenizer(workdir / "tokenizer")
    clip_tokenizer, t5_tokenizer = load_tokenizer(workdir / "tokenizer"), build_t5_tokenizer()
    ids = dict(
        bos_token_id=clip_tokenizer.bos_token_id,
        eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
    )
    clip_class = getattr(transformers, model["clip_class"])
    with built_on(device, dtype, seed + 1):
        vae = AutoencoderKL(**FLOW_VAE, **model["vae"])
        clips = [clip_class(CLIPTextConfig(**text, **ids)) for text in model["clips"]]
        t5 = T5EncoderModel(T5Config(**T5_XXL))
    encoders = [m.eval().requires_grad_(False) for m in (*clips, t5)]
    return vae.eval().requires_grad_(False), [clip_tokenizer] * len(clips) + [t5_tokenizer], encoders


def random_flow_components(arch: str, device: torch.device, weight_dtype: torch.dtype, workdir: Path, seed: int):
    """SD3.5 Medium (``arch`` "sd3") or FLUX.1 dev (``"flux"``) at their published sizes with
    random weights (:func:`random_flow_transformer`, :func:`random_flow_encoders`), the family's
    default flow settings, the published scheduler; each ``new_unet()`` makes the same
    transformer again on the device (no host copy of 24 GB). Meant for a GPU."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    vae, tokenizers, text_encoders = random_flow_encoders(arch, device, weight_dtype, seed, workdir)
    return Components(
        lambda: random_flow_transformer(arch, device, weight_dtype, seed),
        FlowMatchEulerDiscreteScheduler(**RANDOM_FLOW[arch]["scheduler"]),
        vae,
        tokenizers,
        text_encoders,
        f"{RANDOM_FLOW[arch]['title']}-sized transformer, VAE and text encoders (T5-XXL), random weights",
        FAMILIES[arch],
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
