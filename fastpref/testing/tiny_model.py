"""Tiny random-weight Stable Diffusion 1.5 / SDXL / SD3 / FLUX.1 pipelines, written from configs
for tests and offline use (:func:`make_tiny_model`, ``fastpref make-tiny-model``); nothing is
downloaded (the tokenizers come from :mod:`fastpref.testing.tiny_tokenizers`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from .tiny_tokenizers import (
    MAX_LENGTH,
    build_t5_tokenizer,
    load_tokenizer,
    write_tokenizer,
)

# --------------------------------------------------------------------------------------------
# component configs
# --------------------------------------------------------------------------------------------


def text_encoder_config(vocab_size: int, *, act: str):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,  # SDXL reads the penultimate hidden state: keep it distinct from the last
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=32,
        hidden_act=act,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


UNET_COMMON = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    norm_num_groups=32,
)

#: the tiny UNet of each model, on top of UNET_COMMON
UNET_KWARGS = {
    "sd15": dict(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
    ),
    # SDXL: no attention at the highest resolution, linear projections, text_time conditioning
    # on the pooled text_encoder_2 embedding (32) plus 6 add_time_ids of 8 each.
    "sdxl": dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,  # text_encoder (32) + text_encoder_2 (32) hidden states, concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    ),
}

#: the VAE's latent scaling factor of each model
VAE_SCALING_FACTOR = {"sd15": 0.18215, "sdxl": 0.13025}
#: the flow models' VAE latent normalisation (the real VAEs' config values)
FLOW_VAE = {
    "sd3": dict(scaling_factor=1.5305, shift_factor=0.0609),
    "flux": dict(scaling_factor=0.3611, shift_factor=0.1159),
    "flux-schnell": dict(scaling_factor=0.3611, shift_factor=0.1159),
}
T5_WIDTH = 64  # the T5 encoder's d_model: SD3 pads its two CLIPs' concatenated 32 + 32 to it

#: the tiny transformer of each flow model (the real ones' structure, tiny widths; one block of each kind)
TRANSFORMER_KWARGS = {
    # 32 px -> 4x4 latents -> 2x2 patches; pooled: the two CLIPs' 32 + 32
    "sd3": dict(
        sample_size=4,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
    ),
    # packed 2x2 latent patches: 16 x 4 = 64 input channels; rope axes sum to the head width
    "flux": dict(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=32,
        guidance_embeds=True,  # FLUX.1 dev is guidance-distilled
        axes_dims_rope=(4, 6, 6),
    ),
}
TRANSFORMER_KWARGS["flux-schnell"] = dict(TRANSFORMER_KWARGS["flux"], guidance_embeds=False)

#: the flow models' FlowMatchEulerDiscreteScheduler configs (the real ones' values)
FLOW_SCHEDULERS = {
    "sd3": dict(num_train_timesteps=1000, shift=3.0),
    "flux": dict(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ),
    "flux-schnell": dict(num_train_timesteps=1000, shift=1.0),
}


def t5_encoder_config(vocab_size: int):
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size,
        d_model=T5_WIDTH,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        feed_forward_proj="gated-gelu",  # T5 v1.1 (T5-XXL)'s
        pad_token_id=0,
        eos_token_id=1,
    )


def unet_kwargs(arch: str) -> dict:
    return dict(UNET_COMMON, **UNET_KWARGS[arch])


def vae_kwargs(arch: str) -> dict:
    if arch in FLOW_VAE:  # SD3 / FLUX: 16 latent channels, a shift factor, no quant convs
        return dict(VAE_COMMON, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, **FLOW_VAE[arch])
    return dict(VAE_COMMON, latent_channels=4, scaling_factor=VAE_SCALING_FACTOR[arch])


VAE_COMMON = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
)


SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
)


# --------------------------------------------------------------------------------------------
# the pipelines (weights drawn in the order unet, vae, text encoder(s): a seed's weights are fixed)
# --------------------------------------------------------------------------------------------


def sd15_pipeline(vocab_size: int, tokenizer_files: Path):
    """A tiny ``StableDiffusionPipeline`` (PNDM scheduler, no safety checker)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel(**unet_kwargs("sd15"))
    vae = AutoencoderKL(**vae_kwargs("sd15"))
    text_encoder = CLIPTextModel(text_encoder_config(vocab_size, act="quick_gelu"))  # CLIP ViT-L's activation
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=load_tokenizer(tokenizer_files),
        unet=unet.eval(),
        scheduler=PNDMScheduler(**SCHEDULER_CONFIG, skip_prk_steps=True, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl_pipeline(vocab_size: int, tokenizer_files: Path):
    """A tiny ``StableDiffusionXLPipeline`` (Euler scheduler, two text encoders, no watermarker)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(**unet_kwargs("sdxl"))
    vae = AutoencoderKL(**vae_kwargs("sdxl"))
    text_encoder = CLIPTextModel(text_encoder_config(vocab_size, act="quick_gelu"))  # CLIP ViT-L's activation
    text_encoder_2 = CLIPTextModelWithProjection(text_encoder_config(vocab_size, act="gelu"))  # OpenCLIP bigG's
    scheduler = EulerDiscreteScheduler(**SCHEDULER_CONFIG, interpolation_type="linear", timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=load_tokenizer(tokenizer_files),
        tokenizer_2=load_tokenizer(tokenizer_files),
        unet=unet.eval(),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def sd3_pipeline(vocab_size: int, tokenizer_files: Path):
    """A tiny ``StableDiffusion3Pipeline``: two CLIPs with projections and a T5 encoder."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    transformer = SD3Transformer2DModel(**TRANSFORMER_KWARGS["sd3"])
    vae = AutoencoderKL(**vae_kwargs("sd3"))
    text_encoder = CLIPTextModelWithProjection(text_encoder_config(vocab_size, act="quick_gelu"))  # CLIP ViT-L's
    text_encoder_2 = CLIPTextModelWithProjection(text_encoder_config(vocab_size, act="gelu"))  # OpenCLIP bigG's
    tokenizer_3 = build_t5_tokenizer()
    text_encoder_3 = T5EncoderModel(t5_encoder_config(len(tokenizer_3)))
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULERS["sd3"]),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=load_tokenizer(tokenizer_files),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=load_tokenizer(tokenizer_files),
        text_encoder_3=text_encoder_3.eval(),
        tokenizer_3=tokenizer_3,
    )


