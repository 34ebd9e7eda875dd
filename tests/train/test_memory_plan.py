"""The memory plan (``fastpref.train.memory_plan``, ``fastpref train --print_memory_plan``)."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

from fastpref.testing.tiny_model import make_tiny_model  # noqa: E402
from fastpref.train import memory_plan  # noqa: E402
from fastpref.train.memory_plan import Flags, ParameterCounts, plan  # noqa: E402

COUNTS = ParameterCounts(denoiser=1000, trainable=1000, largest_tensor=100, blocks=(300, 300), encoders=50, buffers=10)


def test_full_finetune_bytes_per_parameter_under_ddp_and_fsdp():
    flags = Flags(lora_rank=0, mixed_precision="bf16", num_footprints=2)
    one = plan(COUNTS, flags, 1, fsdp=False).parts
    # float32 policy, float32 gradients, AdamW's two float32 states, bf16 reference, 2 float32 footprints
    assert (one["policy"], one["gradients"], one["optimizer"], one["reference"], one["footprints"]) == (
        4000,
        4000,
        8000,
        2000,
        8000,
    )
    assert one["encoders"] == 100 and one["step_temp"] == 4000 and one["gathered"] == 0
    assert one["buffers"] == 10 * (4 + 2 + 2 * 4)  # policy, reference, 2 footprints
    assert plan(COUNTS, flags, 2, fsdp=False).parts["gradients"] == 8000  # DDP's buckets beside .grad
    four = plan(COUNTS, flags, 4, fsdp=True).parts
    for name in ("policy", "gradients", "optimizer", "reference", "footprints", "step_temp"):
        assert four[name] == one[name] / 4
    assert four["encoders"] == one["encoders"] and four["buffers"] == one["buffers"]  # not sharded
    # the root's 400 parameters and two 300-parameter blocks gathered in bf16, one block's gradient
    assert four["gathered"] == (400 + 2 * 300) * 2 + 300 * 4


def test_lora_and_8bit_adam():
    lora = ParameterCounts(denoiser=1000, trainable=10, largest_tensor=5, blocks=())
    parts = plan(lora, Flags(lora_rank=4, mixed_precision="fp16", num_footprints=1, use_8bit_adam=True), 1, False).parts
    assert parts["policy"] == 1000 * 2 + 10 * 4 and parts["reference"] == 0 and parts["footprints"] == 40
    assert parts["optimizer"] == pytest.approx(10 * (2 + 8 / 256))
    with pytest.raises(ValueError, match="fsdp"):
        plan(lora, Flags(lora_rank=4), 2, fsdp=True)


def test_print_memory_plan_counts_the_model_and_trains_nothing(tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from fastpref.testing.toy_data import make_toy_data
    from fastpref.train.cli import main

    model = make_tiny_model(tmp_path / "sd15", arch="sd15")
    make_toy_data(tmp_path / "data", pairs=4)
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", str(model), "--dataset_name", str(tmp_path / "data")]
    argv += ["--output_dir", str(out), "--resolution", "64", "--lora_rank", "0", "--print_memory_plan"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    assert f"denoiser {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M" in text
    assert "| EMA footprints |" in text and "FSDP x8" in text and "activations (range)" in text
    counts = memory_plan.count_parameters(unet, [], 8, ("to_q", "to_k", "to_v", "to_out.0"))
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    assert counts.trainable == sum(p.numel() for p in unet.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_flow_families_plan_their_transformer_blocks(flow_models, tiny_run, tmp_path, capsys, arch):
    import torch
    from diffusers.models import FluxTransformer2DModel, SD3Transformer2DModel

    from fastpref.train.cli import main
    from fastpref.train.families import FAMILIES

    argv = ["--pretrained_model_name_or_path", str(flow_models[arch]), "--dataset_name", str(tiny_run["data"])]
    argv += ["--output_dir", str(tmp_path / "out"), "--resolution", "32", "--lora_rank", "0", "--print_memory_plan"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert not (tmp_path / "out").exists() and "| FSDP all-gathered blocks |" in text
    cls = SD3Transformer2DModel if arch == "sd3" else FluxTransformer2DModel
    with torch.device("meta"):
        transformer = cls.from_config(cls.load_config(flow_models[arch], subfolder="transformer"))
    shards = FAMILIES[arch].shard_blocks(transformer)
    expected = [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", [])]
    assert len(expected) > 0 and shards == expected and f"{len(shards)} FSDP blocks" in text


def test_a_resume_may_print_its_memory_plan():
    from fastpref.train import checks

    refused, changed = checks.resume_differences({"print_memory_plan": False}, {"print_memory_plan": True})
    assert refused == [] and changed == ["--print_memory_plan False (this command: True)"]
