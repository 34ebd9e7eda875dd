"""``--fsdp`` (``fastpref.train.sharding``): 2 CPU processes over gloo, FSDP2, against 1 process.

The test launches this file with ``accelerate launch`` (2 processes); :func:`child` trains the
tiny SD 1.5 UNet sharded (DPO, and Adaptive-DPO with K = 2 footprints), checkpoints it with
``torch.distributed.checkpoint``, resumes a fresh trainer from the checkpoint and writes the
consolidated diffusers folder; the test compares the loss curves with one unsharded process
fed the same global batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PAIRS, STEPS, SAVE_AT = 4, 3, 2
OBJECTIVES = {
    "dpo": dict(loss_type="dpo"),
    "adaptive": dict(loss_type="adaptive", global_metric=True, metric_warmup_steps=1, ema_decays=(0.9, 0.5)),
}


def batches():
    g = torch.Generator().manual_seed(0)
    return [
        {
            "latents": torch.randn(2 * PAIRS, 4, 8, 8, generator=g),  # winners, then losers
            "encoder_hidden_states": torch.randn(PAIRS, 77, 32, generator=g),
        }
        for _ in range(STEPS)
    ]


def mine(batch, rank, world):
    """This process's pairs of a global batch (winners and losers alike)."""
    share = PAIRS // world
    rows = slice(rank * share, (rank + 1) * share)
    latents = batch["latents"]
    return {
        "latents": torch.cat([latents[:PAIRS][rows], latents[PAIRS:][rows]]),
        "encoder_hidden_states": batch["encoder_hidden_states"][rows],
    }


def make_trainer(objective, fsdp):
    """A trainer of its own ``Accelerator`` (the processes' state is shared; the checkpoint hooks
    and objects are each accelerator's)."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from fastpref.testing.tiny_model import unet_kwargs
    from fastpref.train.trainer import PreferenceTrainer, TrainConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_kwargs("sd15"))
    config = TrainConfig(lora_rank=0, learning_rate=1e-4, max_train_steps=STEPS, fsdp=fsdp, **OBJECTIVES[objective])
    return PreferenceTrainer(unet, DDPMScheduler(num_train_timesteps=1000), config, Accelerator())


def losses(trainer, steps):
    """The global batch's mean loss of each step of ``steps``."""
    accelerator = trainer.accelerator
    out = []
    for batch in steps:
        loss = trainer.train_step(mine(batch, accelerator.process_index, accelerator.num_processes))["loss"]
        out.append(float(accelerator.reduce(torch.tensor(loss), reduction="mean")))
    return out


def child(folder: Path) -> None:
    from fastpref.train.sharding import full_state_dict, save_pretrained

    result = {}
    for objective in OBJECTIVES:
        trainer = make_trainer(objective, fsdp=True)
        curve = losses(trainer, batches()[:SAVE_AT])
        if objective == "adaptive":
            trainer.accelerator.save_state(str(folder / "checkpoint"))
            at_save = full_state_dict(trainer.unet)
        curve += losses(trainer, batches()[SAVE_AT:])
        result[objective] = curve
    accelerator = trainer.accelerator
    models = [trainer.unet, *trainer.footprints.models]
    ended = [full_state_dict(m) for m in models]
    save_pretrained(trainer.unet, folder / "unet", accelerator.is_main_process)

    resumed = make_trainer("adaptive", fsdp=True)
    resumed.accelerator.load_state(str(folder / "checkpoint"))
    result["resumed_step"] = resumed.global_step
    losses(resumed, batches()[SAVE_AT:])
    again = [full_state_dict(m) for m in [resumed.unet, *resumed.footprints.models]]
    result["bitwise"] = all(torch.equal(a[k], b[k]) for a, b in zip(ended, again) for k in a)
    result["shards"] = [p.to_local().numel() for p in resumed.unet.parameters()][:3]
    result["whole"] = [p.numel() for p in resumed.unet.parameters()][:3]
    if accelerator.is_main_process:
        torch.save(ended[0], folder / "ended.pt")
        torch.save(at_save, folder / "at_save.pt")
        (folder / "result.json").write_text(json.dumps(result))


