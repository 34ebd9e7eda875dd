"""``fastpref train`` on the tiny SD3 and FLUX.1 pipelines: LoRA Adaptive-DPO from the latent cache
(text embeddings once per distinct caption) with validation images, checkpoints and a final
folder that the family's diffusers pipeline loads; a full fine-tune that ``from_pretrained`` loads."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from offline import RES  # noqa: E402

from fastpref import cli  # noqa: E402
from fastpref.testing.toy_data import make_toy_data  # noqa: E402

pytestmark = pytest.mark.usefixtures("offline_hub")
QUICK = ["--resolution", str(RES), "--train_batch_size", "2", "--no_progress", "--max_sequence_length", "8"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Four toy pairs at 32 px, the last two with the captions of the first two (as Pick-a-Pic's
    prompts repeat)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("flow_pairs")
    file = make_toy_data(root, pairs=4, resolution=RES)
    table = pq.read_table(file)
    captions = table.column("caption").to_pylist()
    table = table.set_column(table.schema.get_field_index("caption"), "caption", pa.array(captions[:2] * 2))
    pq.write_table(table, file)
    return root


def train(model, data, out, *extra):
    args = ["train", "--pretrained_model_name_or_path", str(model), "--dataset_name", str(data)]
    assert cli.main(args + ["--output_dir", str(out), *QUICK, *map(str, extra)]) == 0
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def pipeline(arch, model, **parts):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    return (StableDiffusion3Pipeline if arch == "sd3" else FluxPipeline).from_pretrained(model, **parts)


def image(pipe):
    return pipe(
        "a red circle",
        num_inference_steps=2,
        height=RES,
        width=RES,
        max_sequence_length=8,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_flow_lora_adaptive_run_from_the_cache(flow_models, pairs, tmp_path, arch):
    from safetensors.torch import load_file

    model, out, cache = flow_models[arch], tmp_path / "out", tmp_path / "cache"
    flags = ["--loss_type", "adaptive", "--metric_warmup_steps", "1", "--max_train_steps", "2"]
    flags += ["--checkpointing_steps", "1", "--learning_rate", "1e-2", "--lora_rank", "4", "--cache_latents"]
    flags += ["--latent_cache_dir", cache]
    logs = train(
        model, pairs, out, *flags, "--run_validation", "--validation_steps", "2", "--validation_prompts",
        "a red circle", "--validation_inference_steps", "1", "--report_to", "tensorboard",
    )  # fmt: skip
    assert [line["step"] for line in logs] == [1, 2] and logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(math.isfinite(line["loss"]) for line in logs)

    if arch == "flux":  # resumed from checkpoint-1 (sigmas and noise are functions of the step): the same step 2
        resumed = tmp_path / "resumed"  # (both families, two processes, SIGKILLed: benchmarks/ddp_flow_check.py)
        shutil.copytree(out / "checkpoint-1", resumed / "checkpoint-1")
        shutil.copyfile(out / "train_log.jsonl", resumed / "train_log.jsonl")
        again = train(model, pairs, resumed, *flags, "--resume_from_checkpoint", "latest", "--report_to", "none")
        assert again == logs
        weights = [load_file(folder / "pytorch_lora_weights.safetensors") for folder in (out, resumed)]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    (folder,) = cache.iterdir()  # text embeddings once per distinct caption, keyed by max_sequence_length
    meta, key = json.loads((folder / "meta.json").read_text()), json.loads((folder / "key.json").read_text())
    assert meta["family"] == arch and (meta["num_captions"], meta["num_rows"]) == (2, 4)
    assert key["text_encoding"] == {"max_sequence_length": 8}
    assert load_file(folder / "text-00000.safetensors")["prompt_embeds"].shape[:2] == (2, 8)

    pipe = pipeline(arch, model)
    base = image(pipe)
    pipe.load_lora_weights(str(out / "checkpoint-1"), adapter_name="step1")
    pipe.load_lora_weights(str(out), adapter_name="final")
    assert set(pipe.get_list_adapters()["transformer"]) == {"step1", "final"}
    assert not np.allclose(image(pipe), base, atol=1e-4)  # the trained adapters change the images
    assert [p.name for p in (out / "validation" / "step-2").iterdir()] == ["00.png"]
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    card = (out / "README.md").read_text()
    assert f"base_model: {model}" in card and "objective **adaptive**" in card and arch in card


def test_flow_full_fine_tune_loads_with_from_pretrained(flow_models, pairs, tmp_path):
    """Uncached (the encoders run every step, offloaded to the CPU between steps), weighted sigmas;
    the transformer folder loads."""
    from diffusers import SD3Transformer2DModel

    model, out = flow_models["sd3"], tmp_path / "out"
    logs = train(
        model, pairs, out, "--loss_type", "dpo", "--lora_rank", "0", "--max_train_steps", "1",
        "--learning_rate", "1e-3", "--checkpointing_steps", "0", "--report_to", "none",
        "--weighting_scheme", "sigma_sqrt", "--offload",
    )  # fmt: skip
    assert len(logs) == 1 and math.isfinite(logs[0]["loss"])
    tuned = SD3Transformer2DModel.from_pretrained(out / "transformer")
    base = SD3Transformer2DModel.from_pretrained(model, subfolder="transformer")
    assert any(not torch.equal(p, q) for p, q in zip(tuned.parameters(), base.parameters()))
    assert image(pipeline("sd3", model, transformer=tuned)).shape == (1, RES, RES, 3)
