"""The run's model card, ``OUTPUT_DIR/README.md``: the base model, the objective, the
hyper-parameters and the last validation images, on diffusers' training model-card template with
``populate_model_card``'s tags. (diffusers' ``load_or_create_model_card`` first looks the card up
on the Hub, a network call that an offline run cannot make and whose older card would win; this
run's card is always new, so it is made from the same template and metadata directly.)"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

CARD_FILE = "README.md"


def describe(base_model: str, objective: str, hyperparameters: Dict[str, object], images: Sequence[Path]) -> str:
    """The card's body (markdown): what was trained, on what, how, and the validation images
    (``images``: paths relative to the card's folder)."""
    lines = [
        f"# Preference fine-tune of {base_model}",
        "",
        f"Trained with `fastpref train`, objective **{objective}**, on top of `{base_model}`.",
        "",
        "## Hyper-parameters",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    lines += [f"| `{name}` | `{value}` |" for name, value in hyperparameters.items()]
    if images:
        lines += ["", "## Validation images", ""]
        lines += [f"![{image.stem}]({image.as_posix()})" for image in images]
    return "\n".join(lines) + "\n"


def write_model_card(
    output_dir: Path,
    base_model: str,
    family,
    objective: str,
    hyperparameters: Dict[str, object],
    prompts: Sequence[str] = (),
    images: Sequence[Path] = (),
    lora: bool = True,
) -> Path:
    """Write ``output_dir/README.md``; ``images``: the last validation images (absolute paths,
    one per prompt of ``prompts``), shown in the card and as the Hub widget; ``family``: the
    model's :class:`~fastpref.train.families.base.ModelFamily` (license, tags). Returns the file."""
    from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    output_dir = Path(output_dir)
    relative = [Path(image).relative_to(output_dir) for image in images]
    widget: List[dict] = [
        {"text": prompt, "output": {"url": image.as_posix()}} for prompt, image in zip(prompts, relative)
    ]
    data = ModelCardData(
        license=family.card_license,
        library_name="diffusers",
        inference=True,
        base_model=base_model,
        widget=widget or None,
    )
    card = ModelCard.from_template(
        card_data=data,
        template_path=MODEL_CARD_TEMPLATE_PATH,
        model_description=describe(base_model, objective, hyperparameters, relative),
    )
    tags = ["text-to-image", "diffusers", "diffusers-training", "diffusion-dpo", "fastpref", *family.card_tags]
    card = populate_model_card(card, tags=tags + (["lora"] if lora else []))
    card.save(str(output_dir / CARD_FILE))
    return output_dir / CARD_FILE