@pytest.mark.skipif(sys.platform != "linux", reason="CPU process groups through gloo are exercised on Linux")
def test_fsdp_two_processes_match_one_and_resume_bitwise(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("accelerate")
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += [__file__, str(tmp_path)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(root)}
    run = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())

    from diffusers import UNet2DConditionModel

    from fastpref.testing.tiny_model import unet_kwargs
    from fastpref.train.sharding import export_checkpoint

    for objective in OBJECTIVES:
        single = losses(make_trainer(objective, fsdp=False), batches())
        # float rounding only (the sharded reductions sum in another order), grown by the steps: AdamW
        # moves a weight by about the learning rate whatever its gradient's size (as DDP vs 1 process)
        assert result[objective] == pytest.approx(single, rel=1e-2, abs=1e-5), objective
    assert result["resumed_step"] == SAVE_AT and result["bitwise"]
    assert all(2 * s >= w and s < w for s, w in zip(result["shards"], result["whole"]))  # each holds half
    saved = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    ended = torch.load(tmp_path / "ended.pt")
    assert all(torch.equal(saved.state_dict()[k], ended[k]) for k in ended)
    # any checkpoint, consolidated on request in one process
    config = dict(UNet2DConditionModel(**unet_kwargs("sd15")).config, _class_name="UNet2DConditionModel")
    export_checkpoint(tmp_path / "checkpoint", config, tmp_path / "exported")
    exported, at_save = UNet2DConditionModel.from_pretrained(tmp_path / "exported"), torch.load(tmp_path / "at_save.pt")
    assert all(torch.equal(exported.state_dict()[k], at_save[k]) for k in at_save)


def test_unet_blocks_shard_their_transformer_layers_apart():
    """An SD UNet is sharded per transformer layer inside its blocks (SDXL's first up block is
    1.2B parameters whole); each block follows its layers and keeps the rest."""
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel

    from fastpref.testing.tiny_model import unet_kwargs
    from fastpref.train.families import FAMILIES
    from fastpref.train.memory_plan import unit_counts

    unet = UNet2DConditionModel(**unet_kwargs("sdxl"))
    units = FAMILIES["sdxl"].shard_blocks(unet)
    layers = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    assert set(map(id, units)) == set(map(id, layers + blocks)) and len(units) == len(layers) + len(blocks)
    for layer in layers:  # each layer before the block that holds it
        holder = next(b for b in blocks if any(m is layer for m in b.modules()))
        assert units.index(layer) < units.index(holder)
    counts = unit_counts(units)
    whole = sum(p.numel() for b in blocks for p in b.parameters())
    assert sum(counts) == whole and max(counts) < max(sum(p.numel() for p in b.parameters()) for b in blocks)


def test_fsdp_argument_checks():
    from fastpref.train.arguments import ArgumentError, RunArguments
    from fastpref.train.sharding import check_fsdp
    from fastpref.train.trainer import TrainConfig

    with pytest.raises(ValueError, match="fsdp"):
        TrainConfig(fsdp=True, lora_rank=8)
    run = RunArguments(output_dir="out")
    for bad, flag in (({"use_8bit_adam": True}, "use_8bit_adam"), ({"mixed_precision": "fp16"}, "fp16")):
        with pytest.raises(ArgumentError, match=flag):
            check_fsdp(TrainConfig(fsdp=True, lora_rank=0, **bad), run)
    check_fsdp(TrainConfig(fsdp=True, lora_rank=0), RunArguments(output_dir="out", run_validation=True))
    check_fsdp(TrainConfig(lora_rank=8), run)  # no --fsdp: nothing to check


if __name__ == "__main__":
    child(Path(sys.argv[1]))
