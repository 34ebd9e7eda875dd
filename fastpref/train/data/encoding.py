"""Encoding a batch for the trainer (:class:`BatchEncoder`) and the count of the rows passed over
at fetch, kept across checkpoints (:class:`FetchSkips`)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import List, Optional, Sequence

from .log import format_rows, logger


class FetchSkips:
    """The source rows passed over at fetch because they do not decode, each counted once.

    :meth:`install` saves them in every checkpoint (``fetch_skips.json``, through accelerate's
    save/load state hooks, so the other checkpointed objects keep their numbers) and restores
    them on resume, so a resumed run reports the same counts as an uninterrupted one."""

    FILE = "fetch_skips.json"

    def __init__(self):
        self.rows: set = set()

    def install(self, accelerator) -> None:
        """Write ``FILE`` into every checkpoint ``accelerator.save_state`` writes (main process),
        and read it back in ``load_state`` (a checkpoint without it: nothing skipped)."""
        from ...files import write_json_atomic

        def save(models, weights, output_dir):
            if accelerator.is_main_process:
                Path(output_dir).mkdir(parents=True, exist_ok=True)
                write_json_atomic(Path(output_dir) / self.FILE, self.state_dict())

        def load(models, input_dir):
            file = Path(input_dir) / self.FILE
            self.load_state_dict(json.loads(file.read_text()) if file.exists() else {"rows": []})

        accelerator.register_save_state_pre_hook(save)
        accelerator.register_load_state_pre_hook(load)

    def record(self, rows: Sequence[int]) -> List[int]:
        """Add ``rows``; returns those not seen before, sorted."""
        new = sorted(set(int(r) for r in rows) - self.rows)
        self.rows.update(new)
        return new

    def state_dict(self) -> dict:
        return {"rows": sorted(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        self.rows = set(int(r) for r in state["rows"])


class BatchEncoder:
    """Turns a collated batch (pixels and captions, or cached latents and embeddings) into the
    trainer's batch (:mod:`fastpref.train.trainer`) with the model ``family``'s encoding and
    conditioning (the same functions the latent cache encodes with, so both paths give the same
    numbers); the encoders are needed for pixels only, and the VAE encodes ``vae_batch_size``
    images at a time. With ``offload`` (``--offload``, as diffusers' SD3/FLUX scripts) the VAE
    and the text encoders live on the CPU and are moved to ``device`` only to encode a batch,
    then back: the accelerator's memory holds them only while they encode (the numbers are the
    same: only where the weights wait changes).

    The rows a batch passed over at fetch (``skipped_rows``) are recorded in ``skips`` (a
    :class:`FetchSkips`; with ``gather``, e.g. ``accelerator.gather_object``, those of every
    process) and ``summary["undecodable_at_fetch"]`` is kept up to date with their count."""

    def __init__(
        self,
        family,
        vae,
        tokenizers,
        text_encoders,
        resolution: int,
        device,
        *,
        vae_batch_size: Optional[int] = None,
        offload: bool = False,
        skips: Optional[FetchSkips] = None,
        summary: Optional[dict] = None,
        gather=None,
    ):
        self.family = family
        self.vae, self.tokenizers, self.text_encoders = vae, tokenizers, text_encoders
        self.resolution, self.device, self.vae_batch_size = resolution, device, vae_batch_size
        self.offload = offload
        self.skips = skips if skips is not None else FetchSkips()
        self.summary = summary if summary is not None else {}
        self.gather = gather

    def count_skips(self, batch: dict) -> None:
        rows = list(batch.get("skipped_rows", ()))
        if self.gather is not None:
            rows = list(self.gather(rows))
        new = self.skips.record(rows)
        if new:
            logger.warning("rows passed over at fetch (undecodable): %s", format_rows(new))
        self.summary["undecodable_at_fetch"] = len(self.skips.rows)

    @contextlib.contextmanager
    def encoders_on_device(self):
        """The VAE and text encoders on ``device`` inside the block; with ``offload``, moved there
        on entry and back to the CPU on exit (also when encoding raises)."""
        if not self.offload:
            yield
            return
        modules = [self.vae, *self.text_encoders]
        for module in modules:
            module.to(self.device)
        try:
            yield
        finally:
            for module in modules:
                module.to("cpu")

    def __call__(self, batch: dict) -> dict:
        self.count_skips(batch)
        labels = ("flipped", "synthetic_label", "human_label", "human_mask", "propensity")
        out = {k: batch[k] for k in labels if k in batch}
        if "latents" in batch:  # cached: the text conditioning is in the batch too
            out["latents"] = batch["latents"]
        else:
            pixels = batch["pixel_values"].to(self.device)
            with self.encoders_on_device():
                out["latents"] = self.family.encode_images(self.vae, pixels, self.vae_batch_size).float()
                text = self.family.encode_prompts(batch["captions"], self.tokenizers, self.text_encoders)
            batch = {**batch, **text}
        out.update(self.family.batch_conditioning(batch, self.resolution))
        return out
