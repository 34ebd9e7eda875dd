"""The preference-training step: policy, reference and EMA footprints of a diffusion model's
denoiser, the optimizer and LR schedule, and ``fastpref.adaptive_dpo_loss`` -- everything but
data loading. What depends on the model (noising, target, the denoiser's call, LoRA targets) is
its family's (:mod:`fastpref.train.families`). ``fastpref train`` feeds it encoded Pick-a-Pic
batches, the toy-world demo toy latents; both run this same :class:`PreferenceTrainer`.
"""

from __future__ import annotations

import contextlib

import torch

from .. import adaptive_dpo_loss
from . import families
from .config import TrainConfig
from .footprints import AdapterFootprints, ModelFootprints, adapters_disabled, lora_layers

DEDPO_LABELS = ("synthetic_label", "human_label", "human_mask", "propensity")  # the batch's loss keywords


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss."""


def metric_is_on(micro_step: int, warmup_micro_steps: int, micro_steps_per_epoch=None) -> bool:
    """Whether the metric u is on at ``micro_step`` (0-based): past the warm-up of
    ``warmup_micro_steps`` micro-steps, counted from the run's start, or with
    ``micro_steps_per_epoch`` from each epoch's start (the authors' recipe: their warm-up tests
    the dataloader's index within the epoch)."""
    if micro_steps_per_epoch:
        micro_step %= micro_steps_per_epoch
    return micro_step >= warmup_micro_steps


