"""diffusers' DPO training commands run unchanged: the SD and SDXL commands
of diffusers' ``examples/research_projects/diffusion_dpo/README.md`` parse to diffusers' meaning
and train on the tiny models, through ``accelerate launch -m fastpref.train`` and through
``fastpref train``, with validation images, LoRA checkpoints diffusers loads and a model card."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from offline import ROOT  # noqa: E402

from fastpref.train import arguments  # noqa: E402
from fastpref.train.config import TrainConfig  # noqa: E402
from fastpref.train.families import FAMILIES  # noqa: E402
from fastpref.train.run import allow_tf32  # noqa: E402

# Verbatim from diffusers' examples/research_projects/diffusion_dpo/README.md.
SD_COMMAND = r"""accelerate launch train_diffusion_dpo.py \
  --pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5  \
  --output_dir="diffusion-dpo" \
  --mixed_precision="fp16" \
  --dataset_name=kashif/pickascore \
  --resolution=512 \
  --train_batch_size=16 \
  --gradient_accumulation_steps=2 \
  --gradient_checkpointing \
  --use_8bit_adam \
  --rank=8 \
  --learning_rate=1e-5 \
  --report_to="wandb" \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --max_train_steps=10000 \
  --checkpointing_steps=2000 \
  --run_validation --validation_steps=200 \
  --seed="0" \
  --report_to="wandb" \
  --push_to_hub"""

SDXL_COMMAND = r"""accelerate launch train_diffusion_dpo_sdxl.py \
  --pretrained_model_name_or_path=stabilityai/stable-diffusion-xl-base-1.0  \
  --pretrained_vae_model_name_or_path=madebyollin/sdxl-vae-fp16-fix \
  --output_dir="diffusion-sdxl-dpo" \
  --mixed_precision="fp16" \
  --dataset_name=kashif/pickascore \
  --train_batch_size=8 \
  --gradient_accumulation_steps=2 \
  --gradient_checkpointing \
  --use_8bit_adam \
  --rank=8 \
  --learning_rate=1e-5 \
  --report_to="wandb" \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --max_train_steps=2000 \
  --checkpointing_steps=500 \
  --run_validation --validation_steps=50 \
  --seed="0" \
  --report_to="wandb" \
  --push_to_hub"""

TURBO_COMMAND = r"""accelerate launch train_diffusion_dpo_sdxl.py \
  --pretrained_model_name_or_path=stabilityai/sdxl-turbo \
  --pretrained_vae_model_name_or_path=madebyollin/sdxl-vae-fp16-fix \
  --output_dir="diffusion-sdxl-turbo-dpo" \
  --mixed_precision="fp16" \
  --dataset_name=kashif/pickascore \
  --train_batch_size=8 \
  --gradient_accumulation_steps=2 \
  --gradient_checkpointing \
  --use_8bit_adam \
  --rank=8 \
  --learning_rate=1e-5 \
  --report_to="wandb" \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --max_train_steps=2000 \
  --checkpointing_steps=500 \
  --run_validation --validation_steps=50 \
  --seed="0" \
  --report_to="wandb" \
  --is_turbo --resolution 512 \
  --push_to_hub"""

# What each flag of the three commands means in diffusers' scripts, as fastpref's fields.
MEANING = {
    "pretrained_vae_model_name_or_path": "madebyollin/sdxl-vae-fp16-fix",
    "mixed_precision": "fp16",
    "dataset_name": "kashif/pickascore",
    "gradient_accumulation_steps": 2,
    "gradient_checkpointing": True,
    "use_8bit_adam": True,
    "lora_rank": 8,
    "learning_rate": 1e-5,
    "report_to": "wandb",
    "lr_scheduler": "constant",
    "lr_warmup_steps": 0,
    "run_validation": True,
    "seed": 0,
    "push_to_hub": True,
}
COMMANDS = {
    "sd": (SD_COMMAND, dict(output_dir="diffusion-dpo", resolution=512, train_batch_size=16)),
    "sdxl": (SDXL_COMMAND, dict(output_dir="diffusion-sdxl-dpo", train_batch_size=8)),
    "turbo": (TURBO_COMMAND, dict(output_dir="diffusion-sdxl-turbo-dpo", train_batch_size=8, resolution=512)),
}
COMMANDS["sd"][1].update(max_train_steps=10000, checkpointing_steps=2000, validation_steps=200)
COMMANDS["sdxl"][1].update(max_train_steps=2000, checkpointing_steps=500, validation_steps=50)
COMMANDS["turbo"][1].update(max_train_steps=2000, checkpointing_steps=500, validation_steps=50, is_turbo=True)
BARE = ["--pretrained_model_name_or_path=m", "--dataset_name=d", "--output_dir=o"]

# Every flag of diffusers' train_diffusion_dpo.py and train_diffusion_dpo_sdxl.py that is not
# about reading the data (--dataset_split_name --vae_encode_batch_size --no_hflip --random_crop are
# the data loader's flags, tested with the data sources).
DIFFUSERS_FLAGS = """--pretrained_model_name_or_path --revision --variant --pretrained_vae_model_name_or_path
--dataset_name --max_train_samples --output_dir --cache_dir --seed --resolution --train_batch_size
--num_train_epochs --max_train_steps --checkpointing_steps --checkpoints_total_limit --resume_from_checkpoint
--gradient_accumulation_steps --gradient_checkpointing --beta_dpo --loss_type --learning_rate --scale_lr
--lr_scheduler --lr_warmup_steps --lr_num_cycles --lr_power --dataloader_num_workers --use_8bit_adam
--adam_beta1 --adam_beta2 --adam_weight_decay --adam_epsilon --max_grad_norm --push_to_hub --hub_token
--hub_model_id --logging_dir --allow_tf32 --report_to --mixed_precision --prior_generation_precision
--local_rank --enable_xformers_memory_efficient_attention --rank --tracker_name --run_validation
--validation_steps --is_turbo --dataset_split_name --vae_encode_batch_size --no_hflip --random_crop""".split()
# diffusers' defaults that fastpref shares (the others are arguments.DIFFUSERS_DEFAULTS, logged at start-up).
SHARED_DEFAULTS = dict(
    train_batch_size=4,
    vae_encode_batch_size=8,
    dataloader_num_workers=0,
    no_hflip=False,
    random_crop=False,
    num_train_epochs=1,
    checkpointing_steps=500,
    checkpoints_total_limit=None,
    gradient_accumulation_steps=1,
    lr_scheduler="constant",
    lr_num_cycles=1,
    lr_power=1.0,
    adam_beta1=0.9,
    adam_beta2=0.999,
    adam_weight_decay=1e-2,
    adam_epsilon=1e-8,
    max_grad_norm=1.0,
    logging_dir="logs",
    report_to="tensorboard",
    validation_steps=200,
    local_rank=-1,
    prior_generation_precision=None,
    push_to_hub=False,
    run_validation=False,
    allow_tf32=False,
    is_turbo=False,
    max_train_steps=None,
    mixed_precision=None,
)

# Appended after the verbatim flags of a run (the last value of a flag wins), so that it takes
# seconds on 2 CPU cores: 2 steps instead of thousands; the toy data's 32 px instead of 512 /
# 1024; 2 pairs per process (the toy data has 12); a checkpoint and a validation at every step
# (to see both, where the commands ask for them every 200-2000 steps); one validation prompt
# instead of 4, with 1 denoising step; TensorBoard beside the commands' wandb (offline), to read
# the images back.
OVERRIDES = ["--max_train_steps", "2", "--resolution", "32", "--train_batch_size", "2"]
OVERRIDES += ["--checkpointing_steps", "1", "--validation_steps", "1", "--report_to", "all"]
OVERRIDES += ["--validation_prompts", "a red circle on a blue background", "--validation_inference_steps", "1"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
ACCELERATE += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fastpref.train"]
FASTPREF_TRAIN = [sys.executable, "-m", "fastpref.cli", "train"]


def flags_of(command: str) -> list:
    """The arguments of a README command, after ``accelerate launch SCRIPT``."""
    return shlex.split(command.replace("\\\n", " "))[3:]


def adapted(command: str, model, data, vae=None) -> list:
    """The command's flags, verbatim but for the model, VAE and dataset paths, ``--mixed_precision
    no`` (no fp16 on CPU), and without ``--use_8bit_adam`` (bitsandbytes needs CUDA) and
    ``--push_to_hub`` (offline)."""
    paths = {
        "--pretrained_model_name_or_path": model,
        "--pretrained_vae_model_name_or_path": vae,
        "--dataset_name": data,
        "--mixed_precision": "no",
    }
    args = []
    for arg in flags_of(command):
        name = arg.partition("=")[0]
        if name in ("--use_8bit_adam", "--push_to_hub"):
            continue
        args.append(f"{name}={paths[name]}" if name in paths else arg)
    return args


# --------------------------------------------------------------------------------------------
# the flags, parsed
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", COMMANDS)
def test_the_verbatim_command_parses_to_diffusers_meaning(name):
    """Every flag of the command, with nothing changed, gives fastpref's field diffusers' value."""
    command, own = COMMANDS[name]
    argv = flags_of(command)
    data_args, settings, run = arguments.parse_args(argv)
    values = {**vars(data_args), **settings, **vars(run)}
    given = arguments.given_flags(argv)
    expected = {"pretrained_model_name_or_path": argv[0].partition("=")[2], **MEANING, **own}
    if name == "sd":
        del expected["pretrained_vae_model_name_or_path"]
    assert given == set(expected)  # every flag of the command is checked below
    assert {k: values[k] for k in expected} == expected
    assert TrainConfig(**{**settings, "beta": 2500.0, "k1": 1.0, "max_train_steps": 1}).lora_rank == 8


def test_every_diffusers_flag_is_accepted_with_its_default():
    parser = arguments.build_parser()
    options = {option for action in parser._actions for option in action.option_strings}
    assert set(DIFFUSERS_FLAGS) <= options, set(DIFFUSERS_FLAGS) - options
    data_args, settings, run = arguments.parse_args(BARE)
    values = {**vars(data_args), **settings, **vars(run)}
    assert {k: values[k] for k in SHARED_DEFAULTS} == SHARED_DEFAULTS


def test_loss_type_sigmoid_is_dpo():
    _, settings, _ = arguments.parse_args([*BARE, "--loss_type", "sigmoid"])
    config = TrainConfig(**{**settings, "beta": 2500.0, "k1": 1.0, "max_train_steps": 1, "mixed_precision": "no"})
    assert config.loss_type == "dpo" and config.loss_keywords(True)["loss_type"] == "sigmoid"
    assert TrainConfig(loss_type="hinge").loss_type == "hinge" and TrainConfig(loss_type="ipo").loss_type == "ipo"


def test_defaults_that_differ_name_only_the_flags_left_out():
    argv = flags_of(SD_COMMAND)
    data_args, settings, run = arguments.parse_args(argv)
    values = {**vars(data_args), **settings, **vars(run)}
    lines = arguments.defaults_that_differ(values, FAMILIES["sd15"], arguments.given_flags(argv))
    assert [line.split(":")[0] for line in lines] == ["--loss_type", "--beta_dpo", "--dataset_split_name"]
    assert "fastpref's default is adaptive, diffusers' is sigmoid" in lines[0]
    assert "fastpref's default is 1000.0, diffusers' is 2500.0" in lines[1]
    # SDXL: diffusers' --beta_dpo 5000 is halved in its loss, so the betas agree
    assert [
        line.split(":")[0]
        for line in arguments.defaults_that_differ(values, FAMILIES["sdxl"], arguments.given_flags(argv))
    ] == [
        "--loss_type",
        "--dataset_split_name",
    ]
    data_args, settings, run = arguments.parse_args(BARE)
    values = {**vars(data_args), **settings, **vars(run)}
    flags = [
        line.split(":")[0]
        for line in arguments.defaults_that_differ(values, FAMILIES["sd15"], arguments.given_flags(BARE))
    ]
    assert flags == [
        "--loss_type",
        "--beta_dpo",
        "--rank",
        "--learning_rate",
        "--lr_warmup_steps",
        "--seed",
        "--dataset_split_name",
    ]


# --------------------------------------------------------------------------------------------
# start-up checks
# --------------------------------------------------------------------------------------------


def test_push_to_hub_offline_stops_at_start_up(train_main, tmp_path, offline_hub):
    code, err = train_main(tmp_path / "out", "--push_to_hub")
    assert code == 2 and "Traceback" not in err
    assert "fastpref train: error: --push_to_hub: the Hub is switched off here (HF_HUB_OFFLINE=1)" in err
    assert not (tmp_path / "out").exists()


def test_push_to_hub_unreachable_stops_at_start_up(train_main, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_token")
    code, err = train_main(tmp_path / "out", "--push_to_hub")
    assert code == 2 and "fastpref train: error: --push_to_hub: cannot reach the Hub at http://127.0.0.1:9" in err
    assert not (tmp_path / "out").exists()


def test_push_to_hub_makes_the_repository_first_and_uploads_the_finished_folder(train_main, tmp_path, monkeypatch):
    """The Hub replaced by a recorder: the repository is made before training, and the folder
    uploaded after the model card is written, without the checkpoints."""
    import huggingface_hub

    from fastpref.train import hub

    calls = []

    def create_repo(repo_id, exist_ok, token):
        calls.append(("create", repo_id, (tmp_path / "out" / "train_log.jsonl").exists()))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/someone/{repo_id}")

    def upload_folder(repo_id, folder_path, ignore_patterns, **_):
        calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir()), ignore_patterns))

    monkeypatch.setattr(hub, "check_hub", lambda token: "someone")
    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    code, err = train_main(tmp_path / "out", "--push_to_hub", "--max_train_steps", 1)
    assert code == 0, err
    assert calls[0] == ("create", "out", False)  # before the first step
    assert calls[1][:2] == ("upload", "someone/out") and "checkpoint-*" in calls[1][3]
    assert {"README.md", "pytorch_lora_weights.safetensors", "train_summary.json"} <= set(calls[1][2])


def test_xformers_missing_stops_at_start_up(train_main, tmp_path):
    from importlib.util import find_spec

    if find_spec("xformers") is not None:
        pytest.skip("xformers is installed here")
    code, err = train_main(tmp_path / "out", "--enable_xformers_memory_efficient_attention")
    assert code == 2 and "--enable_xformers_memory_efficient_attention: xformers is not installed" in err
    assert not (tmp_path / "out").exists()


def test_hub_token_with_wandb_stops(train_main, tmp_path):
    code, err = train_main(tmp_path / "out", "--hub_token", "hf_x", "--report_to", "wandb")
    assert code == 2 and "--hub_token: cannot be combined with --report_to wandb" in err


def test_is_turbo_needs_an_sdxl_unet(train_main, tmp_path):
    code, err = train_main(tmp_path / "out", "--is_turbo")
    assert code == 2 and "--is_turbo: " in err and "holds SD 1.5 (a UNet" in err


def test_allow_tf32_sets_the_matmul_and_cudnn_flags():
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    try:
        matmul.allow_tf32 = cudnn.allow_tf32 = False
        allow_tf32(False)
        assert not matmul.allow_tf32 and not cudnn.allow_tf32
        allow_tf32(True)
        assert matmul.allow_tf32 and cudnn.allow_tf32
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


# --------------------------------------------------------------------------------------------
# SDXL as diffusers: the architecture from the UNet, the VAE's dtype, Turbo
# --------------------------------------------------------------------------------------------


def test_the_family_is_read_from_the_unet_config_not_the_name(tiny_sdxl, tiny_run, tmp_path):
    from fastpref.train.models import ModelSource

    misnamed = tmp_path / "stable-diffusion-v1-5"
    misnamed.symlink_to(tiny_sdxl["model"], target_is_directory=True)
    assert ModelSource(str(misnamed)).family.name == "sdxl"
    assert ModelSource(str(tiny_run["model"])).family.name == "sd15"
    odd = tmp_path / "odd"
    (odd / "unet").mkdir(parents=True)
    (odd / "unet" / "config.json").write_text(json.dumps({"addition_embed_type": "text_image"}))
    with pytest.raises(ValueError, match="no model family fastpref trains recognises"):
        ModelSource(str(odd)).family


def test_the_sdxl_vae_runs_in_float32_unless_fp16_safe(tiny_sdxl, tiny_run):
    from fastpref.train.models import ModelSource

    half, sd15, sdxl = torch.float16, FAMILIES["sd15"], FAMILIES["sdxl"]
    assert sdxl.vae_dtype(True, half) == torch.float32 and sdxl.vae_dtype(False, half) == half
    assert sd15.vae_dtype(True, half) == half
    own = ModelSource(str(tiny_sdxl["model"]))
    fixed = ModelSource(str(tiny_sdxl["model"]), vae_path=str(tiny_sdxl["vae"]))
    assert sdxl.load_vae(own, torch.bfloat16).dtype == torch.float32
    assert sdxl.load_vae(fixed, torch.bfloat16).dtype == torch.bfloat16
    assert sd15.load_vae(ModelSource(str(tiny_run["model"])), torch.bfloat16).dtype == torch.bfloat16


def test_is_turbo_trains_on_the_4_step_grid_with_zero_terminal_snr(tiny_sdxl):
    from fastpref.train.models import ModelSource
    from fastpref.train.trainer import PreferenceTrainer

    source, sdxl = ModelSource(str(tiny_sdxl["model"])), FAMILIES["sdxl"]
    scheduler = sdxl.load_noise_scheduler(source, is_turbo=True)
    assert float(scheduler.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-6)
    # diffusers' SDXL script: sqrt(alpha_bar) shifted to 0 at the end and rescaled to keep its start
    root = sdxl.load_noise_scheduler(source).alphas_cumprod.sqrt()
    shifted = (root - root[-1]) * root[0] / (root[0] - root[-1])
    torch.testing.assert_close(scheduler.alphas_cumprod, shifted**2, rtol=0, atol=1e-6)
    config = TrainConfig(is_turbo=True, loss_type="dpo", beta=2500.0, max_train_steps=1, lora_rank=2)
    trainer = PreferenceTrainer(sdxl.load_denoiser(source, torch.float32), scheduler, config, family=sdxl)
    seen = set()
    for micro_step in range(8):
        trainer.micro_step = micro_step
        seen |= set(trainer._noise(torch.zeros(8, 4, 4, 4))[1].tolist())
    assert seen == {249, 499, 749, 999}


# --------------------------------------------------------------------------------------------
# the commands, run
# --------------------------------------------------------------------------------------------


def run_command(launcher, args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.update(WANDB_DIR=str(cwd), PYTHONPATH=str(ROOT))
    result = subprocess.run([*launcher, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def validation_images_in_tensorboard(logs):
    """``{step: (width, height)}`` of the ``validation`` images in the TensorBoard events under ``logs``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for events in logs.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
        accumulator.Reload()
        if "validation" in accumulator.Tags()["images"]:
            found.update({e.step: (e.width, e.height) for e in accumulator.Images("validation")})
    return found


