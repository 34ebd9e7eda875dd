"""The model-family seam: :class:`ModelFamily`, everything that differs between the diffusion
models ``fastpref train`` fine-tunes.

The trainer, the data layer, the latent cache and the CLI hold no test of which model they
train; they ask the run's family. A family answers five questions:

- **Is this pipeline mine?** :meth:`ModelFamily.recognises` reads the pipeline's configs
  (``model_index.json``, the denoiser's ``config.json``) through a
  :class:`~fastpref.train.models.ModelSource`, never its name.
- **What does it load, in which dtypes?** :meth:`load_denoiser`, :meth:`load_noise_scheduler`,
  :meth:`load_vae` (:meth:`vae_dtype`), :meth:`load_text_encoders`.
- **How is a batch encoded?** :meth:`encode_prompts` returns the per-caption conditioning as
  named tensors (what the latent cache stores, deduplicated per caption); :meth:`encode_images`
  the latents; :meth:`batch_conditioning` adds what depends on each image (SDXL's time ids).
- **How is a batch noised, what is the target, how is the denoiser called?**
  :meth:`draw_timesteps`, :meth:`add_noise`, :meth:`target`, :meth:`denoiser_inputs`,
  :meth:`denoise`. The trainer draws one Gaussian noise and one timestep per pair and gives
  both images of the pair the same; the family turns them into the noisy input and the target
  of the loss (shared ``[B, ...]`` or per image ``[2B, ...]``).
- **What does a run write?** The LoRA targets (:attr:`lora_targets`), the LoRA file
  (:meth:`save_lora_weights`), the full fine-tune's subfolder (:attr:`denoiser_folder`), the
  validation pipeline (:meth:`validation_pipeline`, :meth:`sampling`), the model card's license
  and tags, the defaults (beta, k1, resolution, tracker name).

**A flow-matching family** (SD3, FLUX: a transformer denoiser, three or two text encoders, a
``FlowMatchEulerDiscreteScheduler``, velocity targets, timestep densities) is one new module:
its :meth:`recognises` reads ``transformer/config.json``; :meth:`load_denoiser` loads the
transformer and :attr:`denoiser_folder` is ``"transformer"``; :meth:`encode_prompts` returns
its T5 and CLIP embeddings by name (the cache stores any names); :meth:`draw_timesteps` draws
sigmas from its density (logit-normal, mode, ...); :meth:`add_noise` interpolates
``(1 - sigma) x0 + sigma noise``; :meth:`target` returns the velocity ``noise - x0`` per image
(``[2B, ...]``); :meth:`denoiser_inputs` / :meth:`denoise` call the transformer (packing
FLUX's latents there); a per-sample loss weight, if its scheme has one, is the one thing the
loss's inputs would gain (it is applied as ``sqrt(w)`` on prediction and target instead, see
``docs/spec.md``). The step loop, the data layer and the cache stay as they are.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import torch


@dataclasses.dataclass(frozen=True)
class FamilyDefaults:
    """What a run of the family uses when the command leaves it: ``beta`` and ``k1`` (the
    Adaptive-DPO paper's per-model settings), the training ``resolution`` in pixels, and the
    trackers' project name (diffusers' DPO scripts' default)."""

    beta: float
    k1: float
    resolution: int
    tracker_name: str


@dataclasses.dataclass
class TextEncoders:
    """A family's tokenizers and text encoders, index-aligned, in eval mode."""

    tokenizers: Sequence
    encoders: Sequence


class ModelFamily(abc.ABC):
    """One kind of diffusion model (see the module docstring). Instances hold no mutable state: one
    per family, registered in :data:`fastpref.train.families.FAMILIES` (a run's settings are a
    configured copy, :meth:`configured`)."""

    #: the family's name (``"sd15"``), as logged, written in ``train_summary.json`` and cache metadata
    name: str
    #: the model's usual name ("SD 1.5")
    title: str
    #: what recognises it, for messages: "SD 1.5 (a UNet with no added conditioning, one CLIP text encoder)"
    description: str
    defaults: FamilyDefaults
    #: the pipeline subfolder of the denoiser (a full fine-tune writes its weights there)
    denoiser_folder: str = "unet"
    #: the pipeline subfolders whose files the cached latents and text embeddings depend on
    encoder_folders: Tuple[str, ...] = ()
    #: the names of the denoiser's modules that get LoRA adapters (peft ``target_modules``)
    lora_targets: Tuple[str, ...] = ()
    #: the model card's license and extra tags
    card_license: str = "other"
    card_tags: Tuple[str, ...] = ()
    #: whether ``--is_turbo`` (a distilled few-step checkpoint) applies
    has_turbo: bool = False
    #: whether the flow-matching flags (``--weighting_scheme``, ``--max_sequence_length``...) apply
    takes_flow_options: bool = False
    #: the training resolution must be a multiple of it (the VAE's 8; FLUX packs 2x2 latents: 16)
    resolution_multiple: int = 8

    def configured(self, config) -> "ModelFamily":
        """The family as a run with ``config`` (a ``TrainConfig``) uses it: a copy holding the
        run's family settings (the flow flags), or ``self`` when it has none."""
        return self

    def encoding_key(self) -> dict:
        """The settings the text embeddings depend on beyond the model (the latent cache's key
        holds them): ``{}`` by default; the flow families' ``max_sequence_length``."""
        return {}

    def settings_note(self) -> Optional[str]:
        """A start-up log line naming the family's run settings, if it has any."""
        return None

    # -- recognition ---------------------------------------------------------------------------

    @abc.abstractmethod
    def recognises(self, configs: Dict[str, dict]) -> bool:
        """Whether a pipeline is this family's, from its configs: ``{"model_index": ...,
        "<denoiser folder>": its config.json}`` as far as they exist (see
        :meth:`~fastpref.train.models.ModelSource.configs`)."""

    # -- loading -------------------------------------------------------------------------------

    @abc.abstractmethod
    def load_denoiser(self, source, dtype: torch.dtype) -> torch.nn.Module:
        """The denoiser of ``source`` (a :class:`~fastpref.train.models.ModelSource`) in ``dtype``."""

    @abc.abstractmethod
    def load_noise_scheduler(self, source, *, is_turbo: bool = False):
        """The training noise scheduler of ``source``."""

    def vae_dtype(self, force_upcast: bool, weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype the VAE runs in: ``weight_dtype`` unless the family says otherwise."""
        return weight_dtype

    def load_vae(self, source, weight_dtype: torch.dtype):
        """The VAE of ``source`` (or its ``vae_path``) in :meth:`vae_dtype`."""
        from diffusers import AutoencoderKL

        where = source.vae()
        config = AutoencoderKL.load_config(**{k: v for k, v in where.items() if k != "variant"})
        return AutoencoderKL.from_pretrained(
            **where, torch_dtype=self.vae_dtype(config.get("force_upcast", True), weight_dtype)
        )

    @abc.abstractmethod
    def load_text_encoders(self, source, dtype: torch.dtype, device) -> TextEncoders:
        """The tokenizers and text encoders of ``source``, in ``dtype`` on ``device``, eval mode."""

    def load_encoders(self, source, dtype: torch.dtype = torch.float32, device="cpu"):
        """``(vae, tokenizers, text_encoders)`` in eval mode on ``device``: the VAE in
        :meth:`vae_dtype`, the text encoders in ``dtype``."""
        vae = self.load_vae(source, dtype).to(device).eval()
        text = self.load_text_encoders(source, dtype, device)
        return vae, list(text.tokenizers), list(text.encoders)

    # -- encoding ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, vae, pixel_values: torch.Tensor, batch_size: Optional[int] = None) -> torch.Tensor:
        """Latents ``[N, C, h, w]`` of ``[N, 3, R, R]`` pixels in [-1, 1]: the VAE posterior's
        *mean* (deterministic: a cached latent depends on neither a generator nor its batch),
        ``(mean - shift_factor) * scaling_factor``, ``batch_size`` images per VAE call (all at
        once when None; ``--vae_encode_batch_size``). diffusers' DPO scripts sample instead; the
        SD VAE's posterior std is small next to the mean."""
        parameter = next(vae.parameters())
        pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
        step = batch_size or max(1, len(pixel_values))
        mean = torch.cat([vae.encode(part).latent_dist.mean for part in pixel_values.split(step)])
        shift = getattr(vae.config, "shift_factor", None)
        if shift:
            mean = mean - shift
        return mean * vae.config.scaling_factor

    @abc.abstractmethod
    def encode_prompts(self, captions: Sequence[str], tokenizers, text_encoders) -> Dict[str, torch.Tensor]:
        """The text conditioning of ``N`` captions as named tensors ``[N, ...]`` (the batch's and
        the latent cache's keys)."""

    def batch_conditioning(self, batch: dict, resolution: int) -> Dict[str, torch.Tensor]:
        """Conditioning that depends on each image of a collated batch (``original_sizes``,
        ``crop_top_lefts``), added to the trainer's batch; none by default."""
        return {}

    # -- the training step ---------------------------------------------------------------------

    @abc.abstractmethod
    def draw_timesteps(self, scheduler, generator: torch.Generator, count: int, is_turbo: bool) -> torch.Tensor:
        """``count`` timesteps from ``generator`` (drawn right after the step's noise)."""

    @abc.abstractmethod
    def add_noise(self, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """The noisy latents the denoiser sees."""

    @abc.abstractmethod
    def target(self, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """The regression target: ``[B, ...]`` when both images of a pair share it, else ``[2B, ...]``."""

    @abc.abstractmethod
    def denoiser_inputs(self, batch: dict, device, dtype: torch.dtype) -> dict:
        """The conditioning keyword tensors of the denoiser for the ``[2B, ...]`` noisy latents of
        a trainer batch (per-pair tensors repeated for both images), on ``device`` in ``dtype``.
        ``ValueError`` when the batch's shapes disagree."""

    @abc.abstractmethod
    def denoise(self, module, noisy: torch.Tensor, timesteps: torch.Tensor, inputs: dict) -> torch.Tensor:
        """The denoiser's prediction ``[2B, ...]``."""

    # -- memory: FSDP blocks and the memory plan's example batch ---------------------------------

    def shard_blocks(self, denoiser) -> list:
        """The submodules FSDP shards one by one (each gathered whole for its forward): the
        denoiser's repeated blocks, in call order; a block may follow submodules of its own in the
        list (they are sharded first, and the block keeps the parameters left). None by default
        (the whole denoiser is one unit)."""
        return []

    def example_batch(self, configs: Dict[str, dict], pairs: int, resolution: int) -> dict:
        """A trainer batch of ``pairs`` pairs at ``resolution`` px with the shapes and dtypes the
        pipeline's ``configs`` (as :meth:`recognises` gets them) imply, its tensors made in the
        current device mode (the memory plan calls it under a fake mode: no data, no memory)."""
        raise NotImplementedError(f"the {self.name} family has no example batch (no memory plan)")

    # -- outputs -------------------------------------------------------------------------------

    @abc.abstractmethod
    def save_lora_weights(self, layers: Dict[str, torch.Tensor], folder) -> None:
        """Write ``layers`` (the denoiser's LoRA in diffusers' key format) as
        ``folder/pytorch_lora_weights.safetensors``, as the family's pipeline saves it."""

    def pipeline_class(self):
        """The family's diffusers pipeline class (``StableDiffusionPipeline``, ...), for
        :meth:`load_pipeline`; a family with no pipeline need not define it."""
        raise NotImplementedError(f"{type(self).__name__} has no diffusers pipeline")

    def load_pipeline(self, source, denoiser, weight_dtype: torch.dtype, **parts):
        """The family's pipeline of ``source`` around ``denoiser`` (as its :attr:`denoiser_folder`
        part), its VAE from :meth:`load_vae`; ``parts`` replace others."""
        return self.pipeline_class().from_pretrained(
            source.path,
            revision=source.revision,
            variant=source.variant,
            torch_dtype=weight_dtype,
            vae=self.load_vae(source, weight_dtype),
            **{self.denoiser_folder: denoiser},
            **parts,
        )

    @abc.abstractmethod
    def validation_pipeline(self, source, denoiser, weight_dtype: torch.dtype, device):
        """A text-to-image pipeline of ``source`` around ``denoiser`` (adapters as they are)."""

    @abc.abstractmethod
    def sampling(self, is_turbo: bool, steps: Optional[int]) -> dict:
        """The validation pipeline call's ``num_inference_steps`` and ``guidance_scale``."""

    def beta_note(self, beta: float) -> Optional[str]:
        """A log line on how ``--beta_dpo`` compares with diffusers' script for this family, if it differs."""
        return None

    def __repr__(self) -> str:
        return f"<model family {self.name}>"
