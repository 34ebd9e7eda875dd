"""``--fsdp``: a full fine-tune's policy, frozen reference and EMA footprints sharded with PyTorch's
FSDP2 (``torch.distributed.fsdp.fully_shard``) on one mesh of every process, and the sharded
checkpoints (``torch.distributed.checkpoint``).

Each model is sharded per block (the family's :meth:`~fastpref.train.families.base.ModelFamily.shard_blocks`:
a UNet's transformer layers, then its down, mid and up blocks around them; a transformer's
blocks), then as a whole (the root keeps the
rest: embeddings, the first and last layers). Every process holds ``1 / world`` of each
parameter (dim-0 shards, as DTensors); a block's full parameters are gathered for its forward
and backward and freed after; gradients are reduce-scattered (averaged over the processes, as
DDP's all-reduce), so the optimizer -- built over the sharded parameters -- keeps sharded state.
The reference and the footprints are sharded the same way, so a footprint's update
(``torch._foreach_lerp_``) runs on the local shards of the policy and the footprint: same shapes,
same placements, no communication (:class:`ShardedModelFootprints`).

Mixed precision is the run's: the forwards run under the accelerator's autocast as without
``--fsdp``, and the gathers move parameters in the weight dtype (``MixedPrecisionPolicy``'s
``param_dtype``), gradients reduced in float32. Works on any device PyTorch's collectives serve:
NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, Optional

import torch

from .footprints import ModelFootprints

SHARDED_STATE = "sharded_state"  # the folder of a checkpoint that holds the DCP files


FP16_MESSAGE = (
    "--fsdp: cannot be combined with --mixed_precision fp16 (its loss scaling does not reach the sharded "
    "gradients); use bf16"
)


def check_fsdp(config, run) -> None:
    """``--fsdp``'s combinations, before any work (:class:`~fastpref.train.arguments.ArgumentError`)."""
    from .arguments import ArgumentError

    if not config.fsdp:
        return
    if config.use_8bit_adam:
        raise ArgumentError("--fsdp: cannot be combined with --use_8bit_adam (AdamW8bit takes no DTensor)")
    if config.mixed_precision == "fp16":
        raise ArgumentError(FP16_MESSAGE)


def mesh_of(accelerator):
    """The 1-D device mesh of every process of ``accelerator`` (its process group: gloo or NCCL).
    The process groups are destroyed at exit, before the interpreter tears down their threads (a
    gloo process left to that aborts now and then: "terminate called without an active exception")."""
    import atexit

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return init_device_mesh(accelerator.device.type, (accelerator.num_processes,))


