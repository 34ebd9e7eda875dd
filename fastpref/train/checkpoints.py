"""What a run writes and resumes from: ``checkpoint-N/`` folders (accelerate state plus a
manifest), the LoRA hooks that keep the frozen base out of them, and the final weights in
diffusers' formats.

Crash safety. These hold at every instant, whatever kills the process:

- The newest complete checkpoint on disk is intact. A checkpoint is complete when its folder
  is named ``checkpoint-N`` and its manifest (``checkpoint.json``: step, run id, the run's
  settings, the size and sha256 of every file) matches its files. :func:`save_checkpoint`
  writes ``checkpoint-N.partial``, writes the manifest, fsyncs every file and the folder, and
  only then renames it to ``checkpoint-N``.
- Re-saving a step renames the old ``checkpoint-N`` to ``checkpoint-N.old`` first (never a
  delete before the new one is in place); :func:`recover` renames it back if the process died
  between the two renames.
- Only after the new checkpoint is in place does rotation delete anything, and it deletes only
  checkpoints of this run (the manifest's run id: written by this run, or by the run it resumed
  from). A folder is renamed ``*.deleting`` before it is removed, so a half-deleted folder never
  carries a checkpoint's name.
- Resuming ``latest`` validates the newest checkpoint (manifest, file sizes and checksums, then
  loading) and falls back to the previous one, with a warning naming the file, when it fails.

Test hook: ``FASTPREF_FAULT=save:<point>[:<step>]`` makes the process SIGKILL itself at
``<point>`` of the save sequence (:data:`SAVE_POINTS`; of the save of ``<step>`` only, when
given). It is read in :func:`save_checkpoint` only; the fault-injection tests use it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import uuid
from pathlib import Path
from typing import List, Optional

from .. import files
from ..files import fsync_dir, replace_durably, sha256_of, write_json_atomic, write_text_atomic

logger = logging.getLogger("fastpref.train")

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
POLICY_LORA_FILE = "policy_lora.safetensors"
WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file
MANIFEST = "checkpoint.json"
FAULT_ENV = "FASTPREF_FAULT"
# The save sequence, in order; FASTPREF_FAULT can kill the process right after each of them.
SAVE_POINTS = (
    "written",  # accelerate's state is in checkpoint-N.partial, no manifest yet
    "synced",  # the manifest is written and every file and the folder fsynced
    "aside",  # re-saving a step: the old checkpoint-N renamed to checkpoint-N.old
    "renamed",  # checkpoint-N.partial renamed to checkpoint-N
    "rotating",  # the first checkpoint beyond the limit renamed to *.deleting, not yet removed
    "saved",  # the whole save done
)


class CheckpointError(ValueError):
    """A checkpoint that is incomplete or does not load; the message names the file."""


def new_run_id() -> str:
    """The id a fresh run writes into its checkpoints' manifests (rotation keeps to it)."""
    return uuid.uuid4().hex[:12]


def checkpoints(output_dir) -> List[Path]:
    """Folders named ``checkpoint-N`` in ``output_dir``, oldest first (unvalidated)."""
    found = [
        (int(m.group(1)), d)
        for d in Path(output_dir).glob("checkpoint-*")
        if (m := CHECKPOINT.match(d.name)) and d.is_dir()
    ]
    return [d for _, d in sorted(found)]


def step_of(path) -> int:
    """N of a ``checkpoint-N`` folder."""
    return int(CHECKPOINT.match(Path(path).name).group(1))


# --------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------


def fault(point: str, step: int) -> None:
    """The test hook: SIGKILL this process if ``$FASTPREF_FAULT`` names ``point`` (and ``step``)."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec.startswith("save:"):
        return
    name, _, at = spec[len("save:") :].partition(":")
    if name == point and (not at or int(at) == step):
        os.kill(os.getpid(), signal.SIGKILL)


def discard(path: Path, point: Optional[str] = None, step: int = 0) -> None:
    """Remove a folder: renamed to ``*.deleting`` first, so that a removal cut short leaves no
    folder with a checkpoint's name (``point``: the :func:`fault` point between the two)."""
    doomed = path.with_name(path.name + ".deleting")
    if doomed.exists():
        shutil.rmtree(doomed)
    replace_durably(path, doomed)
    if point is not None:
        fault(point, step)
    shutil.rmtree(doomed)


