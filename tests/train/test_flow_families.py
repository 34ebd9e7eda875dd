"""The flow-matching families (``fastpref.train.families.sd3`` / ``flux``): recognised from their
configs, their text encoding equal to their pipelines', sigmas drawn as diffusers' scripts draw
them, FLUX's packing, and the per-sample loss weight entering every model's error alike
(docs/spec.md §2b), checked against float64."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import fastpref  # noqa: E402
from fastpref.train import TrainConfig  # noqa: E402
from fastpref.train.arguments import ArgumentError  # noqa: E402
from fastpref.train.checks import check_family_options, check_resolution  # noqa: E402
from fastpref.train.families import FAMILIES, of_denoiser, recognise  # noqa: E402
from fastpref.train.models import ModelSource  # noqa: E402

pytestmark = pytest.mark.usefixtures("offline_hub")
CAPTIONS = ["a red circle", "a small blue square on a dark background"]


def test_flow_pipelines_are_recognised_from_their_transformer_config():
    sd3 = {"transformer": {"_class_name": "SD3Transformer2DModel"}}
    flux = {"model_index": {"transformer": []}, "transformer": {"_class_name": "FluxTransformer2DModel"}}
    assert recognise(sd3, "black-forest-labs/FLUX.1-dev") is FAMILIES["sd3"]  # the name says nothing
    assert recognise(flux, "stabilityai/stable-diffusion-3.5-medium") is FAMILIES["flux"]
    with pytest.raises(ValueError, match="no model family.*HunyuanDiT2DModel"):
        recognise({"transformer": {"_class_name": "HunyuanDiT2DModel"}}, "x")


def test_flow_settings_come_from_the_config_and_are_refused_elsewhere():
    sd3, flux = FAMILIES["sd3"], FAMILIES["flux"]
    assert (sd3.settings.weighting_scheme, sd3.settings.precondition_outputs) == ("logit_normal", True)
    assert (flux.settings.weighting_scheme, flux.settings.max_sequence_length) == ("none", 512)
    config = TrainConfig(loss_type="dpo", weighting_scheme="mode", mode_scale=0.5, max_sequence_length=64)
    configured = flux.configured(config)
    assert (configured.settings.weighting_scheme, configured.settings.mode_scale) == ("mode", 0.5)
    assert configured.encoding_key() == {"max_sequence_length": 64} and flux.settings.max_sequence_length == 512
    assert FAMILIES["sd15"].configured(config) is FAMILIES["sd15"] and FAMILIES["sd15"].encoding_key() == {}
    with pytest.raises(ArgumentError, match="^--weighting_scheme: a flow-matching flag.*SD 1.5"):
        check_family_options(config, FAMILIES["sd15"], ModelSource("m"))
    with pytest.raises(ValueError, match="max_sequence_length must be an int in \\[1, 512\\]"):
        TrainConfig(max_sequence_length=513)
    with pytest.raises(ValueError, match="precondition_outputs must be 0 or 1"):
        TrainConfig(precondition_outputs=2)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "none"])
def test_sigmas_are_drawn_as_diffusers_scripts_draw_them(flow_models, scheme):
    """``compute_density_for_timestep_sampling``'s u, then the training scheduler's sigma at index
    ``int(u * num_train_timesteps)`` (SD3's scheduler: shift 3)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    family = FAMILIES["sd3"].configured(TrainConfig(weighting_scheme=scheme, logit_std=0.7))
    scheduler = family.load_noise_scheduler(ModelSource(str(flow_models["sd3"])))
    sigmas = family.draw_timesteps(scheduler, torch.Generator().manual_seed(3), 64, False)
    u = compute_density_for_timestep_sampling(
        scheme, 64, logit_mean=0.0, logit_std=0.7, mode_scale=1.29, generator=torch.Generator().manual_seed(3)
    )
    indices = (u * scheduler.config.num_train_timesteps).long()
    assert torch.equal(sigmas, scheduler.sigmas[indices]) and sigmas.dtype == torch.float32
    assert torch.allclose(scheduler.timesteps[indices], sigmas * 1000)  # what the SD3 transformer is called with


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_text_encoding_is_the_pipelines(flow_models, arch):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    path = flow_models[arch]
    family = FAMILIES[arch].configured(TrainConfig(max_sequence_length=12))
    tokenizers, encoders = family.load_encoders(ModelSource(str(path)))[1:]
    encoded = family.encode_prompts(CAPTIONS, tokenizers, encoders)
    batch = family.batch_conditioning(encoded, 32)
    if arch == "sd3":
        pipe = StableDiffusion3Pipeline.from_pretrained(path)
        embeds, _, pooled, _ = pipe.encode_prompt(
            CAPTIONS, None, None, do_classifier_free_guidance=False, max_sequence_length=12
        )
    else:
        pipe = FluxPipeline.from_pretrained(path)
        embeds, pooled, _ = pipe.encode_prompt(CAPTIONS, None, max_sequence_length=12)
    torch.testing.assert_close(batch["encoder_hidden_states"], embeds.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch["pooled_prompt_embeds"], pooled.detach(), rtol=1e-5, atol=1e-6)
    assert encoded["prompt_embeds"].shape[:2] == (2, 12)  # T5, stored without SD3's CLIP padding


class Constant(torch.nn.Module):
    """A stand-in transformer returning a fixed prediction (FLUX: its packed input, unchanged)."""

    def __init__(self, pred=None, guidance_embeds=False):
        super().__init__()
        self.pred, self.calls = pred, []
        self.config = type("Config", (), {"guidance_embeds": guidance_embeds})()

    def forward(self, hidden_states, **inputs):
        self.calls.append(inputs)
        return (hidden_states if self.pred is None else self.pred,)


def test_flux_packs_latents_in_2x2_patches_and_back():
    family = FAMILIES["flux"].configured(TrainConfig(guidance_scale=4.0))
    latents = torch.randn(4, 16, 4, 6)
    batch = {
        "latents": latents,
        "encoder_hidden_states": torch.randn(2, 5, 8),
        "pooled_prompt_embeds": torch.randn(2, 3),
    }
    inputs = family.denoiser_inputs(batch, "cpu", torch.float32)
    module = Constant(guidance_embeds=True)
    assert torch.equal(family.transformer_call(module, latents, torch.rand(4), inputs), latents)
    call = module.calls[0]
    assert call["img_ids"].shape == (2 * 3, 3) and call["txt_ids"].shape == (5, 3)
    assert call["guidance"].tolist() == [4.0] * 4 and call["encoder_hidden_states"].shape == (4, 5, 8)
    family.transformer_call(Constant(guidance_embeds=False), latents, torch.rand(4), inputs)
    with pytest.raises(ValueError, match="multiple of 16"):
        family.denoiser_inputs({**batch, "latents": torch.randn(4, 16, 3, 4)}, "cpu", torch.float32)
    with pytest.raises(ArgumentError, match="^--resolution must be a multiple of 16 for FLUX.1, got 40"):
        check_resolution(40, family)
    check_resolution(40, FAMILIES["sd3"])


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap"])
@pytest.mark.parametrize("precondition", [0, 1])
def test_the_loss_weight_enters_every_models_errors_alike(scheme, precondition, backend):
    """docs/spec.md §2b: the family's ``sqrt(w)``-scaled predictions and target give per-sample
    errors ``w * e`` for the policy, the reference and the footprints; the fused loss on them
    matches the float64 reference, and its l_theta is the float64 weighted errors' logit."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    if fastpref.availability("cpu")[backend] is not None:
        pytest.skip(f"backend {backend}: {fastpref.availability('cpu')[backend]}")
    pairs, shape = 3, (16, 4, 4)
    family = FAMILIES["sd3"].configured(TrainConfig(weighting_scheme=scheme, precondition_outputs=precondition))
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2 * pairs, *shape, generator=gen)
    noise = torch.randn(pairs, *shape, generator=gen).repeat(2, 1, 1, 1)  # shared by each pair
    sigmas = torch.rand(pairs, generator=gen).clamp(0.05, 0.95).repeat(2)
    noisy = family.add_noise(None, latents, noise, sigmas)
    inputs = {"encoder_hidden_states": None, "pooled_projections": None}
    raw = {m: torch.randn(2 * pairs, *shape, generator=gen) for m in ("policy", "ref", "ema")}
    preds = {m: family.denoise(Constant(value), noisy, sigmas, inputs) for m, value in raw.items()}
    target = family.target(None, latents, noise, sigmas)

    w = compute_loss_weighting_for_sd3(scheme, sigmas.double())  # float64 oracle of the weighted errors
    target64 = latents.double() if precondition else (noise - latents).double()
    errors = {}
    for m, value in raw.items():
        pred64 = noisy.double() - sigmas.double().view(-1, 1, 1, 1) * value.double() if precondition else value.double()
        errors[m] = w * (pred64 - target64).square().flatten(1).mean(1)
        got = (preds[m].double() - target.double()).square().flatten(1).mean(1)
        torch.testing.assert_close(got, errors[m], rtol=1e-5, atol=0)

    keywords = dict(ema_preds=[preds["ema"]], beta=50.0, return_stats=True)
    loss, stats = fastpref.adaptive_dpo_loss(preds["policy"], preds["ref"], target, backend=backend, **keywords)
    as64 = [t.double() for t in (preds["policy"], preds["ref"], target)]
    keywords64 = {**keywords, "ema_preds": [preds["ema"].double()]}
    loss64, stats64 = fastpref.reference.adaptive_dpo_loss(*as64, **keywords64)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-4, atol=1e-6)  # float32 accumulation
    torch.testing.assert_close(stats["u"].double(), stats64["u"], rtol=1e-4, atol=1e-6)
    diff = errors["ref"] - errors["policy"]
    scale = float(errors["ref"].abs().max())  # l is a difference of errors: its float32 error scales with them
    torch.testing.assert_close(stats["l_theta"].double(), diff[:pairs] - diff[pairs:], rtol=0, atol=1e-5 * scale)


def test_an_in_memory_transformer_is_recognised_from_its_config():
    from diffusers import FluxTransformer2DModel

    from fastpref.testing.tiny_model import TRANSFORMER_KWARGS

    assert of_denoiser(FluxTransformer2DModel(**TRANSFORMER_KWARGS["flux"])) is FAMILIES["flux"]


def test_offload_keeps_the_encoders_on_the_cpu_between_steps(flow_models):
    """``--offload``: the uncached run's VAE and text encoders are loaded on the CPU, moved to the
    accelerator only to encode a batch and back (also when encoding fails), and encode the same
    numbers bitwise; the text encoders run in the weight dtype, the VAE in the family's."""
    from fastpref.train.data import BatchEncoder

    family = FAMILIES["sd3"]
    vae, tokenizers, encoders = family.load_encoders(ModelSource(str(flow_models["sd3"])), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for e in encoders for p in e.parameters())
    assert next(vae.parameters()).dtype == family.vae_dtype(vae.config.force_upcast, torch.bfloat16)
    moves, device = [], torch.device("cpu", 0)  # the accelerator, named apart from the CPU the encoders wait on
    for module in (vae, *encoders):  # record each move
        module.to = lambda *args, _to=module.to, **kwargs: moves.append(str(args[0])) or _to(*args, **kwargs)
    batch = {"pixel_values": torch.rand(4, 3, 32, 32) * 2 - 1, "captions": CAPTIONS}
    encoded = {}
    for offload in (False, True):
        encode = BatchEncoder(family, vae, tokenizers, encoders, 32, device, offload=offload)
        encoded[offload] = encode(batch)
    assert moves == ["cpu:0"] * 4 + ["cpu"] * 4  # to the device and back, the VAE and 3 text encoders
    assert encoded[True].keys() == encoded[False].keys()
    assert all(torch.equal(encoded[True][k], encoded[False][k]) for k in encoded[False])
    assert all(p.device.type == "cpu" for m in (vae, *encoders) for p in m.parameters())
    moves.clear()
    with pytest.raises(KeyError):  # no captions: the text encoding fails
        encode({"pixel_values": batch["pixel_values"]})
    assert moves == ["cpu:0"] * 4 + ["cpu"] * 4
