"""The model-family seam (``fastpref.train.families``): a pipeline's family comes from its
configs, and a family written from the interface alone trains through the unchanged step loop."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from fastpref.train import TrainConfig  # noqa: E402
from fastpref.train.arguments import RunArguments  # noqa: E402
from fastpref.train.data import BatchEncoder  # noqa: E402
from fastpref.train.families import FAMILIES, FamilyDefaults, ModelFamily, recognise  # noqa: E402
from fastpref.train.loop import run_steps  # noqa: E402
from fastpref.train.output_dir import LOG_FILE  # noqa: E402
from fastpref.train.trainer import PreferenceTrainer  # noqa: E402

CHANNELS, SIDE, TEXT = 4, 4, 8


class ToyTransformer(torch.nn.Module):
    """A denoiser with a transformer's call: ``(hidden_states, timestep, encoder_hidden_states)``."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)
        self.text = torch.nn.Linear(TEXT, CHANNELS)

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        shift = self.text(encoder_hidden_states)[:, :, None, None] * timestep[:, None, None, None]
        return self.inner(hidden_states) + shift


class ToyFlow(ModelFamily):
    """A flow-matching family, written from the interface alone: sigmas in (0, 1), the noisy
    input ``(1 - s) x + s n`` and the velocity target ``n - x``, per image."""

    name = "toyflow"
    title = "Toy flow"
    description = "a toy flow-matching transformer"
    defaults = FamilyDefaults(beta=500.0, k1=1.0, resolution=32, tracker_name="toyflow-dpo")
    denoiser_folder = "transformer"

    def recognises(self, configs):
        return configs.get("transformer", {}).get("_class_name") == "ToyTransformer"

    def load_denoiser(self, source, dtype):
        return ToyTransformer().to(dtype)

    def load_noise_scheduler(self, source, *, is_turbo=False):
        return None  # flow matching here needs no schedule object

    def load_text_encoders(self, source, dtype, device):
        raise NotImplementedError("the toy family trains on encoded batches only")

    def encode_prompts(self, captions, tokenizers, text_encoders):
        raise NotImplementedError("the toy family trains on encoded batches only")

    def batch_conditioning(self, batch, resolution):
        return {"text": batch["text"]}

    def draw_timesteps(self, scheduler, generator, count, is_turbo):
        return torch.rand(count, generator=generator) * 0.98 + 0.01

    def add_noise(self, scheduler, latents, noise, timesteps):
        sigma = timesteps.reshape(-1, 1, 1, 1).to(latents.dtype)
        return (1 - sigma) * latents + sigma * noise

    def target(self, scheduler, latents, noise, timesteps):
        return noise - latents

    def denoiser_inputs(self, batch, device, dtype):
        text = batch["text"].to(device, dtype)
        if batch["latents"].shape[0] != 2 * text.shape[0]:
            raise ValueError("latents must be [2B, ...] for B pairs of text")
        return {"text": torch.cat([text, text])}

    def denoise(self, module, noisy, timesteps, inputs):
        return module(noisy, timesteps.to(noisy.dtype), inputs["text"])

    def save_lora_weights(self, layers, folder):
        raise NotImplementedError("the toy family has no LoRA format")

    def validation_pipeline(self, source, denoiser, weight_dtype, device):
        raise NotImplementedError("the toy family has no pipeline")

    def sampling(self, is_turbo, steps):
        return {"num_inference_steps": steps or 4}


def toy_batches(pairs=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield {
            "latents": torch.randn(2 * pairs, CHANNELS, SIDE, SIDE, generator=generator),
            "text": torch.randn(pairs, TEXT, generator=generator),
        }


def test_a_pipeline_family_comes_from_its_configs_never_its_name():
    unet = {"_class_name": "UNet2DConditionModel", "addition_embed_type": None}
    assert recognise({"model_index": {"unet": []}, "unet": unet}, "stable-diffusion-xl") is FAMILIES["sd15"]
    assert recognise({"unet": {**unet, "addition_embed_type": "text_time"}}, "sd15") is FAMILIES["sdxl"]
    with pytest.raises(ValueError, match="no model family fastpref trains recognises.*ToyTransformer"):
        recognise({"transformer": {"_class_name": "ToyTransformer"}}, "toy")
    every = {**FAMILIES, "toyflow": ToyFlow()}
    assert recognise({"transformer": {"_class_name": "ToyTransformer"}}, "toy", every).name == "toyflow"


def test_the_sd_families_differ_only_in_their_modules():
    sd15, sdxl = FAMILIES["sd15"], FAMILIES["sdxl"]
    assert (sd15.defaults.beta, sd15.defaults.k1, sd15.defaults.resolution) == (1000.0, 10.0, 512)
    assert (sdxl.defaults.beta, sdxl.defaults.k1, sdxl.defaults.resolution) == (2500.0, 1.0, 1024)
    assert sdxl.has_turbo and not sd15.has_turbo
    batch = {
        "prompt_embeds": torch.zeros(2, 77, 8),
        "pooled_prompt_embeds": torch.ones(2, 4),
        "original_sizes": torch.tensor([[64, 48]] * 4),
        "crop_top_lefts": torch.tensor([[3, 0]] * 4),
    }
    assert set(sd15.batch_conditioning(batch, 32)) == {"encoder_hidden_states"}
    added = sdxl.batch_conditioning(batch, 32)
    assert added["add_time_ids"].tolist() == [[64.0, 48.0, 3.0, 0.0, 32.0, 32.0]] * 4


@pytest.mark.parametrize("loss_type", ["dpo", "adaptive"])
def test_a_new_family_trains_through_the_unchanged_loop(tmp_path, loss_type):
    """Two optimizer steps of the step loop (:func:`run_steps`) with the batch encoder, the trainer
    and the loss as ``fastpref train`` runs them; only the family is new."""
    family = ToyFlow()
    config = TrainConfig(loss_type=loss_type, beta=family.defaults.beta, lora_rank=0, metric_warmup_steps=1)
    config = config.for_run(max_train_steps=2, learning_rate=1e-3, mixed_precision="no")
    torch.manual_seed(0)
    denoiser = family.load_denoiser(None, torch.float32)
    initial = [p.detach().clone() for p in denoiser.parameters()]
    trainer = PreferenceTrainer(denoiser, family.load_noise_scheduler(None), config, family=family)
    encode = BatchEncoder(family, None, None, None, family.defaults.resolution, "cpu")
    run = RunArguments(output_dir=str(tmp_path), checkpointing_steps=0, no_progress=True)
    run_steps(trainer, toy_batches(), encode, run, "toy-run", trainer.accelerator)

    assert trainer.global_step == 2 and trainer.skipped_steps == 0
    logs = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert [line["step"] for line in logs] == [1, 2]
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the first step
    assert all(math.isfinite(line["loss"]) for line in logs) and logs[1]["loss"] != logs[0]["loss"]
    assert any(not torch.equal(p, q) for p, q in zip(denoiser.parameters(), initial))
    if loss_type == "adaptive":
        assert trainer.footprints is not None and trainer.footprints.num_updates == 2
