"""The scorers on tiny random models in the real ones' folder layouts and classes: each score is
its reference's formula, recomputed here from the model's own forward."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastpref.scorers import SCORERS, MissingExtraError, make_scorer, scorer_class
from fastpref.testing.tiny_scorers import make_tiny_scorers

PROMPTS = ["a red circle", "a blue square on a white background", "photo"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_scorers(tmp_path_factory.mktemp("scorers"))


def roles(weights, name):
    return {key.split(".", 1)[1]: value for key, value in weights.items() if key.startswith(name + ".")}


def images():
    return [Image.fromarray(np.random.RandomState(i).randint(0, 255, (40, 48, 3), dtype=np.uint8)) for i in range(3)]


def clip_logits(scorer):
    """``logit_scale.exp() * cos`` of each (image, prompt), from CLIPModel's own forward."""
    inputs = scorer.processor(text=PROMPTS, images=images(), padding=True, return_tensors="pt")
    with torch.no_grad():
        return scorer.model(**inputs).logits_per_image.diagonal()


def test_pickscore_is_logit_scale_times_cosine(weights):
    scorer = make_scorer("pickscore", roles(weights, "pickscore"))
    torch.testing.assert_close(scorer.score(images(), PROMPTS), clip_logits(scorer), rtol=1e-5, atol=1e-5)


def test_clip_score_is_100_times_the_clamped_cosine(weights):
    scorer = make_scorer("clip", roles(weights, "clip"))
    cosine = clip_logits(scorer) / scorer.model.logit_scale.exp()
    torch.testing.assert_close(scorer.score(images(), PROMPTS), 100 * cosine.clamp(min=0), rtol=1e-5, atol=1e-4)


def test_aesthetic_is_the_mlp_on_the_unit_image_embedding(weights):
    scorer = make_scorer("aesthetic", roles(weights, "aesthetic"))
    inputs = scorer.processor(images=images(), return_tensors="pt")
    with torch.no_grad():
        embeds = scorer.model.visual_projection(scorer.model.vision_model(**inputs).pooler_output)
        want = scorer.mlp.layers(embeds / embeds.norm(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(scorer.score(images(), PROMPTS), want, rtol=1e-5, atol=1e-5)
    assert set(torch.load(f"{weights['aesthetic.mlp']}/aesthetic-model.pth")) >= {"layers.0.weight", "layers.7.bias"}


def test_unknown_metric_and_unknown_weights_name_the_choices(weights):
    with pytest.raises(ValueError, match="--metrics: unknown metric 'pick'; choices: pickscore, hpsv2"):
        scorer_class("pick")
    with pytest.raises(
        ValueError, match="pickscore has no weights mlp; its weights: pickscore.model, pickscore.processor"
    ):
        make_scorer("pickscore", {"mlp": "x"})


@pytest.mark.parametrize(
    "name, package, extra", [("hpsv2", "open_clip", "hpsv2"), ("imagereward", "ImageReward", "imagereward")]
)
def test_a_missing_package_names_its_extra(monkeypatch, name, package, extra):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda module, *a: None if module == package else real(module, *a))
    with pytest.raises(
        MissingExtraError, match=rf"^the {name} scorer needs {package}: pip install 'fastpref\[{extra}\]'$"
    ):
        make_scorer(name)
    assert SCORERS[name].extra == extra


def test_the_readme_table_states_each_scorers_ids_scale_and_extra():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Evaluation: `fastpref eval`") : readme.index("## Benchmarks")]
    for name, scorer in SCORERS.items():
        row = next(line for line in section.splitlines() if line.startswith(f"| `{name}` |"))
        assert all(f"`{model_id}`" in row for model_id in scorer.weights.values()), name
        assert scorer.scale in row and scorer.extra in row, name