def shard(module: torch.nn.Module, blocks: List[torch.nn.Module], mesh, param_dtype: Optional[torch.dtype]) -> None:
    """``fully_shard`` each of ``blocks`` (in call order), then ``module`` itself (the parameters
    left). A trained module keeps its last block and its root gathered after the forward (its
    backward comes next); a frozen one (no parameter requires grad: no backward) frees every
    gathered parameter after its forward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    frozen = not any(p.requires_grad for p in module.parameters())
    for index, block in enumerate(blocks):
        reshard = frozen or index < len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=True if frozen else None)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself otherwise): in-place ops on it update the DTensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class ShardedModelFootprints(ModelFootprints):
    """:class:`~fastpref.train.footprints.ModelFootprints` whose copies are sharded like the
    policy (:meth:`shard_all`); the update and the state work on the local shards (a checkpoint
    saves each process's own, see :func:`save_sharded`)."""

    def shard_all(self, blocks_of, mesh, param_dtype) -> None:
        """Shard each footprint (``blocks_of(module)``: its blocks), then track the tensors by name
        (FSDP2 replaces the parameters by DTensors)."""
        for model in self.models:
            shard(model, blocks_of(model), mesh, param_dtype)
        self.names = [n for n, p in self.unet.named_parameters() if p.requires_grad]
        self._policy, self._ema = [], []  # the unsharded tensors: let them go

    def _policy_tensors(self) -> List[torch.Tensor]:
        params = dict(self.unet.named_parameters())
        return [local(params[n]) for n in self.names]

    def _tensors(self, k: int) -> List[torch.Tensor]:
        params = dict(self.models[k].named_parameters())
        return [local(params[n]) for n in self.names]

    def state_dict(self) -> dict:
        """The decays and the update count; the tensors are in the sharded state (:func:`save_sharded`)."""
        return {"decays": list(self.decays), "warmup": self.warmup, "num_updates": self.num_updates, "tensors": None}

    def load_state_dict(self, state: dict) -> None:
        if [float(d) for d in state["decays"]] != self.decays:
            raise ValueError(f"checkpoint footprints have decays {state['decays']}, this run {self.decays}")
        if state["tensors"] is not None:
            raise ValueError("the checkpoint was not written by a --fsdp run: resume it without --fsdp")
        self.num_updates = int(state["num_updates"])


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """The global norm of the sharded gradients (one all-reduce) as a plain tensor; clips them to
    ``max_norm`` when it is > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


# -- checkpoints -------------------------------------------------------------------------------------


def sharded_state(trainer) -> dict:
    """What a sharded checkpoint holds beyond accelerate's files: the policy, the optimizer and the
    footprints, each as DCP state dicts (DTensors: every process writes its shards)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {
        "policy": get_model_state_dict(trainer.unet),
        "optimizer": get_optimizer_state_dict(trainer.unet, trainer.optimizer),
    }
    if trainer.footprints is not None:
        for k, model in enumerate(trainer.footprints.models):
            state[f"footprint_{k}"] = get_model_state_dict(model)
    return state


def save_sharded(trainer, folder) -> None:
    """Write :func:`sharded_state` into ``folder/sharded_state`` (every process, collectively)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(sharded_state(trainer), checkpoint_id=str(Path(folder) / SHARDED_STATE))


def load_sharded(trainer, folder) -> None:
    """Load what :func:`save_sharded` wrote into the trainer's sharded models and optimizer (the
    same world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = sharded_state(trainer)
    dcp.load(state, checkpoint_id=str(Path(folder) / SHARDED_STATE))
    set_model_state_dict(trainer.unet, state["policy"])
    set_optimizer_state_dict(trainer.unet, trainer.optimizer, state["optimizer"])
    if trainer.footprints is not None:
        for k, model in enumerate(trainer.footprints.models):
            set_model_state_dict(model, state[f"footprint_{k}"])


def install_sharded_hooks(accelerator, trainer) -> None:
    """accelerate's ``save_state`` / ``load_state`` also write / read the sharded state (in a
    checkpoint's ``sharded_state/``): its own files keep the LR schedule, the RNG states and the
    trainer's counters, as without ``--fsdp``."""

    def save_hook(models, weights, output_dir):
        save_sharded(trainer, output_dir)

    def load_hook(models, input_dir):
        load_sharded(trainer, input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def full_state_dict(module) -> dict:
    """The whole state dict of a sharded module on the CPU of the main process (every process
    must call it: the shards are gathered); ``{}`` on the others."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_pretrained(module, folder, is_main: bool) -> None:
    """``save_pretrained`` of a sharded diffusers model, consolidated: its full state dict loaded
    into an unsharded copy built on the meta device from its config (collective; the main
    process writes)."""
    from accelerate import init_empty_weights
    from torch.distributed.fsdp import FSDPModule

    state = full_state_dict(module)
    if not is_main:
        return
    cls = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))  # the class fully_shard extended
    with init_empty_weights():
        whole = cls.from_config(module.config)
    whole.load_state_dict(state, assign=True)
    whole.save_pretrained(str(folder), safe_serialization=True)


def export_checkpoint(checkpoint, denoiser_config: dict, output_dir) -> Path:
    """The policy of a ``--fsdp`` checkpoint as a diffusers folder, in one process, on request:
    the denoiser (class and config: ``denoiser_config``, its ``config.json``) built on the CPU,
    the checkpoint's policy read into it with ``torch.distributed.checkpoint`` (the policy only:
    not the optimizer or footprints), then ``save_pretrained`` into ``output_dir``; returns it."""
    import diffusers
    import torch.distributed.checkpoint as dcp

    state_dir = Path(checkpoint) / SHARDED_STATE
    if not (state_dir / ".metadata").is_file():
        raise FileNotFoundError(f"{checkpoint}: no {SHARDED_STATE}/.metadata (not a checkpoint of a --fsdp run)")
    model = getattr(diffusers, denoiser_config["_class_name"]).from_config(denoiser_config)
    state = {"policy": model.state_dict()}
    with warnings.catch_warnings():  # one process on purpose (no_dist): DCP's warning says so again
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, checkpoint_id=str(state_dir), no_dist=True)
    model.load_state_dict(state["policy"])
    model.save_pretrained(str(output_dir), safe_serialization=True)
    return Path(output_dir)


def main(argv=None) -> int:
    """``python -m fastpref.train.sharding CHECKPOINT --pretrained_model_name_or_path P --output_dir OUT``."""
    import argparse

    from .models import ModelSource

    parser = argparse.ArgumentParser(
        prog="python -m fastpref.train.sharding",
        description="Write the policy of a --fsdp checkpoint as a diffusers folder (save_pretrained).",
    )
    parser.add_argument("checkpoint", help="a checkpoint-N folder of a --fsdp run")
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="the pipeline the run trained")
    parser.add_argument("--output_dir", required=True, help="where the denoiser folder goes")
    args = parser.parse_args(argv)
    source = ModelSource(args.pretrained_model_name_or_path)
    config = source.configs[source.family.denoiser_folder]
    print(export_checkpoint(args.checkpoint, config, args.output_dir))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
