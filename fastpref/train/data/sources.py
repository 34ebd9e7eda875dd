"""Where the pairs come from: a Hub id, a folder in the Hub's layout, parquet files or a
``save_to_disk`` folder, opened through ``datasets`` as a memory-mapped ``datasets.Dataset``."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional


def open_split(name, split: str = "train", cache_dir: Optional[str] = None):
    """The split ``split`` of the pairs at ``name`` as a memory-mapped ``datasets.Dataset``.

    ``name`` is, in this order: a ``.parquet`` file (the split ``train``); a folder written by
    ``save_to_disk`` (a ``Dataset``, the split ``train``, or a ``DatasetDict``); a folder of parquet
    files, in the Hub's layout (``data/train-*.parquet`` beside ``data/validation-*.parquet``;
    split names as ``datasets`` reads them from file and folder names) or not (every ``*.parquet``
    is ``train``); else a Hub id, loaded as diffusers' script does
    (``datasets.load_dataset(name, split=split, cache_dir=cache_dir)``). Parquet files are read
    with ``datasets.load_dataset("parquet", ...)``: converted once to Arrow files in ``cache_dir``
    (the Hugging Face datasets cache when None) and memory-mapped from there; only the chosen
    split's files are read. ``FileNotFoundError`` / ``ValueError`` name the flag.
    """
    import datasets

    path = Path(str(name)).expanduser()
    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"--dataset_name: {name} is a file but not a .parquet file")
        if split != "train":
            raise ValueError(f"--dataset_split_name: a single parquet file is the split 'train', got {split!r}")
        return _load_parquet({split: [str(path)]}, split, cache_dir)
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"--dataset_split_name: {name} has no split {split!r} (it has {list(loaded)})")
                return loaded[split]
            if split != "train":
                raise ValueError(f"--dataset_split_name: {name} holds one split, 'train'; got {split!r}")
            return loaded
        return _load_parquet(parquet_splits(path), split, cache_dir, name)
    try:
        return datasets.load_dataset(str(name), split=split, cache_dir=cache_dir)
    except Exception as error:  # offline, unknown id, no such split: say which flag
        raise ValueError(
            f"--dataset_name: {name} is no local file or folder, and datasets.load_dataset could not load its "
            f"split {split!r} ({type(error).__name__}: {error})"
        ) from None


def default_split(name, split: str = "train", cache_dir: Optional[str] = None) -> str:
    """The split to train on when the user named none: ``split`` (``train``) where ``name`` has
    it, else ``validation`` where it has that (diffusers' script's default split, which its
    example data sets use), else ``split`` (the error then names the splits there are). A Hub id
    asks the Hub (``datasets.get_dataset_split_names``); when it cannot answer, ``split``."""
    import datasets

    path = Path(str(name)).expanduser()
    try:
        if path.is_file():
            return split
        if (path / "dataset_dict.json").is_file():
            found = list(datasets.load_from_disk(str(path)))
        elif (path / "state.json").is_file():
            return split
        elif path.is_dir():
            found = list(parquet_splits(path))
        else:
            found = datasets.get_dataset_split_names(str(name), cache_dir=cache_dir)
    except Exception:  # offline, unknown: open_split says what is wrong, naming the flag
        return split
    return "validation" if split not in found and "validation" in found else split


def parquet_splits(folder) -> Dict[str, List[str]]:
    """``{split: [parquet files]}`` of a local folder, the splits named as ``datasets`` names them
    (``data/train-00000-of-00002.parquet`` is ``train``; without split names every file is
    ``train``); files sorted by path."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    folder = Path(folder)
    try:
        patterns = get_data_patterns(str(folder))
    except Exception:  # datasets finds no data file at all
        patterns = {}
    files = DataFilesDict.from_patterns(patterns, base_path=str(folder)) if patterns else {}
    splits = {s: sorted(str(f) for f in found if str(f).endswith(".parquet")) for s, found in files.items()}
    splits = {s: found for s, found in splits.items() if found}
    if not splits:
        raise FileNotFoundError(f"--dataset_name: no *.parquet files under {folder}")
    return splits


def check_parquet(files: List[str], split: str) -> None:
    """Every parquet file of ``split`` has a readable footer, and the split has rows (``datasets``
    fails on either with a traceback of its own); ``ValueError`` naming the file."""
    import pyarrow.parquet as pq

    rows = 0
    for file in files:
        try:
            rows += pq.ParquetFile(file).metadata.num_rows
        except Exception as error:  # pyarrow's ArrowInvalid, OSError: a torn, empty or foreign file
            raise ValueError(f"--dataset_name: {file} is not a readable parquet file ({error})") from None
    if rows == 0:
        raise ValueError(f"--dataset_name: the {split!r} parquet files hold no rows ({', '.join(files)})")


def _load_parquet(splits: Dict[str, List[str]], split: str, cache_dir, name=None):
    import datasets

    if split not in splits:
        raise ValueError(f"--dataset_split_name: {name} has no split {split!r} (it has {sorted(splits)})")
    check_parquet(splits[split], split)
    try:
        return datasets.load_dataset("parquet", data_files={split: splits[split]}, split=split, cache_dir=cache_dir)
    except Exception as error:  # pyarrow's or datasets' own: an empty, torn or foreign file
        cause = error.__cause__ or error
        raise ValueError(
            f"--dataset_name: cannot read the {split!r} parquet files of {name or splits[split][0]} "
            f"({type(cause).__name__}: {cause}; an empty or damaged file?)"
        ) from None


def is_hf_dataset(value) -> bool:
    """Whether ``value`` is a ``datasets.Dataset`` already (not a name to open)."""
    return type(value).__module__.startswith("datasets.") and hasattr(value, "column_names")