def step_seed(seed: int, micro_step: int) -> int:
    """The noise seed of one micro-step: a fixed mix of the run seed and the step (63 bits)."""
    return (int(seed) * 0x9E3779B97F4A7C15 + int(micro_step) * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


class PreferenceTrainer:
    """Policy, reference, footprints, optimizer and LR schedule of one preference-training run.

        trainer = PreferenceTrainer(unet, noise_scheduler, TrainConfig(loss_type="adaptive", ...))
        for batch in batches:                       # per process: B pairs
            out = trainer.train_step(batch)         # one micro-batch; out["stepped"] at the last of
                                                    # gradient_accumulation_steps micro-batches

    A batch is a dict of tensors (any device; moved to the accelerator's). Per-image tensors come
    in the ``[2B, ...]`` layout of the loss: the B preferred images (as labelled), then the B
    rejected ones, pair i at rows i and B + i (``fastpref.train.data.collate_pairs`` makes it)::

        latents                [2B, C, h, w]    float, winners then losers
        (the family's conditioning, see its denoiser_inputs; SD 1.5 and SDXL:)
        encoder_hidden_states  [B, L, D]        text conditioning, one per pair
        pooled_prompt_embeds   [B, P]           SDXL only (text_embeds of added_cond_kwargs)
        add_time_ids           [2B, 6]          SDXL only, per image (original size, crop, target size)
        flipped                [B] bool         optional: pairs whose label was flipped on purpose
        synthetic_label, human_label, propensity  [B] float, human_mask [B] bool: loss_type "dedpo"

    Per step: one noise draw and one timestep per pair, shared by both images (the same for a
    pair on any number of processes: drawn for the global batch from ``(seed, micro-step)``, so a
    resumed or a distributed run sees the same noise); the reference forward (LoRA: the same UNet
    with its adapters disabled; full fine-tune: a frozen copy in the weight dtype) and the K
    footprint forwards, without grad; the policy forward; the loss; backward; and at the end of
    each accumulation window gradient clipping, the optimizer and LR-schedule steps and the
    footprint update. A non-finite loss (or gradient norm) skips its whole window (no optimizer
    or footprint update; checked once per window, the step's only host sync besides logging) and
    is counted; ``max_nonfinite_steps`` skipped windows in a row raise :class:`NonFiniteLossError`.

    The metric warm-up follows the authors' code: for the first ``metric_warmup_steps``
    micro-steps (default ``2 * gradient_accumulation_steps``) u is taken as 0 -- W = 1 and
    Gamma = c2 (the batch mean of l), computed without the footprint forwards. With
    ``footprint_recipe="authors"`` the footprints are kept in the mixed-precision dtype and the
    warm-up restarts at every epoch of ``micro_steps_per_epoch`` micro-steps.

    Args:
        unet: the denoiser holding the initial policy (= the reference), e.g. a diffusers
            ``UNet2DConditionModel``. It is trained in place (LoRA adapters are added to it when
            ``config.lora_rank > 0``).
        noise_scheduler: the family's training noise scheduler (SD: a ``DDPMScheduler``).
        config: :class:`TrainConfig`.
        accelerator: an ``accelerate.Accelerator``; ``None`` builds one (one process, the
            config's mixed precision, no trackers).
        family: the :class:`~fastpref.train.families.base.ModelFamily` of ``unet``; ``None``
            recognises it from ``unet.config`` (:func:`~fastpref.train.families.of_denoiser`).
        micro_steps_per_epoch: this process's micro-batches per pass over the data; read by the
            authors' footprint recipe only (its per-epoch warm-up; ``None``: one warm-up per run).

    Attributes: ``unet`` (the policy as prepared by accelerate), ``optimizer``,
    ``lr_scheduler``, ``footprints`` (``None`` when the loss needs no u), ``micro_step``,
    ``global_step`` (optimizer steps, skipped ones included), ``skipped_steps``.
    """

    def __init__(
        self, unet, noise_scheduler, config: TrainConfig, accelerator=None, family=None, micro_steps_per_epoch=None
    ):
        from accelerate import Accelerator
        from diffusers.optimization import get_scheduler

        self.config = config
        self.family = (family if family is not None else families.of_denoiser(unet)).configured(config)
        if accelerator is None:
            accelerator = Accelerator(mixed_precision=config.mixed_precision)
        self.accelerator = accelerator
        self.noise_scheduler = noise_scheduler
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            accelerator.mixed_precision, torch.float32
        )

        self.reference = self._prepare_policy(unet, accelerator.device)
        # --fsdp: the policy, reference and footprints sharded per block (fastpref.train.sharding)
        self.sharded = config.fsdp and accelerator.num_processes > 1
        self.footprints = None
        authors = config.footprint_recipe == "authors"
        self.micro_steps_per_epoch = micro_steps_per_epoch if authors else None
        if config.uses_footprints:
            kind = AdapterFootprints if config.lora_rank > 0 else ModelFootprints
            if self.sharded:
                from .sharding import ShardedModelFootprints as kind
            dtype = self.weight_dtype if authors else torch.float32
            self.footprints = kind(unet, config.ema_decays, warmup=config.ema_warmup, dtype=dtype)
        if self.sharded:
            self._shard(unet)
        self._lora_layers = lora_layers(unet) if config.lora_rank > 0 else []
        self.params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = self._make_optimizer()
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=config.max_train_steps,
            num_cycles=config.lr_num_cycles,
            power=config.lr_power,
        )
        if self.sharded:  # neither wrapped nor saved by accelerate: sharding.install_sharded_hooks saves them
            from .sharding import install_sharded_hooks

            self.unet, self.optimizer = unet, optimizer
            install_sharded_hooks(accelerator, self)
        else:
            self.unet, self.optimizer = accelerator.prepare(unet, optimizer)
        accelerator.register_for_checkpointing(self.lr_scheduler)
        accelerator.register_for_checkpointing(self)  # state_dict(): counters and footprints

        self.micro_step = 0
        self.global_step = 0
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0
        self._window_finite = None  # device bool: every loss of the accumulation window was finite

    def _prepare_policy(self, unet, device):
        """Make ``unet`` the trainable policy on ``device``; returns the reference module, or
        ``None`` for LoRA (the reference is then the UNet with its adapters disabled). LoRA: the
        frozen base in the weight dtype, float32 adapters on the attention projections; full
        fine-tune: float32 weights and a frozen copy in the weight dtype."""
        config = self.config
        unet.requires_grad_(False)
        reference = None
        if config.lora_rank > 0:
            from peft import LoraConfig

            _move(unet, device, self.weight_dtype)
            unet.add_adapter(
                LoraConfig(
                    r=config.lora_rank,
                    lora_alpha=config.lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=list(self.family.lora_targets),
                )
            )
            for param in unet.parameters():  # the trainable LoRA tensors stay float32
                if param.requires_grad:
                    param.data = param.data.float()
        else:
            _move(unet, device, torch.float32)
            reference = _frozen_copy(unet, self.weight_dtype)
            unet.requires_grad_(True)
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        return reference

    def _shard(self, unet) -> None:
        """``--fsdp``: shard the policy, the reference and the footprints on one mesh, per block."""
        from .sharding import FP16_MESSAGE, mesh_of, shard

        if self.accelerator.mixed_precision == "fp16":  # accelerate's configuration may set it
            raise ValueError(FP16_MESSAGE)
        mesh = mesh_of(self.accelerator)
        gathered = None if self.weight_dtype == torch.float32 else self.weight_dtype
        shard(unet, self.family.shard_blocks(unet), mesh, gathered)
        shard(self.reference, self.family.shard_blocks(self.reference), mesh, None)
        if self.footprints is not None:
            self.footprints.shard_all(self.family.shard_blocks, mesh, gathered)

    def _make_optimizer(self):
        """AdamW (bitsandbytes' AdamW8bit with ``use_8bit_adam``) over the trainable tensors."""
        config = self.config
        optimizer_class = torch.optim.AdamW
        if config.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError as error:
                raise ImportError("use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from error
            optimizer_class = bnb.optim.AdamW8bit
        return optimizer_class(
            self.params,
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay,
            eps=config.adam_epsilon,
        )

    # -- forwards --------------------------------------------------------------------------

    @property
    def base_unet(self):
        """The policy module without its DDP wrapper."""
        return self.accelerator.unwrap_model(self.unet)

    @torch.no_grad()
    def _reference_pred(self, noisy, timesteps, inputs):
        with self.accelerator.autocast():
            if self.reference is not None:
                return self.family.denoise(self.reference, noisy, timesteps, inputs)
            with adapters_disabled(self._lora_layers):
                return self.family.denoise(self.base_unet, noisy, timesteps, inputs)

    @torch.no_grad()
    def _footprint_preds(self, noisy, timesteps, inputs):
        preds = []
        with self.accelerator.autocast():
            for k in range(len(self.footprints)):
                with self.footprints.use(k) as module:
                    preds.append(self.family.denoise(module, noisy, timesteps, inputs))
        return preds

    # -- one micro-batch ---------------------------------------------------------------------

    def _noise(self, latents: torch.Tensor):
        """Noise ``[2B, ...]`` and timesteps ``[2B]`` of this micro-step and process: drawn for the
        global batch from ``(seed, micro_step)``, this process's pairs sliced out, repeated for
        both images of each pair."""
        pairs = latents.shape[0] // 2
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        generator = torch.Generator(device="cpu").manual_seed(step_seed(self.config.seed, self.micro_step))
        noise = torch.randn((world * pairs, *latents.shape[1:]), generator=generator, dtype=torch.float32)
        timesteps = self.family.draw_timesteps(self.noise_scheduler, generator, world * pairs, self.config.is_turbo)
        mine = slice(rank * pairs, (rank + 1) * pairs)
        noise = noise[mine].to(latents.device, latents.dtype).repeat(2, *([1] * (latents.dim() - 1)))
        return noise, timesteps[mine].to(latents.device).repeat(2)

    def _gather_global(self, model_pred, ref_pred, target, ema_preds):
        """All processes' pairs, winners then losers in process order, with ``model_pred``'s own
        rows keeping their gradient (the others are constants)."""
        accelerator = self.accelerator
        pairs = model_pred.shape[0] // 2

        def gather(t):  # [2B, ...] -> [2PB, ...] in global winners-then-losers order
            every = accelerator.gather(t.detach().contiguous()).reshape(
                accelerator.num_processes, 2, pairs, *t.shape[1:]
            )
            return every.transpose(0, 1).reshape(-1, *t.shape[1:])

        every = list(gather(model_pred).split(pairs))
        rank, world = accelerator.process_index, accelerator.num_processes
        every[rank], every[world + rank] = model_pred[:pairs], model_pred[pairs:]
        shared = gather(target) if target.shape[0] == 2 * pairs else accelerator.gather(target.detach().contiguous())
        return torch.cat(every), gather(ref_pred), shared, [gather(p) for p in ema_preds]

    def train_step(self, batch: dict) -> dict:
        """Run one micro-batch (see the class docstring for ``batch``); returns logs: floats
        ``loss``, ``implicit_acc``, ``u_mean``, ``weight_mean``, ``margin_mean`` (and ``u_flipped``
        / ``u_kept`` when the batch says which pairs were flipped), ``lr``, ``stepped`` (bool: an
        optimizer step ended here), ``skipped`` (bool: this window was skipped), ``metric_on``;
        and detached ``[B]`` tensors ``u``, ``confidence`` (c), ``stability`` (s), ``weight``,
        ``margin``, ``l_theta``, ``flipped``."""
        config, accelerator = self.config, self.accelerator
        inputs = self.family.denoiser_inputs(batch, accelerator.device, self.weight_dtype)
        latents = batch["latents"].to(accelerator.device, torch.float32)
        pairs = latents.shape[0] // 2
        noise, timesteps = self._noise(latents)
        noisy = self.family.add_noise(self.noise_scheduler, latents, noise, timesteps).to(self.weight_dtype)
        target = self.family.target(self.noise_scheduler, latents, noise, timesteps)

        metric_on = self.footprints is not None and metric_is_on(
            self.micro_step, config.warmup_micro_steps, self.micro_steps_per_epoch
        )
        last_of_window = (self.micro_step + 1) % config.gradient_accumulation_steps == 0
        ref_pred = None if config.loss_type == "sft" else self._reference_pred(noisy, timesteps, inputs)
        ema_preds = self._footprint_preds(noisy, timesteps, inputs) if metric_on else []

        sync = (
            accelerator.no_sync(self.unet)
            if (not last_of_window and accelerator.num_processes > 1)
            else contextlib.nullcontext()
        )
        with sync:
            with accelerator.autocast():
                model_pred = self.family.denoise(self.unet, noisy, timesteps, inputs)
            loss, stats, backward_loss = self._loss(batch, model_pred, ref_pred, target, ema_preds, metric_on)
            # No host sync here: the window's finiteness is collected on the device and read once,
            # at the window's end, after the backward passes are queued.
            finite = torch.isfinite(loss.detach()).all()
            self._window_finite = finite if self._window_finite is None else self._window_finite & finite
            accelerator.backward(backward_loss / config.gradient_accumulation_steps)

        skipped = self._end_window() if last_of_window else False
        self.micro_step += 1
        if self.nonfinite_in_a_row >= config.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss "
                f"(last at step {self.global_step}); lower the learning rate or beta, or check the data"
            )
        return self._logs(loss, stats, batch, pairs, metric_on, last_of_window, skipped)

    def _loss(self, batch, model_pred, ref_pred, target, ema_preds, metric_on):
        """``(loss, stats, loss to backpropagate)``: SFT's MSE on the winners, or
        ``fastpref.adaptive_dpo_loss`` (over the global batch with ``global_metric``)."""
        config, accelerator = self.config, self.accelerator
        pairs = model_pred.shape[0] // 2
        if config.loss_type == "sft":
            loss = torch.nn.functional.mse_loss(model_pred[:pairs].float(), target[:pairs].float())  # winners only
            return loss, None, loss
        labels = {}
        if config.loss_type == "dedpo":
            labels = {k: batch[k].to(accelerator.device) for k in DEDPO_LABELS}
        scale = 1.0
        inputs = (model_pred, ref_pred, target, ema_preds)
        if config.global_metric and accelerator.num_processes > 1:
            inputs = self._gather_global(*inputs)
            labels = {k: accelerator.gather(v) for k, v in labels.items()}
            scale = float(accelerator.num_processes)  # DDP averages grads; each process holds the global loss
        loss, stats = adaptive_dpo_loss(
            inputs[0],
            inputs[1],
            inputs[2],
            ema_preds=inputs[3],
            return_stats=True,
            **config.loss_keywords(metric_on),
            **labels,
        )
        return loss, stats, loss * scale

    def _end_window(self) -> bool:
        """The end of an accumulation window: clip, then step the optimizer and the footprints if
        every loss and the gradient norm were finite on every process, else skip; step the LR
        schedule either way. Returns whether the window was skipped."""
        config, accelerator = self.config, self.accelerator
        if self.sharded:
            from .sharding import clip_grad_norm

            grad_norm = clip_grad_norm(self.params, config.max_grad_norm)
        elif config.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(self.params, config.max_grad_norm)
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
        ok = (self._window_finite & torch.isfinite(grad_norm).to(self._window_finite.device)).to(torch.float32)
        if accelerator.num_processes > 1:  # every process skips together (a loss can be non-finite on one only)
            ok = accelerator.reduce(ok, reduction="sum") / accelerator.num_processes
        skipped = not bool(ok.item() == 1.0)  # the one host sync of the window
        if skipped:
            self.skipped_steps += 1
            self.nonfinite_in_a_row += 1
        else:
            self.optimizer.step()
            if self.footprints is not None:
                self.footprints.update()
            self.nonfinite_in_a_row = 0
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        self.global_step += 1
        self._window_finite = None
        return skipped

    def _logs(self, loss, stats, batch, pairs, metric_on, stepped, skipped) -> dict:
        logs = {
            "loss": float(loss.detach()),
            "lr": float(self.lr_scheduler.get_last_lr()[0]),
            "stepped": stepped,
            "skipped": skipped,
            "metric_on": metric_on,
        }
        if stats is not None:
            rank = self.accelerator.process_index
            local = slice(None)
            if stats["u"].shape[0] != pairs:  # global metric: this process's pairs
                local = slice(rank * pairs, (rank + 1) * pairs)
            names = ("u", "confidence", "stability", "weight", "margin", "l_theta")
            per_pair = {name: stats[name][local].detach() for name in names}
            logs.update(per_pair)
            logs["implicit_acc"] = float(stats["implicit_acc"])
            logs["u_mean"] = float(per_pair["u"].float().mean()) if metric_on else 0.0
            logs["weight_mean"] = float(per_pair["weight"].float().mean())
            logs["margin_mean"] = float(per_pair["margin"].float().mean())
            if "flipped" in batch:
                flipped = batch["flipped"].to(per_pair["u"].device).bool()
                logs["flipped"] = flipped
                if metric_on and flipped.any():
                    logs["u_flipped"] = float(per_pair["u"][flipped].float().mean())
                if metric_on and (~flipped).any():
                    logs["u_kept"] = float(per_pair["u"][~flipped].float().mean())
        return logs

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Counters and footprints (the model, optimizer, schedule and RNG are accelerate's)."""
        return {
            "micro_step": self.micro_step,
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "footprints": None if self.footprints is None else self.footprints.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.micro_step = int(state["micro_step"])
        self.global_step = int(state["global_step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        if (state["footprints"] is None) != (self.footprints is None):
            raise ValueError(
                "checkpoint and run disagree on whether EMA footprints are used (loss_type/weighting/margin)"
            )
        if self.footprints is not None:
            self.footprints.load_state_dict(state["footprints"])


def _move(module, device, dtype: torch.dtype) -> None:
    """``module.to(device, dtype)``, without casting (or diffusers' cast warning) when it has the dtype."""
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    module.to(device)


def _frozen_copy(unet, dtype: torch.dtype):
    import copy

    frozen = copy.deepcopy(unet)
    _move(frozen, next(unet.parameters()).device, dtype)
    return frozen.requires_grad_(False).eval()
