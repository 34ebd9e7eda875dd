"""Prompt sets (``--prompts``): a ``.txt`` file (one prompt a line), a ``.json`` file (a list of
strings, or of objects with the caption column), any source :func:`fastpref.train.data.open_split`
opens (a Hub id, a folder in the Hub's layout, parquet, ``save_to_disk``) with a caption column
and split, or a named set of :data:`NAMED_SETS`, resolved from the Hub (``--prompt_set_path``: a
local copy in the same layout)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple


@dataclasses.dataclass(frozen=True)
class NamedSet:
    """A prompt set users know by name: a Hub dataset ``repo`` read either as a ``datasets``
    split (``split``, ``column``) or as JSON lists of prompts (``files``, concatenated)."""

    repo: str
    description: str
    split: Optional[str] = None
    column: Optional[str] = None
    files: Tuple[str, ...] = ()


NAMED_SETS = {
    # PartiPrompts (Yu et al. 2022), 1632 prompts in 12 categories: nateraw's mirror of PartiPrompts.tsv.
    "parti": NamedSet("nateraw/parti-prompts", "PartiPrompts, 1632 prompts", split="train", column="Prompt"),
    # The HPSv2 benchmark (Wu et al. 2023): 800 prompts per style, as hpsv2.benchmark_prompts('all') reads them.
    "hpsv2": NamedSet(
        "zhwang/HPDv2",
        "the HPSv2 benchmark, 3200 prompts (anime, concept-art, paintings, photo)",
        files=tuple(f"benchmark/{style}.json" for style in ("anime", "concept-art", "paintings", "photo")),
    ),
}


def unique(prompts: Sequence[str]) -> List[str]:
    """``prompts`` stripped, without empty lines and repeats, in their first order (repeats would
    count one prompt twice in the statistics; use more seeds instead)."""
    seen, out = set(), []
    for prompt in prompts:
        prompt = str(prompt).strip()
        if prompt and prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
    return out


def from_json(file: Path, column: str) -> List[str]:
    rows = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(rows, list):
        raise ValueError(f"--prompts: {file} must hold a JSON list of prompts (or of objects with {column!r})")
    if all(isinstance(row, dict) for row in rows):
        if not all(column in row for row in rows):
            raise ValueError(f"--caption_column: an object of {file} has no key {column!r}")
        return [row[column] for row in rows]
    if not all(isinstance(row, str) for row in rows):
        raise ValueError(f"--prompts: {file} must hold strings or objects with {column!r}")
    return rows


def from_dataset(name: str, split: str, column: str, cache_dir: Optional[str]) -> List[str]:
    from fastpref.train.data import open_split

    try:
        dataset = open_split(name, split, cache_dir)
    except (ValueError, FileNotFoundError) as error:
        message = str(error).replace("--dataset_name", "--prompts").replace("--dataset_split_name", "--prompt_split")
        raise ValueError(message) from None
    if column not in dataset.column_names:
        raise ValueError(f"--caption_column: {name} has no column {column!r} (it has {dataset.column_names})")
    return dataset[column]


def from_named(named: NamedSet, root: Optional[str], cache_dir: Optional[str]) -> List[str]:
    """The named set from the Hub, or from ``root``, a local copy of its repository."""
    if named.files:
        if root is not None:
            files = [Path(root).expanduser() / name for name in named.files]
            missing = [str(file) for file in files if not file.is_file()]
            if missing:
                raise FileNotFoundError(f"--prompt_set_path: {root} lacks {', '.join(missing)}")
        else:
            from huggingface_hub import hf_hub_download

            files = [
                Path(hf_hub_download(named.repo, f, repo_type="dataset", cache_dir=cache_dir)) for f in named.files
            ]
        return [prompt for file in files for prompt in from_json(file, "prompt")]
    if root is None:
        return from_dataset(named.repo, named.split, named.column, cache_dir)
    import datasets  # a local copy: any file layout datasets reads (PartiPrompts.tsv, parquet)

    if not Path(root).expanduser().is_dir():
        raise FileNotFoundError(f"--prompt_set_path: {root} is not a folder")
    dataset = datasets.load_dataset(str(Path(root).expanduser()), split=named.split, cache_dir=cache_dir)
    if named.column not in dataset.column_names:
        raise ValueError(f"--prompt_set_path: {root} has no column {named.column!r} (it has {dataset.column_names})")
    return dataset[named.column]


def load_prompts(
    prompts: str,
    split: str = "train",
    column: str = "caption",
    max_prompts: Optional[int] = None,
    set_path: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> List[str]:
    """The prompts of ``--prompts`` (see the module docstring), made :func:`unique`, the first
    ``max_prompts`` of them. ``ValueError`` naming the flag for an empty set or a bad file."""
    file = Path(prompts).expanduser()
    if prompts in NAMED_SETS:
        found = from_named(NAMED_SETS[prompts], set_path, cache_dir)
    elif file.is_file() and file.suffix == ".txt":
        found = file.read_text(encoding="utf-8").splitlines()
    elif file.is_file() and file.suffix == ".json":
        found = from_json(file, column)
    else:
        found = from_dataset(prompts, split, column, cache_dir)
    found = unique(found)[:max_prompts]
    if not found:
        raise ValueError(f"--prompts: {prompts} holds no prompts")
    return found
