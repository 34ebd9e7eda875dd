"""``fastpref.testing.tiny_model`` and ``fastpref make-tiny-model``: tiny random-weight SD1.5/SDXL/
SD3/FLUX.1 pipelines that load offline and run, seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from offline import RES  # noqa: E402

from fastpref.train.families import FAMILIES  # noqa: E402
from fastpref.train.models import ModelSource  # noqa: E402

pytestmark = pytest.mark.usefixtures("offline_hub")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' Euler scheduler vs NumPy 2
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_tiny_model_loads_offline_and_runs(models, arch):
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    path = models[arch]
    assert ModelSource(str(path)).family.name == arch
    expected = {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    expected |= {"text_encoder_2", "tokenizer_2"} if arch == "sdxl" else set()
    assert expected <= {p.name for p in path.iterdir()}
    assert (path / "tokenizer" / "vocab.json").exists() and (path / "tokenizer" / "merges.txt").exists()
    assert list((path / "unet").glob("*.safetensors"))

    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(path, local_files_only=True)
    tokens = pipe.tokenizer("a red circle").input_ids
    assert len(tokens) == 5 and pipe.tokenizer.model_max_length == 77  # bos, 3 whole words, eos

    # Components load on their own too; one UNet forward with the pipeline's own conditioning.
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if arch == "sdxl" else [])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else [])
    text = FAMILIES[arch].encode_prompts(["a red circle", "a blue square"], tokenizers, encoders)
    embeds, pooled = text["prompt_embeds"], text.get("pooled_prompt_embeds")
    assert embeds.shape == (2, 77, unet.config.cross_attention_dim)
    extra = {}
    if arch == "sdxl":
        time_ids = torch.tensor([[RES, RES, 0, 0, RES, RES]] * 2, dtype=torch.float32)
        extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    latents = torch.randn(2, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = unet(latents, torch.tensor([10, 500]), encoder_hidden_states=embeds, **extra).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()

    image = pipe(
        "a red circle",
        num_inference_steps=1,
        height=RES,
        width=RES,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, RES, RES, 3)


def test_tiny_model_is_seeded(models, tmp_path):
    from safetensors.torch import load_file

    from fastpref.testing.tiny_model import make_tiny_model

    again = make_tiny_model(tmp_path / "again", "sd15", seed=0)
    other = make_tiny_model(tmp_path / "other", "sd15", seed=1)
    weights = lambda p: load_file(str(p / "unet" / "diffusion_pytorch_model.safetensors"))  # noqa: E731
    first, second, third = weights(models["sd15"]), weights(again), weights(other)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], third[k]) for k in first)
    with pytest.raises(FileExistsError):
        make_tiny_model(again, "sd15")


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_tiny_flow_model_loads_offline_and_runs(flow_models, arch):
    """The SD3 / FLUX.1 fixtures: the real pipelines' folders (T5 tokenizer included), loaded by
    the pipeline a user runs, recognised from their configs, sampling an image."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    path = flow_models[arch]
    assert ModelSource(str(path)).family.name == arch
    t5 = "tokenizer_3" if arch == "sd3" else "tokenizer_2"
    expected = {"model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler", t5}
    expected |= {"text_encoder_2", "tokenizer_2", "text_encoder_3"} if arch == "sd3" else {"text_encoder_2"}
    assert expected <= {p.name for p in path.iterdir()} and not (path / "unet").exists()
    assert (path / t5 / "tokenizer.json").exists()

    cls = StableDiffusion3Pipeline if arch == "sd3" else FluxPipeline
    pipe = cls.from_pretrained(path, local_files_only=True)
    tokenizer = getattr(pipe, t5)
    assert tokenizer("a red circle").input_ids == [3, 22, 33, 1]  # whole words (after 3 specials), </s>
    assert tokenizer.pad_token_id == 0 and tokenizer.model_max_length == 512
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor
    assert pipe.transformer.config.get("guidance_embeds", False) == (arch == "flux")
    image = pipe(
        "a red circle",
        num_inference_steps=1,
        height=RES,
        width=RES,
        max_sequence_length=8,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, RES, RES, 3) and np.isfinite(image).all()


def test_tiny_flux_schnell_has_no_guidance_embedding(tmp_path):
    from diffusers import FluxTransformer2DModel

    from fastpref.testing.tiny_model import make_tiny_model

    path = make_tiny_model(tmp_path / "schnell", "flux-schnell")
    assert not FluxTransformer2DModel.load_config(path / "transformer")["guidance_embeds"]
    assert ModelSource(str(path)).family.name == "flux"
