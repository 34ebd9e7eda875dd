"""What a run writes and resumes from: ``checkpoint-N/`` folders (accelerate state, saved whole or
not at all, at most ``total_limit`` kept), the LoRA hooks that keep the frozen base out of them,
and the final weights in diffusers' formats."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import List, Optional

from .files import write_atomic

logger = logging.getLogger("fastpref.train")

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
POLICY_LORA_FILE = "policy_lora.safetensors"


def checkpoints(output_dir) -> List[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    found = [
        (int(m.group(1)), d)
        for d in Path(output_dir).glob("checkpoint-*")
        if (m := CHECKPOINT.match(d.name)) and d.is_dir()
    ]
    return [d for _, d in sorted(found)]


def resolve_resume(value: Optional[str], output_dir) -> Optional[Path]:
    """The checkpoint folder ``value`` names: ``"latest"`` (``None`` when there is none yet), a
    folder, or a folder name inside ``output_dir``; ``FileNotFoundError`` otherwise."""
    if not value:
        return None
    if value == "latest":
        found = checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(value)
    if not path.is_dir():
        path = Path(output_dir) / value
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: {value} is not a checkpoint folder")
    return path


def save_checkpoint(accelerator, output_dir, step: int, total_limit: Optional[int]) -> Path:
    """``accelerator.save_state`` into ``checkpoint-<step>.partial``, renamed to
    ``checkpoint-<step>`` when complete (a run killed mid-save keeps the previous checkpoint);
    then the oldest checkpoints beyond ``total_limit`` are removed. Hand-written around
    ``save_state`` because accelerate's own checkpoint naming writes in place."""
    final = Path(output_dir) / f"checkpoint-{step}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        if total_limit is not None:
            for old in checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resume(accelerator, trainer, value: Optional[str], output_dir, log_file: Path) -> Optional[Path]:
    """Load the checkpoint ``value`` names (see :func:`resolve_resume`) into the accelerator's
    registered objects -- the policy, optimizer, LR schedule, RNG and the trainer's counters and
    footprints -- and drop the lines of ``log_file`` after its step (they are redone)."""
    path = resolve_resume(value, output_dir)
    if value and path is None:
        logger.warning("resume_from_checkpoint=%s: no checkpoint in %s, starting a new run", value, output_dir)
    if path is None:
        return None
    accelerator.load_state(str(path))
    logger.info("resumed from %s at step %d", path, trainer.global_step)
    if accelerator.is_main_process and log_file.exists():
        lines = [line for line in log_file.read_text().splitlines() if json.loads(line)["step"] <= trainer.global_step]
        text = "".join(line + "\n" for line in lines)
        write_atomic(log_file, lambda tmp: tmp.write_text(text))
    return path


def install_lora_hooks(accelerator, unet_type) -> None:
    """Checkpoints of a LoRA run hold the policy adapter only (not the frozen base UNet): the
    save/load hooks of diffusers' LoRA training scripts."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        for model in models:
            if not isinstance(model, unet_type):
                raise ValueError(f"unexpected model in the checkpoint: {type(model).__name__}")
            if accelerator.is_main_process:
                state = {
                    k: v.detach().cpu().contiguous()
                    for k, v in get_peft_model_state_dict(model, adapter_name="default").items()
                }
                save_file(state, os.path.join(output_dir, POLICY_LORA_FILE))
            if weights:
                weights.pop()  # accelerate must not also save the whole (frozen) UNet

    def load_hook(models, input_dir):
        while models:
            model = models.pop()
            if isinstance(model, unet_type):
                state = load_file(os.path.join(input_dir, POLICY_LORA_FILE))
                result = set_peft_model_state_dict(model, state, adapter_name="default")
                if getattr(result, "unexpected_keys", None):
                    raise RuntimeError(f"checkpoint LoRA keys do not match the model: {result.unexpected_keys[:5]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_weights(accelerator, trainer, arch: str, output_dir: Path) -> None:
    """LoRA: ``pytorch_lora_weights.safetensors`` (diffusers' saver; ``pipe.load_lora_weights``
    reads it); full fine-tune: ``unet/`` (``save_pretrained``, safetensors)."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    unet = trainer.base_unet
    if trainer.config.lora_rank > 0:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name="default"))
        pipeline = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
        pipeline.save_lora_weights(
            str(output_dir), unet_lora_layers={k: v.detach().float().cpu() for k, v in layers.items()}
        )
    else:
        unet.save_pretrained(str(output_dir / "unet"), safe_serialization=True)