def flux_pipeline(vocab_size: int, tokenizer_files: Path, arch: str = "flux"):
    """A tiny ``FluxPipeline``: CLIP (pooled) and T5 (sequence); ``arch`` "flux" has FLUX.1 dev's
    guidance embedding, "flux-schnell" not."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    transformer = FluxTransformer2DModel(**TRANSFORMER_KWARGS[arch])
    vae = AutoencoderKL(**vae_kwargs(arch))
    text_encoder = CLIPTextModel(text_encoder_config(vocab_size, act="quick_gelu"))
    tokenizer_2 = build_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(t5_encoder_config(len(tokenizer_2)))
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULERS[arch]),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=load_tokenizer(tokenizer_files),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
        transformer=transformer.eval(),
    )


#: how each tiny pipeline is built
PIPELINES = {
    "sd15": sd15_pipeline,
    "sdxl": sdxl_pipeline,
    "sd3": sd3_pipeline,
    "flux": flux_pipeline,
    "flux-schnell": lambda vocab_size, files: flux_pipeline(vocab_size, files, "flux-schnell"),
}
ARCHS = tuple(PIPELINES)


# --------------------------------------------------------------------------------------------
# the pipeline folder
# --------------------------------------------------------------------------------------------


def make_tiny_model(path, arch: str = "sd15", seed: int = 0, overwrite: bool = False) -> Path:
    """Write a tiny random-weight ``arch`` pipeline (one of :data:`ARCHS`) into ``path``; returns it.

    The diffusers-format folder, as the real models' (SD 1.5 / SDXL)::

        model_index.json
        unet/            UNet2DConditionModel   (config.json + diffusion_pytorch_model.safetensors)
        vae/             AutoencoderKL          (4 blocks: the real 8x downsampling, 4 latent channels)
        text_encoder/    CLIPTextModel
        tokenizer/       CLIPTokenizer          (built from a vocab.json + merges.txt written here)
        scheduler/       PNDMScheduler (sd15) / EulerDiscreteScheduler (sdxl), the SD noise schedule
        text_encoder_2/  CLIPTextModelWithProjection   (sdxl only)
        tokenizer_2/     CLIPTokenizer                 (sdxl only)
        fastpref_tiny.json  what wrote it (arch, seed)

    SD3 (``sd3``): ``transformer/`` (SD3Transformer2DModel), ``vae/`` (16 latent channels, SD3's
    scaling and shift factors), ``text_encoder/`` and ``text_encoder_2/``
    (CLIPTextModelWithProjection) with ``tokenizer/``, ``tokenizer_2/`` (CLIP), ``text_encoder_3/``
    (T5EncoderModel) with ``tokenizer_3/`` (T5TokenizerFast, ``tokenizer.json``) and ``scheduler/``
    (FlowMatchEulerDiscreteScheduler, shift 3). FLUX.1 (``flux``: dev, with its guidance embedding;
    ``flux-schnell``: without): ``transformer/`` (FluxTransformer2DModel), ``vae/``,
    ``text_encoder/`` (CLIPTextModel) with ``tokenizer/``, ``text_encoder_2/`` (T5EncoderModel)
    with ``tokenizer_2/`` (T5) and ``scheduler/`` (dev: dynamic shifting; schnell: shift 1).

    It loads offline with the family's pipeline's ``from_pretrained(path)``
    (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``,
    ``FluxPipeline``) or by component (``UNet2DConditionModel.from_pretrained(path,
    subfolder="unet")``). The shapes follow the real models where the trainer can depend on them
    (latent channels 4 / 16, VAE factor 8, CLIP length 77, SDXL's two text encoders whose hidden
    states are concatenated, its pooled embedding and the six ``add_time_ids``; SD3's CLIP
    embeddings padded to T5's width, FLUX's 2x2 latent packing); the widths are tiny (32/64
    channels, 32/64-wide text encoders, one block of each kind) so that a forward takes
    milliseconds on a CPU. Default resolution: 32 px for the transformers.

    Weights are initialised under ``torch.manual_seed(seed)`` (the global RNG state is restored
    afterwards), so a given seed writes the same weights. ``path`` may exist if it holds no
    ``model_index.json``; with ``overwrite=True`` an existing model there is replaced.
    """
    if arch not in PIPELINES:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    import torch

    path = Path(path)
    if (path / "model_index.json").exists():
        if not overwrite:
            raise FileExistsError(f"{path} already holds a model (model_index.json); pass overwrite=True")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)

    # The tokenizer is built from files written first, then saved again by the pipeline.
    staging = path / ".tokenizer_src"
    vocab, _ = write_tokenizer(staging)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = PIPELINES[arch](len(vocab), staging)
    pipe.save_pretrained(str(path), safe_serialization=True)
    # Recent transformers save only tokenizer.json; keep the written vocab.json + merges.txt beside
    # it too, which is what older (and slow) CLIPTokenizer implementations read.
    for name in ("tokenizer", "tokenizer_2"):
        for file in ("vocab.json", "merges.txt"):
            is_clip = (path / name / "tokenizer_config.json").is_file() and "CLIP" in (
                path / name / "tokenizer_config.json"
            ).read_text()
            if is_clip and not (path / name / file).exists():
                shutil.copyfile(staging / file, path / name / file)
    shutil.rmtree(staging)
    (path / "fastpref_tiny.json").write_text(
        json.dumps({"arch": arch, "seed": seed, "vocab_size": len(vocab)}, indent=2) + "\n"
    )
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastpref make-tiny-model",
        description="Write a tiny random-weight diffusers pipeline (loads offline with from_pretrained).",
    )
    parser.add_argument("dir", help="output folder")
    parser.add_argument("--arch", choices=ARCHS, default="sd15")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in DIR")
    args = parser.parse_args(argv)
    try:
        out = make_tiny_model(args.dir, arch=args.arch, seed=args.seed, overwrite=args.overwrite)
    except FileExistsError as error:
        parser.error(str(error))
    print(f"wrote tiny {args.arch} pipeline (seed {args.seed}) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