def write_manifest(folder: Path, step: int, run_id: str, settings: Optional[dict] = None) -> None:
    """``checkpoint.json`` in ``folder``: the step, the run id, the run's ``settings`` (what a
    resume compares with its command) and every file's size and sha256; every file and the folder
    are fsynced first, so the manifest never describes data still in flight."""
    sizes, sums = {}, {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
        name = file.relative_to(folder).as_posix()
        sizes[name], sums[name] = file.stat().st_size, sha256_of(file)
    for sub in {p.parent for p in folder.rglob("*")} | {folder}:
        fsync_dir(sub)
    manifest = {"step": step, "run_id": run_id, "files": sizes, "sha256": sums, "settings": settings or {}}
    write_json_atomic(folder / MANIFEST, manifest)


def read_manifest(folder) -> dict:
    """The manifest of a checkpoint folder; :class:`CheckpointError` naming it if missing or torn."""
    file = Path(folder) / MANIFEST
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{file}: unreadable manifest ({error})") from None


def rotate(output_dir, total_limit: Optional[int], run_id: str, saved: Path) -> None:
    """Keep ``saved`` (just written) and this run's newest other checkpoints, ``total_limit`` in
    all; delete this run's older ones. Other runs' checkpoints are never touched."""
    if total_limit is None:
        return
    ours = []
    for folder in checkpoints(output_dir):
        try:
            if folder != saved and read_manifest(folder).get("run_id") == run_id:
                ours.append(folder)
        except CheckpointError:
            continue  # not this run's (or not a checkpoint at all): left alone
    for old in ours[: max(0, len(ours) - (total_limit - 1))]:
        discard(old, "rotating", step_of(saved))


def save_checkpoint(
    accelerator, output_dir, step: int, total_limit: Optional[int], run_id: str, settings: Optional[dict] = None
) -> Path:
    """Save the accelerator's state as ``checkpoint-<step>`` in the order of :data:`SAVE_POINTS`
    (see the module docstring); returns the folder. Hand-written around ``save_state`` because
    accelerate's own checkpoint naming writes in place. A full disk raises ``OSError(ENOSPC)``
    naming the folder (the ``.partial`` folder is removed; the previous checkpoints stay)."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    partial = final.with_name(final.name + ".partial")
    old = final.with_name(final.name + ".old")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    with disk_full_named(partial):
        accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fault("written", step)
        with disk_full_named(partial):
            write_manifest(partial, step, run_id, settings)
        fault("synced", step)
        if final.exists():
            if old.exists():
                discard(old)
            replace_durably(final, old)
            fault("aside", step)
        replace_durably(partial, final)
        fault("renamed", step)
        if old.exists():
            discard(old)
        rotate(output_dir, total_limit, run_id, final)
        fault("saved", step)
    accelerator.wait_for_everyone()
    return final


def disk_full_named(path: Path):
    """:func:`fastpref.files.disk_full_named` for a checkpoint save: a ``.partial`` ``path`` is
    removed, anything else is kept (a save never removes a complete checkpoint)."""
    return files.disk_full_named(path, remove=path.name.endswith(".partial"))


# --------------------------------------------------------------------------------------------
# resuming
# --------------------------------------------------------------------------------------------


def recover(output_dir) -> None:
    """Undo what a killed save left behind: a ``checkpoint-N.old`` whose replacement never got
    its name is renamed back; other ``.old``, ``.partial`` and ``.deleting`` folders are removed."""
    output_dir = Path(output_dir)
    for old in sorted(output_dir.glob("checkpoint-*.old")):
        final = old.with_name(old.name[: -len(".old")])
        if CHECKPOINT.match(final.name) and not final.exists():
            replace_durably(old, final)
            logger.warning("restored %s (a re-save of it was interrupted)", final)
        else:
            discard(old)
    for leftover in sorted(output_dir.glob("checkpoint-*.partial")) + sorted(output_dir.glob("*.deleting")):
        if leftover.is_dir():
            shutil.rmtree(leftover)


def validate(folder) -> dict:
    """The manifest of ``folder`` if every file it lists is there with the size and sha256
    recorded at save time; :class:`CheckpointError` naming the first file that is not. (A
    manifest written before checksums were recorded is checked by size only.)"""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.get("step") != step_of(folder):
        raise CheckpointError(f"{folder / MANIFEST}: records step {manifest.get('step')}, not {step_of(folder)}")
    for name, size in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, {size} when saved (truncated?)")
    for name, digest in manifest.get("sha256", {}).items():
        if sha256_of(folder / name) != digest:
            raise CheckpointError(f"{folder / name}: its sha256 differs from the one saved (damaged)")
    return manifest


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
    if not path.is_dir() or not CHECKPOINT.match(path.name):
        raise FileNotFoundError(f"--resume_from_checkpoint: {value} is not a checkpoint folder")
    return path


def truncate_log(log_file: Path, step: int) -> None:
    """Keep the lines of ``log_file`` up to ``step`` (the later ones are redone); a torn line (a
    run killed mid-write) is dropped with a warning naming the file."""
    if not log_file.exists():
        return
    kept = []
    for number, line in enumerate(log_file.read_text().splitlines(), 1):
        try:
            record_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            logger.warning("%s: line %d is torn or not a log record; dropped", log_file, number)
            continue
        if record_step <= step:
            kept.append(line + "\n")
    text = "".join(kept)
    write_text_atomic(log_file, text)


def resume(accelerator, trainer, value: Optional[str], output_dir, log_file: Path) -> Optional[dict]:
    """Load the checkpoint ``value`` names (see :func:`resolve_resume`) into the accelerator's
    registered objects -- the policy, optimizer, LR schedule, RNG and the trainer's counters and
    footprints -- and cut ``log_file`` back to its step. ``"latest"`` falls back to the previous
    checkpoint when the newest fails :func:`validate` or does not load, and starts a new run
    (an empty log) when there is none. Returns the loaded checkpoint's manifest, or ``None``."""
    if not value:
        return None
    if accelerator.is_main_process:
        recover(output_dir)
    accelerator.wait_for_everyone()
    candidates = list(reversed(checkpoints(output_dir))) if value == "latest" else [resolve_resume(value, output_dir)]
    if not candidates:
        logger.warning("resume_from_checkpoint=latest: no checkpoint in %s, starting a new run", output_dir)
    for path in candidates:
        try:
            manifest = validate(path)
            accelerator.load_state(str(path))
        except Exception as error:  # any failure to read the files: a torn or foreign checkpoint
            if value != "latest":
                raise CheckpointError(f"--resume_from_checkpoint {value}: {error}") from error
            logger.warning("checkpoint %s is unusable (%s); trying the previous one", path, error)
            continue
        logger.info("resumed from %s at step %d", path, trainer.global_step)
        if accelerator.is_main_process:
            truncate_log(log_file, trainer.global_step)
        return manifest
    if candidates:
        raise CheckpointError(f"--resume_from_checkpoint latest: no usable checkpoint in {output_dir} (see above)")
    if accelerator.is_main_process:
        truncate_log(log_file, 0)
    return None


def install_lora_hooks(accelerator, unet_type, family) -> None:
    """Checkpoints of a LoRA run hold the policy adapter only (not the frozen base UNet), as
    peft's state dict (what resuming loads) and in diffusers' LoRA format
    (``pytorch_lora_weights.safetensors``: ``pipe.load_lora_weights(checkpoint)``): the
    save/load hooks of diffusers' LoRA training scripts."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        for model in models:
            model = accelerator.unwrap_model(model)
            if not isinstance(model, unet_type):
                raise ValueError(f"unexpected model in the checkpoint: {type(model).__name__}")
            if accelerator.is_main_process:
                state = {
                    k: v.detach().cpu().contiguous()
                    for k, v in get_peft_model_state_dict(model, adapter_name="default").items()
                }
                save_file(state, os.path.join(output_dir, POLICY_LORA_FILE))
                save_lora_weights(model, family, output_dir)
            if weights:
                weights.pop()  # accelerate must not also save the whole (frozen) UNet

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            if isinstance(model, unet_type):
                state = load_file(os.path.join(input_dir, POLICY_LORA_FILE))
                result = set_peft_model_state_dict(model, state, adapter_name="default")
                if getattr(result, "unexpected_keys", None):
                    raise RuntimeError(f"checkpoint LoRA keys do not match the model: {result.unexpected_keys[:5]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_weights(accelerator, trainer, output_dir: Path) -> None:
    """LoRA: ``pytorch_lora_weights.safetensors`` (diffusers' saver; ``pipe.load_lora_weights``
    reads it); full fine-tune: the family's denoiser folder, ``unet/`` for SD (``save_pretrained``,
    safetensors). A full disk raises ``OSError(ENOSPC)`` naming that file or folder, removed."""
    accelerator.wait_for_everyone()
    if getattr(trainer, "sharded", False):  # --fsdp: the shards gathered, a whole diffusers folder written
        from .sharding import save_pretrained

        save_pretrained(trainer.unet, output_dir / trainer.family.denoiser_folder, accelerator.is_main_process)
        return
    if not accelerator.is_main_process:
        return
    unet = trainer.base_unet
    lora = trainer.config.lora_rank > 0
    weights = output_dir / (WEIGHTS_FILE if lora else trainer.family.denoiser_folder)
    with files.disk_full_named(weights, remove=True):  # torn weights are removed: the checkpoint has them
        if lora:
            save_lora_weights(unet, trainer.family, output_dir)
        else:
            unet.save_pretrained(str(weights), safe_serialization=True)


def save_lora_weights(unet, family, folder) -> None:
    """The policy adapter of ``unet`` (peft's ``default``) as ``folder/pytorch_lora_weights.safetensors``
    in diffusers' LoRA format, float32, with the family's pipeline's ``save_lora_weights``."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name="default"))
    family.save_lora_weights({k: v.detach().float().cpu() for k, v in layers.items()}, folder)
