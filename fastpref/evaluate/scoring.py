"""Scores of every image by one scorer, per (model, prompt, seed), each written atomically once;
an interrupted run scores only what is missing."""

from __future__ import annotations

from typing import Callable, Dict, Sequence

import numpy as np

from .generation import Item
from .store import image_file, read_score, score_file, write_score


def score_images(
    make_scorer: Callable,
    output_dir,
    metric: str,
    models: Sequence[str],
    work: Sequence[Item],
    *,
    batch_size: int,
    progress: bool,
) -> int:
    """Score each model's image of each item of ``work`` that has no score file yet, ``batch_size``
    per call; the scorer (``make_scorer()``) is loaded only if there is work. Returns how many."""
    from PIL import Image
    from tqdm.auto import tqdm

    todo = [
        (model, item) for model in models for item in work if not score_file(output_dir, metric, model, item).exists()
    ]
    if not todo:
        return 0
    scorer = make_scorer()
    bar = tqdm(total=len(todo), desc=f"scores {metric}", unit="img", disable=not progress)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        images = []
        for model, item in batch:
            with Image.open(image_file(output_dir, model, item)) as image:
                images.append(image.convert("RGB"))
        values = scorer.score(images, [item[1] for _, item in batch])
        for (model, item), value in zip(batch, values.tolist()):
            write_score(score_file(output_dir, metric, model, item), value)
        bar.update(len(batch))
    bar.close()
    return len(todo)


def read_scores(output_dir, metric: str, models: Sequence[str], prompts: Sequence[str], seeds: Sequence[int]):
    """``{model: [P, S] float64}`` of one metric from the score files (all must exist)."""
    out: Dict[str, np.ndarray] = {}
    for model in models:
        out[model] = np.array(
            [
                [read_score(score_file(output_dir, metric, model, (i, p, s))) for s in seeds]
                for i, p in enumerate(prompts)
            ]
        )
    return out
