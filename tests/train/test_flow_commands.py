"""diffusers' documented SD3 and FLUX.1 LoRA training commands (``examples/dreambooth/README_sd3.md``
and ``README_flux.md``) through ``fastpref train --loss_type sigmoid``: each flag fastpref shares
means what it means in diffusers' scripts, the flow-matching flags take diffusers' defaults, the
DreamBooth-only flags are named with what replaces them, and the reduced commands train."""

from __future__ import annotations

import json
import shlex

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from offline import RES  # noqa: E402

from fastpref import cli  # noqa: E402
from fastpref.testing.toy_data import make_toy_data  # noqa: E402
from fastpref.train import arguments  # noqa: E402
from fastpref.train.config import TrainConfig  # noqa: E402
from fastpref.train.families import FAMILIES  # noqa: E402

pytestmark = pytest.mark.usefixtures("offline_hub")

# Verbatim from diffusers' examples/dreambooth/README_sd3.md ("LoRA + DreamBooth"), with its exports.
SD3_COMMAND = r"""accelerate launch train_dreambooth_lora_sd3.py \
  --pretrained_model_name_or_path=$MODEL_NAME  \
  --instance_data_dir=$INSTANCE_DIR \
  --output_dir=$OUTPUT_DIR \
  --mixed_precision="fp16" \
  --instance_prompt="a photo of sks dog" \
  --resolution=512 \
  --train_batch_size=1 \
  --gradient_accumulation_steps=4 \
  --learning_rate=4e-4 \
  --report_to="wandb" \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --max_train_steps=500 \
  --validation_prompt="A photo of sks dog in a bucket" \
  --validation_epochs=25 \
  --seed="0" \
  --push_to_hub"""
SD3_EXPORTS = {
    "MODEL_NAME": "stabilityai/stable-diffusion-3-medium-diffusers",
    "INSTANCE_DIR": "dog",
    "OUTPUT_DIR": "trained-sd3-lora",
}

# Verbatim from diffusers' examples/dreambooth/README_flux.md (LoRA, with the Prodigy optimizer).
FLUX_COMMAND = r"""accelerate launch train_dreambooth_lora_flux.py \
  --pretrained_model_name_or_path=$MODEL_NAME  \
  --instance_data_dir=$INSTANCE_DIR \
  --output_dir=$OUTPUT_DIR \
  --mixed_precision="bf16" \
  --instance_prompt="a photo of sks dog" \
  --resolution=512 \
  --train_batch_size=1 \
  --guidance_scale=1 \
  --gradient_accumulation_steps=4 \
  --optimizer="prodigy" \
  --learning_rate=1. \
  --report_to="wandb" \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --max_train_steps=500 \
  --validation_prompt="A photo of sks dog in a bucket" \
  --validation_epochs=25 \
  --seed="0" \
  --push_to_hub"""
FLUX_EXPORTS = {"MODEL_NAME": "black-forest-labs/FLUX.1-dev", "INSTANCE_DIR": "dog", "OUTPUT_DIR": "trained-flux-lora"}

# DreamBooth's flags: fastpref does not take them (argparse refuses each); what stands in for them.
DREAMBOOTH_ONLY = {
    "--instance_data_dir": "the instance images; preference pairs come from --dataset_name",
    "--instance_prompt": "one prompt for every instance image; each pair brings its caption",
    "--validation_epochs": "--validation_steps (fastpref validates every N optimizer steps)",
    "--optimizer": "fastpref trains with AdamW (--use_8bit_adam: AdamW8bit); no Prodigy",
}

# The shared flags' meaning in diffusers' scripts, as fastpref's fields. (--validation_prompt is
# argparse's abbreviation of fastpref's --validation_prompts: the prompt sampled at validation,
# which fastpref runs with --run_validation, every --validation_steps.)
MEANING = {
    "sd3": dict(
        pretrained_model_name_or_path=SD3_EXPORTS["MODEL_NAME"],
        output_dir="trained-sd3-lora",
        mixed_precision="fp16",
        resolution=512,
        train_batch_size=1,
        gradient_accumulation_steps=4,
        learning_rate=4e-4,
        report_to="wandb",
        lr_scheduler="constant",
        lr_warmup_steps=0,
        max_train_steps=500,
        seed=0,
        push_to_hub=True,
        validation_prompts=["A photo of sks dog in a bucket"],
    ),
}
MEANING["flux"] = {
    **MEANING["sd3"],
    "pretrained_model_name_or_path": FLUX_EXPORTS["MODEL_NAME"],
    "output_dir": "trained-flux-lora",
    "mixed_precision": "bf16",
    "guidance_scale": 1.0,
    "learning_rate": 1.0,
}
COMMANDS = {"sd3": (SD3_COMMAND, SD3_EXPORTS), "flux": (FLUX_COMMAND, FLUX_EXPORTS)}