def check_run(out, arch, model, stderr):
    """What a README command's run leaves: weights and checkpoints diffusers loads, validation
    images on disk, in TensorBoard and in wandb's offline run, a model card, the default-differs
    log lines."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["arch"] == arch and summary["loss_type"] == "adaptive"
    pipeline_class = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    for folder in (out / "checkpoint-1", out / "checkpoint-2", out):
        pipe = pipeline_class.from_pretrained(model)
        pipe.load_lora_weights(str(folder))
        assert pipe.unet.peft_config, folder
    for step in (1, 2):
        assert [p.name for p in (out / "validation" / f"step-{step}").iterdir()] == ["00.png"]
    assert set(validation_images_in_tensorboard(out / "logs")) == {1, 2}
    card = (out / "README.md").read_text()
    assert f"base_model: {model}" in card and "objective **adaptive**" in card
    assert "| `lora_rank` | `8` |" in card and "validation/step-2/00.png" in card
    assert "default differs from diffusers' script: --loss_type: fastpref's default is adaptive" in stderr
    assert "--rank:" not in stderr and "--seed:" not in stderr
    wandb_images = (out.parent / "wandb").glob("offline-run-*/files/media/images/validation_*.png")
    assert {image.name.split("_")[1] for image in wandb_images} == {"1", "2"}  # validation_<step>_<hash>.png


@pytest.mark.parametrize("launcher", ["accelerate launch", "fastpref train"])
def test_sd_readme_command_runs(tiny_run, tmp_path, launcher):
    args = adapted(SD_COMMAND, tiny_run["model"], tiny_run["data"]) + OVERRIDES
    result = run_command(ACCELERATE if launcher == "accelerate launch" else FASTPREF_TRAIN, args, tmp_path)
    check_run(tmp_path / "diffusion-dpo", "sd15", tiny_run["model"], result.stderr)
    assert "--beta_dpo: fastpref's default is 1000.0, diffusers' is 2500.0" in result.stderr


@pytest.mark.parametrize("launcher", ["accelerate launch", "fastpref train"])
def test_sdxl_readme_command_runs(tiny_sdxl, tiny_run, tmp_path, launcher):
    args = adapted(SDXL_COMMAND, tiny_sdxl["model"], tiny_run["data"], tiny_sdxl["vae"]) + OVERRIDES
    result = run_command(ACCELERATE if launcher == "accelerate launch" else FASTPREF_TRAIN, args, tmp_path)
    check_run(tmp_path / "diffusion-sdxl-dpo", "sdxl", tiny_sdxl["model"], result.stderr)
    assert "--beta_dpo:" not in result.stderr  # diffusers' SDXL beta is fastpref's
