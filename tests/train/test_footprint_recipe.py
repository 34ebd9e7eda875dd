"""``--footprint_recipe authors`` against the authors' code (docs/spec.md §9): footprints stored
and updated as their diffusers ``EMAModel`` moved to the mixed-precision dtype, and the metric
warm-up restarted at every epoch (their ``step >= ema_warmup_steps``, ``step`` the dataloader's
index within the epoch); the default recipe keeps float32 footprints and one warm-up."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from fastpref.testing.tiny_model import unet_kwargs  # noqa: E402
from fastpref.train.trainer import PreferenceTrainer, TrainConfig, metric_is_on  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny UNet's ops are too small to split: one thread is faster, and much faster under load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trainer(micro_steps_per_epoch=None, **overrides):
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_kwargs("sd15"))
    config = TrainConfig(
        **{"max_train_steps": 10, "learning_rate": 1e-2, "lora_rank": 4, "loss_type": "adaptive", **overrides}
    )
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    return PreferenceTrainer(unet, scheduler, config, accelerator, micro_steps_per_epoch=micro_steps_per_epoch)


def _batch(seed: int, pairs: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(2 * pairs, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(pairs, 77, 32, generator=g),
    }


def test_authors_footprints_are_their_ema_model_in_the_mixed_precision_dtype():
    """bf16 footprints of a LoRA adapter equal, bit for bit, diffusers' ``EMAModel`` (decays
    0.9999 and 0.5, its warm-up) moved to bf16 and stepped after every change of the float32 policy."""
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from peft import LoraConfig

    from fastpref.train.footprints import AdapterFootprints

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_kwargs("sd15"))
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    footprints = AdapterFootprints(unet, (0.9999, 0.5), dtype=torch.bfloat16)
    policy = footprints._policy_tensors()
    emas = [EMAModel(list(policy), decay=decay) for decay in footprints.decays]
    for ema in emas:
        ema.to(dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        with torch.no_grad():
            for p in policy:
                p.add_(1e-2 * torch.randn(p.shape, generator=g))
        footprints.update()
        for k, ema in enumerate(emas):
            ema.step(policy)
            for ours, theirs in zip(footprints._tensors(k), ema.shadow_params):
                assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs), (step, k)


def test_fp16_footprints_lose_small_ema_steps():
    """Why the default keeps float32: at update 1000 the 0.9999 footprint moves by 1 - d = 0.9 %
    of its distance to the policy; a 2 % distance is then a step of 1.8e-4, under half an fp16 ulp
    at 1.0 (4.9e-4): fp16 rounds it away and the footprint stands still, float32 keeps it."""
    from fastpref.train.footprints import ema_decay

    weight = 1 - ema_decay(0.9999, 1000, warmup=True)
    policy = torch.full((4,), 1.02)
    half, single = torch.ones(4, dtype=torch.float16), torch.ones(4)
    for footprint in (half, single):
        footprint.sub_(weight * (footprint - policy))  # EMAModel.step's update
    assert torch.equal(half, torch.ones(4, dtype=torch.float16))
    torch.testing.assert_close(single, torch.full((4,), 1 + 0.02 * weight))


def test_trainer_keeps_the_footprints_in_the_recipes_dtype():
    """Under bf16 mixed precision the authors' recipe stores the footprints in bf16, fastpref's in float32."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's state is per process
    try:
        authors = _trainer(footprint_recipe="authors", mixed_precision="bf16")
        default = _trainer(mixed_precision="bf16")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert all(t.dtype == torch.bfloat16 for k in range(2) for t in authors.footprints._tensors(k))
    assert all(t.dtype == torch.float32 for k in range(2) for t in default.footprints._tensors(k))


def test_authors_warmup_restarts_every_epoch():
    """The metric is off for the first ``warmup`` micro-steps of every epoch, as the authors'
    loop (``for epoch ...: for step, batch in enumerate(loader): if step >= ema_warmup_steps``);
    fastpref's recipe warms up once."""
    epochs, per_epoch, warmup = 3, 5, 2
    theirs = [step >= warmup for _ in range(epochs) for step in range(per_epoch)]
    assert [metric_is_on(i, warmup, per_epoch) for i in range(epochs * per_epoch)] == theirs
    assert [metric_is_on(i, warmup) for i in range(epochs * per_epoch)] == [i >= warmup for i in range(15)]
    authors = _trainer(micro_steps_per_epoch=2, footprint_recipe="authors", metric_warmup_steps=1)
    assert [authors.train_step(_batch(i, pairs=1))["metric_on"] for i in range(3)] == [False, True, False]
    ours = _trainer(micro_steps_per_epoch=2, metric_warmup_steps=1)
    assert ours.micro_steps_per_epoch is None  # fastpref's recipe: one warm-up per run


def test_authors_warmup_counts_micro_batches():
    """Their ``ema_warmup_steps = 2`` is multiplied by the accumulation steps once parsed (their
    config.py), and compared with the dataloader's index: 2 x accumulation micro-batches per
    epoch, fastpref's default length in either recipe."""
    for recipe in ("fastpref", "authors"):
        assert TrainConfig(footprint_recipe=recipe, gradient_accumulation_steps=4).warmup_micro_steps == 8


def test_footprint_recipe_is_checked():
    with pytest.raises(ValueError, match="footprint_recipe"):
        TrainConfig(footprint_recipe="paper")
