"""The trainer: ``fastpref.train.trainer`` units and ``fastpref train`` end to end on the tiny models.

End-to-end runs use the offline tiny pipelines (``fastpref make-tiny-model``) and generated
Pick-a-Pic parquet data (``fastpref make-toy-data``), built once per session.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from fastpref import reference  # noqa: E402
from fastpref.testing.tiny_model import make_tiny_model, unet_kwargs  # noqa: E402
from fastpref.testing.toy_data import make_toy_data  # noqa: E402
from fastpref.train.footprints import ema_decay  # noqa: E402
from fastpref.train.trainer import PreferenceTrainer, TrainConfig, step_seed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FASTPREF = [sys.executable, "-m", "fastpref.cli"]
QUIET = ["--report_to", "none", "--no_progress"]


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Tiny sd15 and sdxl pipelines and a toy data folder (24 rows: 2 ties, 1 corrupt)."""
    root = tmp_path_factory.mktemp("train_world")
    make_tiny_model(root / "sd15", arch="sd15")
    make_tiny_model(root / "sdxl", arch="sdxl")
    make_toy_data(root / "data", pairs=24, ties=2, corrupt=1)
    make_toy_data(root / "judged", pairs=24, judge=True)
    return root


def run_train(world, out, *extra, model="sd15", check=True, env=None, launcher=None):
    args = [
        "--pretrained_model_name_or_path",
        str(world / model),
        "--dataset_name",
        str(world / "data"),
        "--output_dir",
        str(out),
        "--resolution",
        "64",
        *QUIET,
        *map(str, extra),
    ]
    command = FASTPREF + ["train"] + args if launcher is None else launcher + args
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600
    )
    if check and result.returncode != 0:
        raise AssertionError(f"train failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def log_lines(out):
    return [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]


def tiny_unet(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_kwargs("sd15"))


def toy_batch(pairs=2, seed=0, flipped=None):
    g = torch.Generator().manual_seed(seed)
    batch = {
        "latents": torch.randn(2 * pairs, 4, 8, 8, generator=g),  # winners, then losers
        "encoder_hidden_states": torch.randn(pairs, 77, 32, generator=g),
    }
    if flipped is not None:
        batch["flipped"] = torch.tensor(flipped)
    return batch


def make_trainer(**overrides):
    from diffusers import DDPMScheduler

    config = TrainConfig(**{"max_train_steps": 10, "learning_rate": 1e-3, "lora_rank": 4, **overrides})
    return PreferenceTrainer(tiny_unet(), DDPMScheduler(num_train_timesteps=1000), config)


# --------------------------------------------------------------------------------------------
# units
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("loss_type", "kto", "loss_type"),
        ("mixed_precision", "fp8", "mixed_precision"),
        ("gradient_accumulation_steps", 0, "gradient_accumulation_steps"),
        ("lora_rank", -1, "lora_rank"),
        ("learning_rate", 0.0, "learning_rate"),
        ("beta", -1.0, "beta"),
        ("weighting", "cubic", "weighting"),
        ("ema_decays", (), "ema_decays"),
        ("metric_warmup_steps", -1, "metric_warmup_steps"),
    ],
)
def test_config_errors_name_the_field(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        TrainConfig(**{field: value})


def test_config_defaults_per_loss_type():
    assert TrainConfig(loss_type="adaptive").uses_footprints
    assert TrainConfig(loss_type="adaptive-ipo").loss_keywords(True)["loss_type"] == "ipo"
    assert not TrainConfig(loss_type="dpo").uses_footprints
    assert not TrainConfig(loss_type="sft").uses_footprints
    assert TrainConfig(loss_type="dedpo", weighting="linear").uses_footprints
    warm = TrainConfig(loss_type="adaptive").loss_keywords(metric_on=False)
    assert warm["weighting"] == "none" and warm["k2"] == 0.0 and warm["margin"] == "quadratic"
    assert TrainConfig(gradient_accumulation_steps=3).warmup_micro_steps == 6


def test_warmup_keywords_mean_u_is_zero():
    """The warm-up keywords (the authors' u := 0) give W = 1 and Gamma = c2 = mean(l)."""
    torch.manual_seed(0)
    model, ref, target = (
        torch.randn(8, 16, dtype=torch.float64),
        torch.randn(8, 16, dtype=torch.float64),
        torch.randn(4, 16, dtype=torch.float64),
    )
    keywords = TrainConfig(loss_type="adaptive").loss_keywords(metric_on=False)
    keywords.pop("backend")
    _, stats = reference.adaptive_dpo_loss(model, ref, target, return_stats=True, **keywords)
    assert torch.equal(stats["weight"], torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(stats["margin"], stats["l_theta"].mean().expand(4))


def test_ema_decay_schedule_matches_diffusers_emamodel():
    from diffusers.training_utils import EMAModel

    param = torch.nn.Parameter(torch.zeros(3))
    ema = EMAModel([param], decay=0.9)
    shadow = torch.zeros(3)
    for n in range(30):
        with torch.no_grad():
            param.add_(1.0)
        ema.step([param])
        shadow.lerp_(param.detach(), 1 - ema_decay(0.9, n, warmup=True))
        torch.testing.assert_close(ema.shadow_params[0], shadow)
    assert ema_decay(0.5, 100, warmup=False) == 0.5


def test_adapter_footprints_track_policy_and_restore_it():
    trainer = make_trainer(loss_type="adaptive", ema_decays=(0.9, 0.5), ema_warmup=False, metric_warmup_steps=0)
    unet = trainer.base_unet
    fp = trainer.footprints
    before = [[t.clone() for t in fp._tensors(k)] for k in range(2)]
    policy_before = [p.detach().clone() for p in fp._policy_tensors()]
    trainer.train_step(toy_batch())
    policy = fp._policy_tensors()
    assert any(not torch.equal(a, b) for a, b in zip(policy_before, policy))
    for k, decay in enumerate((0.9, 0.5)):
        for old, new, p in zip(before[k], fp._tensors(k), policy):
            torch.testing.assert_close(new, old.lerp(p.detach(), 1 - decay))
    # evaluation switches adapters and back: the policy stays trainable, the footprints frozen
    with fp.use(1):
        assert unet.active_adapters() == ["ema_1"]
        assert all(p.requires_grad for p in policy)
    assert unet.active_adapters() == ["default"]
    assert all(p.requires_grad for p in policy)
    assert not any(t.requires_grad for k in range(2) for t in fp._tensors(k))
    assert {id(p) for p in trainer.params} == {id(p) for p in policy}


def _two_adapter_layer():
    """A peft LoRA linear layer with adapters ``default`` (trainable) and ``ema_0`` (frozen)."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    for name in ("default", "ema_0"):
        config = LoraConfig(r=2, lora_alpha=2, target_modules=["0"], init_lora_weights=False)
        model = inject_adapter_in_model(config, model, adapter_name=name)
    layer = model[0]
    layer.set_adapter("default")  # ema_0 frozen
    return layer


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_adapter_switches_match_peft_and_leave_the_flags():
    """fastpref's switches give bitwise peft's outputs and leave every requires_grad flag alone;
    a peft whose layers stop reading the switched state fails at ``lora_layers``."""
    from fastpref.train.footprints import adapter_active, adapters_disabled, lora_layers

    layer = _two_adapter_layer()
    layers = lora_layers(torch.nn.Sequential(layer))
    flags = [p.requires_grad for p in layer.parameters()]
    x = torch.randn(3, 4)
    with torch.no_grad():
        with adapter_active(layers, "ema_0"):
            ema = layer(x)
            assert [p.requires_grad for p in layer.parameters()] == flags
        with adapters_disabled(layers):
            base = layer(x)
        policy = layer(x)
        layer.set_adapter("ema_0")
        expected_ema = layer(x)
        layer.enable_adapters(False)
        expected_base = layer(x)
        layer.enable_adapters(True)
        layer.set_adapter("default")
    assert torch.equal(ema, expected_ema) and torch.equal(base, expected_base)
    assert torch.equal(policy, layer(x)) and not torch.equal(policy, ema) and not torch.equal(policy, base)

    class Renamed(type(layer)):
        disable_adapters = property(lambda self: False)  # no longer reads _disable_adapters

    layer.__class__ = Renamed
    with pytest.raises(RuntimeError, match="_disable_adapters"):
        lora_layers(torch.nn.Sequential(layer))


def test_footprint_forward_equals_a_model_with_those_weights():
    """An EMA forward through adapter switching equals the policy forward with the EMA weights."""
    trainer = make_trainer(loss_type="adaptive", ema_decays=(0.5,), metric_warmup_steps=0)
    for seed in range(3):
        trainer.train_step(toy_batch(seed=seed))
    unet, fp = trainer.base_unet, trainer.footprints
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    with torch.no_grad(), fp.use(0):
        ema_out = unet(x, t, cond).sample
    saved = [p.detach().clone() for p in fp._policy_tensors()]
    with torch.no_grad():
        torch._foreach_copy_(fp._policy_tensors(), fp._tensors(0))
        swapped = unet(x, t, cond).sample
        torch._foreach_copy_(fp._policy_tensors(), saved)
    torch.testing.assert_close(ema_out, swapped, rtol=0, atol=0)


def test_lora_reference_is_the_base_model():
    from diffusers import UNet2DConditionModel

    trainer = make_trainer(loss_type="dpo")
    for seed in range(2):
        trainer.train_step(toy_batch(seed=seed))
    base = tiny_unet().eval()
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.randn(2, 77, 32)
    with torch.no_grad():
        expected = base(x, t, cond).sample
        policy = trainer.base_unet(x, t, cond).sample
    got = trainer._reference_pred(x, t, {"encoder_hidden_states": cond, "added_cond_kwargs": None})
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(policy, expected)  # the policy did move
    assert isinstance(base, UNet2DConditionModel)


def test_full_finetune_reference_is_frozen_initial_weights():
    trainer = make_trainer(loss_type="dpo", lora_rank=0)
    initial = {k: v.clone() for k, v in tiny_unet().state_dict().items()}
    for seed in range(2):
        trainer.train_step(toy_batch(seed=seed))
    assert all(torch.equal(trainer.reference.state_dict()[k], v) for k, v in initial.items())
    assert not all(torch.equal(trainer.base_unet.state_dict()[k], v) for k, v in initial.items())
    assert not any(p.requires_grad for p in trainer.reference.parameters())


def test_noise_is_shared_within_a_pair_and_sliced_from_the_global_batch():
    from fastpref.train.data import collate_pairs

    trainer = make_trainer(loss_type="dpo")
    latents = collate_pairs([{"latents": torch.zeros(2, 4, 8, 8)}] * 3)["latents"]  # 3 pairs, [2B, ...]
    noise, timesteps = trainer._noise(latents)
    assert noise.shape == latents.shape and torch.equal(noise[:3], noise[3:])
    assert timesteps.shape == (6,) and torch.equal(timesteps[:3], timesteps[3:])
    # the same draw as process 0 of a 1-process run of the global batch, from (seed, micro_step)
    g = torch.Generator().manual_seed(step_seed(trainer.config.seed, trainer.micro_step))
    torch.testing.assert_close(noise[:3], torch.randn(3, 4, 8, 8, generator=g))
    assert step_seed(0, 1) != step_seed(1, 0)


def test_sft_trains_on_winners_only():
    trainer = make_trainer(loss_type="sft")
    out = trainer.train_step(toy_batch())
    assert "implicit_acc" not in out and out["stepped"] and out["loss"] > 0


def test_gradient_accumulation_window_and_flip_stats():
    trainer = make_trainer(loss_type="adaptive", gradient_accumulation_steps=2, metric_warmup_steps=0)
    first = trainer.train_step(toy_batch(flipped=[True, False]))
    second = trainer.train_step(toy_batch(seed=1, flipped=[True, False]))
    assert not first["stepped"] and second["stepped"] and trainer.global_step == 1
    assert "u_flipped" in second and "u_kept" in second and second["u"].shape == (2,)


def test_nonfinite_loss_skips_the_step_then_aborts():
    from fastpref.train.trainer import NonFiniteLossError

    trainer = make_trainer(loss_type="dpo", max_nonfinite_steps=2)
    before = [p.detach().clone() for p in trainer.params]
    out = trainer.train_step(toy_batch())
    assert out["stepped"] and not out["skipped"]
    after_first = [p.detach().clone() for p in trainer.params]
    assert any(not torch.equal(a, b) for a, b in zip(before, after_first))
    bad = toy_batch(seed=1)
    bad["latents"][0, 0, 0, 0] = float("nan")
    out = trainer.train_step(bad)
    assert out["skipped"] and trainer.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(after_first, trainer.params))  # the skipped step changed nothing
    with pytest.raises(NonFiniteLossError, match="2 optimizer steps in a row"):
        trainer.train_step(bad)


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------

# The flags the README documents (diffusers' names where the concept is the same).
DOCUMENTED_FLAGS = """--pretrained_model_name_or_path --dataset_name --output_dir --resolution --train_batch_size
--gradient_accumulation_steps --max_train_steps --learning_rate --lr_scheduler --lr_warmup_steps --beta_dpo
--loss_type --rho --k1 --weighting --margin --metric_preset --ema_decays --lora_rank --mixed_precision
--gradient_checkpointing --checkpointing_steps --resume_from_checkpoint --seed --flip_rate --flip_seed
--keep_ties --cache_latents --report_to --use_8bit_adam --global_metric --human_fraction --rank --revision --variant
--pretrained_vae_model_name_or_path --run_validation --validation_steps --validation_prompts
--validation_inference_steps --is_turbo --push_to_hub --hub_model_id --hub_token --allow_tf32
--enable_xformers_memory_efficient_attention --logging_dir --tracker_name""".split()


def test_help_documents_every_flag():
    from fastpref.train.arguments import build_parser

    parser = build_parser()
    options = {o for action in parser._actions for o in action.option_strings}
    assert set(DOCUMENTED_FLAGS) <= options, set(DOCUMENTED_FLAGS) - options
    undocumented = [a.option_strings for a in parser._actions if a.option_strings and a.dest != "help" and not a.help]
    assert not undocumented
    text = subprocess.run(FASTPREF + ["train", "--help"], capture_output=True, text=True, cwd=ROOT).stdout
    for flag in DOCUMENTED_FLAGS:
        assert flag in text


@pytest.mark.parametrize(
    "model, lora_rank, loss_type, extra",
    [
        ("sd15", 4, "adaptive", ["--flip_rate", "0.5", "--metric_warmup_steps", "1"]),
        ("sd15", 0, "ipo", ["--gradient_accumulation_steps", "2"]),
        ("sdxl", 4, "dpo", ["--cache_latents"]),
        ("sdxl", 0, "adaptive-ipo", ["--metric_warmup_steps", "0", "--report_to", "tensorboard"]),
    ],
)
def test_end_to_end(world, tmp_path, model, lora_rank, loss_type, extra):
    out = tmp_path / "out"
    extra = list(extra)
    if "--cache_latents" in extra:
        extra += ["--latent_cache_dir", str(tmp_path / "cache")]
    quiet = [a for a in extra if a != "tensorboard"]
    if "--report_to" in quiet:
        quiet.remove("--report_to")
    args = [
        "--train_batch_size",
        2,
        "--max_train_steps",
        3,
        "--checkpointing_steps",
        2,
        "--lora_rank",
        lora_rank,
        "--loss_type",
        loss_type,
        *quiet,
    ]
    if "tensorboard" in extra:
        args += ["--report_to", "tensorboard"]
    run_train(world, out, *args, model=model)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 3 and summary["arch"] == model
    assert summary["data"]["undecodable"] == (1 if "--cache_latents" in extra else 0)  # else found at fetch
    assert summary["data"]["ties_dropped"] == 2
    lines = log_lines(out)
    assert [line["step"] for line in lines] == [1, 2, 3] and all(map(lambda x: x["loss"] == x["loss"], lines))
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-3").is_dir()
    assert not list(out.glob("*.partial"))
    if "--flip_rate" in extra:
        assert any("u_flipped" in line for line in lines)
    if "tensorboard" in extra:
        assert list((out / "logs").rglob("events.out.tfevents.*"))
    if lora_rank:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        pipeline_class = StableDiffusionXLPipeline if model == "sdxl" else StableDiffusionPipeline
        pipe = pipeline_class.from_pretrained(world / model)
        pipe.load_lora_weights(str(out))  # the saved LoRA loads as diffusers users load it
        assert pipe.unet.peft_config
    else:
        from diffusers import UNet2DConditionModel

        trained = UNet2DConditionModel.from_pretrained(out / "unet")
        base = UNet2DConditionModel.from_pretrained(world / model, subfolder="unet")
        assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), base.state_dict().values()))
    if "--cache_latents" in extra:  # a second run hits the cache
        again = run_train(world, tmp_path / "again", *args, model=model)
        assert "latent cache hit" in again.stderr


def test_dedpo_end_to_end(world, tmp_path):
    out = tmp_path / "out"
    run_train(
        world,
        out,
        "--dataset_name",
        str(world / "judged"),
        "--loss_type",
        "dedpo",
        "--human_fraction",
        "0.25",
        "--train_batch_size",
        2,
        "--max_train_steps",
        2,
        "--checkpointing_steps",
        100,
    )
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 2
    assert summary["judge_agreement"]["num_labelled"] >= 1 and 0.0 <= summary["judge_agreement"]["accuracy"] <= 1.0


def test_nonfinite_abort_saves_a_checkpoint(world, tmp_path):
    out = tmp_path / "out"
    result = run_train(
        world,
        out,
        "--loss_type",
        "dpo",
        "--max_nonfinite_steps",
        2,
        "--lora_rank",
        0,
        "--max_grad_norm",
        0,
        "--train_batch_size",
        2,
        "--max_train_steps",
        20,
        "--learning_rate",
        1e12,
        check=False,
    )
    assert result.returncode == 3, result.stderr[-2000:]
    assert "non-finite" in result.stderr
    assert list(out.glob("checkpoint-*"))
    assert json.loads((out / "train_summary.json").read_text())["state"] == "aborted"


def test_bad_arguments_fail_with_a_message(world, tmp_path):
    result = run_train(world, tmp_path / "o", "--loss_type", "dedpo", "--max_train_steps", 1, check=False)
    assert result.returncode == 2 and "human_fraction" in result.stderr
    result = run_train(world, tmp_path / "o", "--resume_from_checkpoint", "checkpoint-99", check=False)
    assert result.returncode == 2 and "resume_from_checkpoint" in result.stderr


def test_resume_after_sigkill_is_bitwise(world, tmp_path):
    """A run killed with SIGKILL right after a checkpoint, resumed with ``latest``, ends with
    bitwise the same LoRA weights, EMA footprints and log as an uninterrupted run."""
    from safetensors.torch import load_file

    args = [
        "--loss_type",
        "adaptive",
        "--metric_warmup_steps",
        1,
        "--train_batch_size",
        2,
        "--max_train_steps",
        6,
        "--checkpointing_steps",
        2,
        "--flip_rate",
        0.2,
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        2,
    ]
    run_train(world, tmp_path / "a", *args)
    killed = tmp_path / "b"
    command = FASTPREF + [
        "train",
        "--pretrained_model_name_or_path",
        str(world / "sd15"),
        "--dataset_name",
        str(world / "data"),
        "--output_dir",
        str(killed),
        "--resolution",
        "64",
        *QUIET,
        *map(str, args),
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint-2").is_dir() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert json.loads((killed / "train_summary.json").read_text())["state"] == "running", "it finished first"
    run_train(world, killed, *args, "--resume_from_checkpoint", "latest")
    a, b = (
        load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors"),
        load_file(killed / "pytorch_lora_weights.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = [
        torch.load(d / "checkpoint-6" / "custom_checkpoint_1.pkl", weights_only=False) for d in (tmp_path / "a", killed)
    ]
    for x, y in zip(state[0]["footprints"]["tensors"], state[1]["footprints"]["tensors"]):
        assert all(torch.equal(s, t) for s, t in zip(x, y))
    assert log_lines(tmp_path / "a") == log_lines(killed)


@pytest.mark.skipif(sys.platform != "linux", reason="CPU DDP through gloo is exercised on Linux")
@pytest.mark.parametrize("loss", [["--loss_type", "dpo"], ["--loss_type", "adaptive", "--global_metric"]])
def test_two_process_ddp_matches_one_process(world, tmp_path, loss):
    """From the same checkpoint (policy and footprints already apart), one more step on 2 CPU
    processes x 2 pairs gives the loss of 1 process x 4 pairs (the global batch)."""
    import shutil

    common = [*loss, "--lora_rank", 0, "--metric_warmup_steps", 1, "--learning_rate", 1e-3, "--checkpointing_steps", 4]
    one = tmp_path / "one"
    run_train(world, one, *common, "--train_batch_size", 4, "--max_train_steps", 4)
    two = tmp_path / "two"
    shutil.copytree(one, two)
    run_train(
        world, one, *common, "--train_batch_size", 4, "--max_train_steps", 5, "--resume_from_checkpoint", "latest"
    )
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "fastpref.train",
    ]
    run_train(
        world,
        two,
        *common,
        "--train_batch_size",
        2,
        "--max_train_steps",
        5,
        "--resume_from_checkpoint",
        "latest",
        launcher=launcher,
        env={"ACCELERATE_USE_CPU": "1"},
    )
    assert json.loads((two / "train_summary.json").read_text())["processes"] == 2
    single, ddp = log_lines(one)[-1], log_lines(two)[-1]
    assert single["step"] == ddp["step"] == 5
    # the two differ only by float rounding (batch-size-dependent kernels, the all-reduce)
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-3, abs=1e-5)