# diffusers' scripts' defaults of the flow-matching flags (train_dreambooth_lora_sd3.py / _flux.py).
SCRIPT_DEFAULTS = {
    "sd3": dict(
        weighting_scheme="logit_normal",
        logit_mean=0.0,
        logit_std=1.0,
        mode_scale=1.29,
        precondition_outputs=True,
        max_sequence_length=77,
    ),
    "flux": dict(
        weighting_scheme="none",
        logit_mean=0.0,
        logit_std=1.0,
        mode_scale=1.29,
        precondition_outputs=False,
        max_sequence_length=512,
        guidance_scale=3.5,
    ),
}


def flags_of(name: str) -> list:
    """The command's arguments after ``accelerate launch SCRIPT``, its exports substituted."""
    command, exports = COMMANDS[name]
    for variable, value in exports.items():
        command = command.replace(f"${variable}", value)
    return shlex.split(command.replace("\\\n", " "))[3:]


def shared(argv: list) -> list:
    """The flags fastpref shares, and the preference pairs in place of the instance images."""
    return ["--dataset_name=pairs"] + [arg for arg in argv if arg.partition("=")[0] not in DREAMBOOTH_ONLY]


@pytest.mark.parametrize("name", COMMANDS)
def test_the_commands_flags_mean_what_they_mean_in_diffusers(name):
    argv = flags_of(name)
    dropped = {arg.partition("=")[0] for arg in argv} & set(DREAMBOOTH_ONLY)
    assert dropped == set(DREAMBOOTH_ONLY) - ({"--optimizer"} if name == "sd3" else set())
    for flag in dropped:  # refused, not silently taken for something else
        with pytest.raises(SystemExit):
            arguments.parse_args([next(arg for arg in argv if arg.startswith(flag + "=")), *shared(argv)])
    kept = shared(argv)
    data_args, settings, run = arguments.parse_args(kept)
    values = {**vars(data_args), **settings, **vars(run)}
    expected = {**MEANING[name], "dataset_name": "pairs"}
    assert arguments.given_flags(kept) == set(expected)
    assert {k: values[k] for k in expected} == expected


@pytest.mark.parametrize("name", COMMANDS)
def test_the_flow_flags_default_to_diffusers_scripts(name):
    family = FAMILIES[name]
    unset = family.configured(TrainConfig())
    settings = {k: getattr(unset.settings, k) for k in SCRIPT_DEFAULTS[name]}
    assert settings == SCRIPT_DEFAULTS[name]
    given = ["--weighting_scheme", "mode", "--logit_mean", "0.5", "--logit_std", "2", "--mode_scale", "1.0"]
    given += ["--precondition_outputs", "0", "--max_sequence_length", "256", "--guidance_scale", "4"]
    given += ["--flow_shift", "2.5"]
    _, fields, _ = arguments.parse_args(
        ["--pretrained_model_name_or_path=m", "--dataset_name=d", "--output_dir=o"] + given
    )
    config = TrainConfig(**{**fields, "beta": 1.0, "k1": 1.0, "max_train_steps": 1, "mixed_precision": "no"})
    s = family.configured(config).settings
    assert (s.weighting_scheme, s.logit_mean, s.logit_std, s.mode_scale) == ("mode", 0.5, 2.0, 1.0)
    assert (s.precondition_outputs, s.max_sequence_length, s.guidance_scale, s.shift) == (False, 256, 4.0, 2.5)


@pytest.mark.parametrize("name", COMMANDS)
def test_the_reduced_command_trains_with_loss_type_sigmoid(flow_models, tmp_path, name):
    """The command's shared flags (model and output paths replaced, ``--mixed_precision no`` on
    the CPU, no Hub or wandb), then, the last value winning: 1 step at 32 px on 2 toy pairs, one
    micro-batch, Adam's 1e-4 where the FLUX command's rate is Prodigy's, ``--loss_type sigmoid``."""
    data = make_toy_data(tmp_path / "data", pairs=2, resolution=RES).parent
    paths = {
        "--pretrained_model_name_or_path": flow_models[name],
        "--output_dir": tmp_path / "out",
        "--mixed_precision": "no",
        "--report_to": "none",
    }
    args = []
    for arg in shared(flags_of(name)):
        flag = arg.partition("=")[0]
        if flag != "--push_to_hub":
            args.append(f"{flag}={paths[flag]}" if flag in paths else arg)
    args += ["--dataset_name", str(data), "--max_train_steps", "1", "--resolution", str(RES), "--no_progress"]
    args += ["--gradient_accumulation_steps", "1", "--max_sequence_length", "8", "--loss_type", "sigmoid"]
    if name == "flux":
        args += ["--learning_rate", "1e-4"]
    assert cli.main(["train", *args]) == 0
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert (summary["arch"], summary["loss_type"], summary["global_step"]) == (name, "dpo", 1)
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
