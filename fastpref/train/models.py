"""Where a run's diffusers parts come from: :class:`ModelSource` (``--pretrained_model_name_or_path``,
``--revision``, ``--variant``, ``--pretrained_vae_model_name_or_path``), with the configs that
tell its model family (read once; a Hub id is asked once) and :meth:`ModelSource.family`."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Dict, Optional

MODEL_INDEX = "model_index.json"


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A diffusers pipeline (local folder or Hub id) at a ``revision``, with the weight files of
    ``variant`` (e.g. ``"fp16"``), and optionally another VAE (``vae_path``: a VAE folder or Hub
    id whose weights are at its root, as ``madebyollin/sdxl-vae-fp16-fix``)."""

    path: str
    revision: Optional[str] = None
    variant: Optional[str] = None
    vae_path: Optional[str] = None

    @classmethod
    def of(cls, data_args) -> "ModelSource":
        """The source named by ``fastpref train``'s :class:`~fastpref.train.arguments.DataArguments`."""
        return cls(
            str(data_args.pretrained_model_name_or_path),
            data_args.revision,
            data_args.variant,
            data_args.pretrained_vae_model_name_or_path,
        )

    @property
    def is_local(self) -> bool:
        return Path(self.path).expanduser().is_dir()

    def part(self, subfolder: str) -> dict:
        """``from_pretrained`` arguments of one part of the pipeline (``"unet"``, ``"text_encoder"``...)."""
        return dict(
            pretrained_model_name_or_path=self.path, subfolder=subfolder, revision=self.revision, variant=self.variant
        )

    def vae(self) -> dict:
        """``from_pretrained`` arguments of the VAE: ``vae_path`` (its root, read with the run's
        revision and variant, as diffusers' SDXL script reads it) or the pipeline's ``vae/``."""
        if self.vae_path is None:
            return self.part("vae")
        return dict(pretrained_model_name_or_path=self.vae_path, revision=self.revision, variant=self.variant)

    def _read(self, name: str) -> Optional[dict]:
        """The JSON file ``name`` of the pipeline: from a local folder (``None`` where it has no
        such file), or through the Hub's cache at ``revision`` (the Hub's errors propagate)."""
        folder = Path(self.path).expanduser()
        if folder.is_dir():
            file = folder / name
            return json.loads(file.read_text()) if file.is_file() else None
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(self.path, name, revision=self.revision)).read_text())

    @functools.cached_property
    def configs(self) -> Dict[str, dict]:
        """``{"model_index": model_index.json, <folder>: <folder>/config.json}`` for every
        denoiser folder a known family reads (``unet``, ...) that the pipeline has; read once per
        source. ``FileNotFoundError`` when a local folder has none of them; a Hub id's pipeline
        must have ``model_index.json``, which lists its folders."""
        from .families import FAMILIES

        found = {}
        index = self._read(MODEL_INDEX)
        if index is not None:
            found["model_index"] = index
        for folder in sorted({family.denoiser_folder for family in FAMILIES.values()}):
            if index is not None and folder not in index:
                continue  # a pipeline lists its parts: no need to ask for the others
            config = self._read(f"{folder}/config.json")
            if config is not None:
                found[folder] = config
        if len(found) == ("model_index" in found):
            raise FileNotFoundError(f"{self.path} is not a diffusers pipeline folder (no denoiser config.json)")
        return found

    @functools.cached_property
    def family(self):
        """The :class:`~fastpref.train.families.base.ModelFamily` that recognises this pipeline
        (from its configs, never its name); ``ValueError`` when none does."""
        from .families import recognise

        return recognise(self.configs, self.path)
