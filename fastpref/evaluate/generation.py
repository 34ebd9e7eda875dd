"""Images of every (prompt, seed) from one model's pipeline: the work split across processes
(each a shard of the items), one PNG per item written atomically, items already on disk
skipped, so that a killed run resumes and a new model reuses the base's images."""

from __future__ import annotations

import os
import signal
from typing import Callable, List, Sequence, Tuple

import torch

from fastpref.files import write_atomic

from .store import image_file

Item = Tuple[int, str, int]  # (prompt index, prompt, seed)
FAULT_ENV = "FASTPREF_EVAL_FAULT"


def items(prompts: Sequence[str], seeds: Sequence[int]) -> List[Item]:
    """Every ``(prompt index, prompt, seed)``, prompt-major."""
    return [(index, prompt, seed) for index, prompt in enumerate(prompts) for seed in seeds]


def shard(work: Sequence, process_index: int, num_processes: int) -> list:
    """This process's share of ``work``: every ``num_processes``-th item from ``process_index``."""
    return list(work[process_index::num_processes])


def fault(written: int) -> None:
    """The test hook: SIGKILL this process once it has written ``$FASTPREF_EVAL_FAULT`` images."""
    at = os.environ.get(FAULT_ENV)
    if at and written >= int(at):
        os.kill(os.getpid(), signal.SIGKILL)


def save_png(image, file) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(file, lambda tmp: image.save(tmp, format="PNG"))


@torch.no_grad()
def generate(
    make_pipeline: Callable,
    output_dir,
    model: str,
    work: Sequence[Item],
    *,
    resolution: int,
    batch_size: int,
    autocast,
    call: dict,
    progress: bool,
) -> int:
    """Write ``images/<model>/<key>.png`` for each item of ``work`` not on disk yet, ``batch_size``
    per pipeline call; the pipeline (``make_pipeline()``) is built only if there is work. Each
    image starts from a CPU generator seeded with its seed (the same noise for every model, in any
    batch); ``call``: the family's sampling arguments. Returns the number of images made."""
    from tqdm.auto import tqdm

    todo = [item for item in work if not image_file(output_dir, model, item).exists()]
    if not todo:
        return 0
    pipeline = make_pipeline()
    bar = tqdm(total=len(todo), desc=f"images {model}", unit="img", disable=not progress)
    written = 0
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        generators = [torch.Generator(device="cpu").manual_seed(seed) for _, _, seed in batch]
        with autocast():
            images = pipeline(
                [prompt for _, prompt, _ in batch],
                height=resolution,
                width=resolution,
                generator=generators,
                **call,
            ).images
        for item, image in zip(batch, images):
            save_png(image, image_file(output_dir, model, item))
            written += 1
            fault(written)
        bar.update(len(batch))
    bar.close()
    del pipeline
    return written
