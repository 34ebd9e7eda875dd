"""The model families ``fastpref train`` fine-tunes, one module each behind one interface
(:class:`~fastpref.train.families.base.ModelFamily`; its docstring says what a family owns and
how a flow-matching family fits): :data:`FAMILIES` by name, and :func:`recognise`, which picks
a pipeline's family from its configs."""

from __future__ import annotations

from types import MappingProxyType
from typing import Dict

from .base import FamilyDefaults, ModelFamily, TextEncoders
from .flux import FLUX
from .sd3 import SD3
from .sd15 import SD15
from .sdxl import SDXL

#: every family, by name; :func:`recognise` asks them in this order
FAMILIES = MappingProxyType({family.name: family for family in (SD15(), SDXL(), SD3(), FLUX())})


def recognise(configs: Dict[str, dict], where: str, families=None) -> ModelFamily:
    """The one family of ``families`` (default :data:`FAMILIES`) that recognises a pipeline
    from its ``configs`` (``{"model_index": ..., "unet": ...}``, see
    :meth:`~fastpref.train.models.ModelSource.configs`); ``ValueError`` naming ``where`` and
    what fastpref trains when none or several do."""
    families = list((families or FAMILIES).values())
    found = [family for family in families if family.recognises(configs)]
    if len(found) == 1:
        return found[0]
    trained = "; ".join(f"{family.name}: {family.description}" for family in families)
    if not found:
        denoisers = ", ".join(
            f"{name}: {config.get('_class_name', 'a model')}"
            for name, config in configs.items()
            if name != "model_index"
        )
        raise ValueError(
            f"{where}: no model family fastpref trains recognises this pipeline ({denoisers or 'no denoiser config'}); "
            f"it trains {trained}"
        )
    raise ValueError(f"{where}: recognised by several model families ({', '.join(f.name for f in found)})")


def of_denoiser(module) -> ModelFamily:
    """The family of an in-memory denoiser, from its config (as :func:`recognise` from a folder's)."""
    config = getattr(module, "config", None)
    config = {"_class_name": type(module).__name__, **(dict(config) if config is not None else {})}
    folder = "unet" if "addition_embed_type" in config else "transformer"  # every UNet2DConditionModel has it
    return recognise({folder: config}, type(module).__name__)


__all__ = [
    "FAMILIES",
    "FamilyDefaults",
    "ModelFamily",
    "TextEncoders",
    "recognise",
    "of_denoiser",
    "SD15",
    "SDXL",
    "SD3",
    "FLUX",
]
