"""Preference pairs for the trainer: a Hugging Face dataset in, the trainer's ``[2B, ...]`` batches out.

:func:`open_split` opens the pairs (a Hub id, a folder in the Hub's layout, parquet files or a
``save_to_disk`` folder) as a memory-mapped ``datasets.Dataset``; :class:`PreferenceDataset`
serves winner-first pairs over its row indices (ties, flips, bad rows, DeDPO labels, a seeded
subset), decoding the images of a pair only when it is fetched; :class:`PairSampler` gives their
seeded, resumable order and :func:`collate_pairs` the batch layout; :class:`BatchEncoder` makes
the latents and text embeddings the trainer takes, with the model family's encoders (the latent
cache encodes with them too, so both paths agree).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

logger = logging.getLogger("fastpref.train.data")

CAPTION, IMAGE_0, IMAGE_1, LABEL = "caption", "jpg_0", "jpg_1", "label_0"
JUDGE = "synthetic_label_0"  # the AI judge's probability that jpg_0 is preferred (DeDPO mode)
VALID_LABELS = (0.0, 0.5, 1.0)
# Mixed into the flip RNG's seed so that flip_seed == sampler seed still gives unrelated streams.
_FLIP_STREAM = 0xF11B
# Likewise for the choice of the pairs that keep their human label (human_seed).
_HUMAN_STREAM = 0xDED0
# Likewise for the random crops and flips of one fetch (augment_seed, sample position).
_AUGMENT_STREAM = 0xA06


# --------------------------------------------------------------------------------------------
# sources and images
# --------------------------------------------------------------------------------------------


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


def _load_parquet(splits: Dict[str, List[str]], split: str, cache_dir, name=None):
    import datasets

    if split not in splits:
        raise ValueError(f"--dataset_split_name: {name} has no split {split!r} (it has {sorted(splits)})")
    return datasets.load_dataset("parquet", data_files={split: splits[split]}, split=split, cache_dir=cache_dir)


def image_bytes(value) -> Optional[bytes]:
    """The encoded bytes in an image cell (raw bytes or the ``{"bytes": ..., "path": ...}``
    struct of a Hugging Face ``Image`` feature; a path without bytes is read from disk);
    ``None`` when the cell holds no image."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if not data and path and Path(path).is_file():
            return Path(path).read_bytes()
        value = data
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) > 0:
        return bytes(value)
    return None


def decode_image(data: bytes):
    """A fully decoded RGB PIL image; raises whatever PIL raises on bad bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert("RGB")


def preprocess(
    image, resolution: int, *, crop: Optional[Tuple[float, float]] = None, flip: bool = False
) -> Tuple[torch.Tensor, Tuple[int, int], Tuple[int, int]]:
    """Resize the shorter side to ``resolution`` (bilinear), crop to ``resolution`` square, scale
    to [-1, 1]; optionally flip left-right.

    ``crop=None`` is the centre crop; ``crop=(fy, fx)`` in [0, 1) places the crop at
    ``top = floor(fy * (h - R + 1))``, ``left = floor(fx * (w - R + 1))`` (a random crop when
    ``fy, fx`` are uniform draws). ``flip`` mirrors the crop left-right, after cropping, as
    diffusers' scripts do. Returns ``(pixels [3, R, R] float32, (orig_h, orig_w), (crop_top,
    crop_left))``.
    """
    from PIL import Image

    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    if crop is None:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    else:
        top, left = int(crop[0] * (new_h - resolution + 1)), int(crop[1] * (new_w - resolution + 1))
    if (new_w, new_h) != (resolution, resolution):
        image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)
    if flip:
        array = array[:, ::-1]
    pixels = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    return pixels, (height, width), (top, left)


# --------------------------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------------------------


class PreferenceDataset(torch.utils.data.Dataset):
    """Pick-a-Pic v2 preference pairs over the rows of a Hugging Face dataset (:func:`open_split`
    of ``source``, or ``source`` itself when it is a ``datasets.Dataset``), with the columns
    ``caption`` (str), ``jpg_0``/``jpg_1`` (encoded image bytes, or the struct of a Hugging Face
    ``Image`` feature) and ``label_0`` in {1, 0, 0.5} (other names: ``caption_column``,
    ``image_columns``, ``label_column``). Other columns are ignored.

    **Bounded memory.** Building reads only the small columns (captions, labels, the judge's
    column, and the images' lengths and null flags); the image bytes stay in the memory-mapped
    Arrow files until an item is fetched, and the item's images are decoded then (in the
    DataLoader worker that fetches it). What the dataset holds per row is a few numbers
    (the index layer below), so memory and start-up do not grow with the images.

    * **Winner first.** Item ``i`` holds ``pixel_values [2, 3, R, R]`` in [-1, 1], index 0 the
      preferred image: ``jpg_0`` first when ``label_0 == 1``, ``jpg_1`` first when ``label_0 == 0``.
    * **Ties** (``label_0 == 0.5``) are dropped unless ``keep_ties=True``; a kept tie keeps the
      stored order and has ``human_label == 0.5``.
    * **Malformed rows** -- a caption that is not a string, a label that is not 1, 0 or 0.5, an
      empty image cell -- are skipped and counted while building (``num_malformed``; rows in
      ``skipped["malformed"]``), logged once on the ``fastpref.train.data`` logger.
    * **Undecodable rows** (image bytes PIL cannot decode). With ``check_images=True`` every image
      is decoded while building and such rows are skipped up front (``num_undecodable``; the
      default, for small data). With ``check_images=False`` (the trainer's way) they are found when
      fetched: item ``i`` whose images do not decode is replaced by item ``i + 1`` (then ``i + 2``,
      ... modulo the length) -- a rule of the index alone, so every run, process and resumed run
      fetches the same substitute -- and the item's ``skipped_rows`` lists the source rows passed
      over (logged as a warning; :class:`BatchEncoder` counts them for ``train_summary.json``).
    * **Label flips.** ``flip_rate`` in [0, 1] swaps the two images of exactly
      ``round(flip_rate * n)`` of the ``n`` non-tie pairs, chosen by ``flip_seed`` (NumPy
      ``default_rng([flip_seed, ...])``). ``flipped`` is recorded per item (``flipped_rows``
      lists the source rows, logged) so that the trainer can report the metric on flipped vs
      kept pairs; ``human_label`` is the probability that the *returned first* image is the
      human's choice (1, 0 for a flipped pair, 0.5 for a tie).
    * **Subset.** ``max_pairs=N`` serves the seeded random subset of N of the usable pairs (after
      ties and bad rows are dropped) that ``datasets``' ``shuffle(seed=subset_seed).select(range(N))``
      picks (the first N of ``default_rng(subset_seed).permutation(n)``), kept in row order.
    * **Preprocessing** (:func:`preprocess`): shorter side resized to ``R`` (PIL bilinear), centre
      crop to ``R x R``, ``x / 127.5 - 1``. ``random_crop`` and ``hflip`` (diffusers'
      ``--random_crop``, and flips unless ``--no_hflip``) draw one crop position and one coin per
      fetch, the same for both images of the pair, from ``default_rng([augment_seed, 0xA06,
      position])``: ``position`` is the sample's place in the sampler's stream when the key is an
      ``(index, position)`` pair (:class:`PairSampler` ``with_position=True``), else the index --
      so a resumed run draws the same. ``original_sizes [2, 2]`` (h, w before resizing) and
      ``crop_top_lefts [2, 2]`` (top, left of the crop) feed SDXL's ``add_time_ids``.

    ``dataset[i]`` (or ``dataset[(i, position)]``) is a dict: ``pixel_values [2, 3, R, R]`` float32
    (winner first; in DeDPO mode the judge's preferred image first), ``caption`` (str),
    ``flipped``, ``tie`` (bool), ``human_label`` (float), ``index`` (int; ``i``, or its
    substitute's), ``row`` (int; the source row: the row's position in the split),
    ``skipped_rows`` (list of int), ``original_sizes [2, 2]``, ``crop_top_lefts [2, 2]`` (int64).

    Attributes: ``data`` (the ``datasets.Dataset``), ``split``, ``resolution``, ``num_rows`` (rows
    in the split), ``num_malformed``, ``num_undecodable``, ``skipped`` ({"malformed": rows,
    "undecodable": rows}), ``valid_rows`` (every row that passed, ties included), ``num_ties``
    (ties among them), ``num_ties_dropped``, ``num_flipped``, ``flipped_rows``; ``len(dataset)``
    is the number of pairs served.

    **DeDPO mode** (``synthetic_labels=True``; docs/spec.md §5b, ``loss_type="dedpo"``). The column
    ``judge_column`` (default ``synthetic_label_0``) must exist; it holds the judge's probability
    ``p`` in [0, 1] that ``jpg_0`` is preferred. Rules, all explicit:

    * **Order by the judge, for every pair**: ``jpg_0`` first when ``p >= 0.5``, else ``jpg_1``.
      ``label_0`` never decides the order, so the order of a pair whose human label is hidden
      carries no information about it.
    * **Which pairs keep their human label**: exactly ``m = max(1, round(human_fraction * n))``
      of the ``n`` served pairs (round half up), the first ``m`` of the permutation
      ``default_rng([human_seed, 0xDED0]).permutation(n)`` -- its own stream, unrelated to the
      flip and sampler streams; a larger fraction with the same seed keeps a superset.
      ``human_fraction=None`` means 1.0 (every pair keeps its label). ``propensity = m / n``
      exactly: the true probability that the seeded choice picked a given pair.
    * **Per item**: ``synthetic_label`` (float) = the judge's probability that the *returned
      first* image is preferred (``p``, or ``1 - p`` when ``jpg_1`` is served first; so always
      >= 0.5); ``human_label`` (float) = 1.0 if the human preferred the returned first image,
      0.0 if the second, NaN where the pair has no human label; ``human_mask`` (bool);
      ``propensity`` (float, the same for every item).
    * **Ties** (``label_0 == 0.5``) have no 0/1 human label, which §5b needs: they are always
      dropped, and ``keep_ties=True`` raises ``ValueError``.
    * **Flips** simulate human label noise: ``flip_rate`` inverts the human label of exactly
      ``round(flip_rate * m)`` of the ``m`` human-labelled pairs (chosen by ``flip_seed`` as
      outside DeDPO mode). They change neither the order nor ``synthetic_label``; ``flipped``
      marks those pairs (never an unlabelled one).
    * **Malformed judge values**: a row that passes the other checks but whose judge cell is
      missing, NaN or outside [0, 1] is malformed: skipped, counted in ``num_malformed`` (and
      listed in ``judge_malformed_rows``), never raised. The latent cache still encodes it, so a
      cache built in one mode serves the other (the cache key does not depend on the mode).

    Extra attributes in DeDPO mode: ``propensity`` (float), ``num_human_labelled`` (int),
    ``judge_malformed_rows`` (list of rows, empty outside DeDPO mode), the properties
    ``human_mask`` and :meth:`judge_agreement`. Outside DeDPO mode the judge column is not read
    and items, counts and the cache key are exactly those of a dataset built without these
    arguments.

    Args:
        source: what :func:`open_split` takes (a Hub id, a folder, a parquet file), or a
            ``datasets.Dataset``.
        resolution: the side ``R`` of the square images served.
        split, cache_dir: :func:`open_split`'s (``--dataset_split_name``, ``--cache_dir``).
        keep_ties: serve ties (label 0.5) in stored order instead of dropping them.
        flip_rate, flip_seed: the share of labels flipped on purpose and its seed (see above).
        check_images: decode every image while building (skip the undecodable rows up front).
        max_pairs, subset_seed: serve the seeded subset of this many pairs (see above).
        hflip, random_crop, augment_seed: the augmentation of fetched pixels (see above).
        synthetic_labels: DeDPO mode (see above).
        human_fraction: in (0, 1]; DeDPO mode only; the share of pairs that keep a human label.
        human_seed: the seed of the choice of those pairs.
        judge_column: the judge's column (DeDPO mode).
    """

    def __init__(
        self,
        source,
        resolution: int = 512,
        *,
        split: str = "train",
        cache_dir: Optional[str] = None,
        keep_ties: bool = False,
        flip_rate: float = 0.0,
        flip_seed: int = 0,
        check_images: bool = True,
        max_pairs: Optional[int] = None,
        subset_seed: int = 0,
        hflip: bool = False,
        random_crop: bool = False,
        augment_seed: int = 0,
        caption_column: str = CAPTION,
        image_columns: Tuple[str, str] = (IMAGE_0, IMAGE_1),
        label_column: str = LABEL,
        synthetic_labels: bool = False,
        human_fraction: Optional[float] = None,
        human_seed: int = 0,
        judge_column: str = JUDGE,
    ):
        _check_arguments(resolution, flip_rate, max_pairs, keep_ties, synthetic_labels, human_fraction, human_seed)
        self.source = source if _is_hf_dataset(source) else str(source)
        self.split = split
        self.data = source if _is_hf_dataset(source) else open_split(source, split, cache_dir)
        self.resolution = resolution
        self.keep_ties = bool(keep_ties)
        self.flip_rate = float(flip_rate)
        self.flip_seed = int(flip_seed)
        self.check_images = bool(check_images)
        self.max_pairs = max_pairs
        self.subset_seed = int(subset_seed)
        self.hflip, self.random_crop, self.augment_seed = bool(hflip), bool(random_crop), int(augment_seed)
        self.columns = {
            "caption": caption_column,
            "image_0": image_columns[0],
            "image_1": image_columns[1],
            "label": label_column,
        }
        # Kept out of self.columns: the cache key (dataset_fingerprint) must not depend on the mode.
        self.synthetic_labels = bool(synthetic_labels)
        self.human_fraction = (
            (float(human_fraction) if human_fraction is not None else 1.0) if self.synthetic_labels else None
        )
        self.human_seed = int(human_seed)
        self.judge_column = judge_column
        labels, judges = self._read_small_columns()
        self._scan_rows(labels, judges)
        self._select()

    # -- construction steps --------------------------------------------------------------------

    def _read_small_columns(self) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Check the columns (a missing one raises ``ValueError`` naming its flag) and read the
        small ones: the captions (kept as Arrow, memory-mapped), the labels and (DeDPO mode) the
        judge's values as float64 arrays (NaN where not a number), and whether each image cell
        is empty -- from the cells' lengths, without reading their bytes."""
        import pyarrow as pa
        import pyarrow.compute as pc

        names = self.data.column_names
        flags = {"caption": "--caption_column", "image_0": "--image_column_0", "image_1": "--image_column_1"}
        flags["label"] = "--label_column"
        for key, column in self.columns.items():
            if column not in names:
                raise ValueError(f"{flags[key]}: the dataset has no column {column!r} (it has {names})")
        if self.synthetic_labels and self.judge_column not in names:
            raise ValueError(
                f"the dataset has no column {self.judge_column!r} (has {names}); synthetic_labels=True (--loss_type "
                "dedpo) reads the judge's column"
            )
        small = [self.columns["caption"], self.columns["label"]]
        small += [self.judge_column] if self.synthetic_labels else []
        table = self.data.select_columns(small).with_format("arrow")[:]
        self.num_rows = table.num_rows
        self._captions = table.column(self.columns["caption"])
        if pa.types.is_string(self._captions.type) or pa.types.is_large_string(self._captions.type):
            self._caption_ok = np.asarray(pc.is_valid(self._captions).to_numpy(zero_copy_only=False), dtype=bool)
        else:  # not text at all: every row is malformed
            self._caption_ok = np.zeros(self.num_rows, dtype=bool)
        labels = _numbers(table.column(self.columns["label"]))
        judges = _numbers(table.column(self.judge_column)) if self.synthetic_labels else None
        self._images = self.data.select_columns([self.columns["image_0"], self.columns["image_1"]]).with_format("arrow")
        # From the memory-mapped table of all stored rows (then the dataset's index mapping, if it
        # has one): only the cells' offsets and validity bitmaps are read, never the bytes.
        mapping = self.data._indices
        order = None if mapping is None else np.asarray(mapping.column(0).to_numpy(zero_copy_only=False))
        self._image_ok = np.ones(self.num_rows, dtype=bool)
        for which, name in enumerate((self.columns["image_0"], self.columns["image_1"])):
            column, path = self.data.data.column(name), None
            if pa.types.is_struct(column.type):  # a Hugging Face Image feature: bytes, or a path
                path = np.asarray(pc.is_valid(pc.struct_field(column, "path")).to_numpy(zero_copy_only=False))
                column = pc.struct_field(column, "bytes")
            if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
                raise ValueError(f"--image_column_{which}: column {name!r} holds {column.type}, not encoded images")
            ok = np.asarray(pc.fill_null(pc.binary_length(column), 0).to_numpy(zero_copy_only=False)) > 0
            ok = ok if path is None else ok | path
            self._image_ok &= ok if order is None else ok[order]
        return labels, judges

    def _scan_rows(self, labels: np.ndarray, judges: Optional[np.ndarray]) -> None:
        """Sort every row into malformed, undecodable (decoded only with ``check_images``) or
        valid; keep the valid rows' labels and judge values."""
        label_ok = np.isin(labels, VALID_LABELS)
        ok = self._caption_ok & label_ok & self._image_ok
        judge_bad = np.zeros(self.num_rows, dtype=bool)
        if self.synthetic_labels:
            judge_bad = ok & ~((judges >= 0.0) & (judges <= 1.0))  # NaN fails both comparisons
            ok &= ~judge_bad
        malformed = np.flatnonzero(~ok)
        undecodable: List[int] = []
        if self.check_images:
            for row in np.flatnonzero(ok).tolist():
                if not _decodes([self.image_data(row, 0), self.image_data(row, 1)]):
                    undecodable.append(row)
            ok[undecodable] = False
        self.skipped = {"malformed": malformed.tolist(), "undecodable": undecodable}
        self.judge_malformed_rows = np.flatnonzero(judge_bad).tolist()
        self.valid_rows = np.flatnonzero(ok).astype(np.int64)
        self._label = labels[self.valid_rows]
        self._judge = judges[self.valid_rows] if self.synthetic_labels else None

    def image_data(self, row: int, which: int) -> Optional[bytes]:
        """The encoded bytes of image ``which`` (0: ``jpg_0``, 1: ``jpg_1``) of source ``row``
        (``None`` for an empty cell); read from the memory-mapped Arrow file."""
        column = self.columns["image_0" if which == 0 else "image_1"]
        return image_bytes(self._images[int(row)].column(column)[0].as_py())

    def _select(self) -> None:
        """Drop ties (unless kept), truncate to max_pairs, order the pairs, pick the human-labelled
        (DeDPO mode) and the flipped pairs; then log."""
        is_tie = self._label == 0.5
        keep = np.ones(len(self.valid_rows), dtype=bool) if self.keep_ties else ~is_tie
        rows = self.valid_rows[keep]
        label = self._label[keep]
        judge = self._judge[keep] if self.synthetic_labels else None
        if self.max_pairs is not None and self.max_pairs < len(rows):
            # datasets' shuffle(seed).select(range(N)) draws this permutation; kept in row order
            pick = np.sort(np.random.default_rng(self.subset_seed).permutation(len(rows))[: self.max_pairs])
            rows, label = rows[pick], label[pick]
            judge = judge[pick] if judge is not None else None
        self._rows = rows
        self._tie = label == 0.5
        n = len(rows)
        if self.synthetic_labels:
            # The judge orders every pair (jpg_1 first when it prefers jpg_1), so that the order of
            # an unlabelled pair says nothing about its hidden human label.
            self._swap = judge < 0.5
            n_human = max(1, int(math.floor(self.human_fraction * n + 0.5))) if n else 0
            human_mask = np.zeros(n, dtype=bool)
            if n_human:
                rng = np.random.default_rng([self.human_seed, _HUMAN_STREAM])
                human_mask[rng.permutation(n)[:n_human]] = True
            self._human_mask = human_mask
            self.num_human_labelled = n_human
            self.propensity = n_human / n if n else self.human_fraction
            decided = np.flatnonzero(human_mask)  # flips apply to the human labels only
        else:
            self._swap = label == 0.0  # jpg_1 is the winner: serve it first
            decided = np.flatnonzero(~self._tie)
        n_flip = int(math.floor(self.flip_rate * len(decided) + 0.5))
        flipped = np.zeros(len(rows), dtype=bool)
        if n_flip:
            rng = np.random.default_rng([self.flip_seed, _FLIP_STREAM])
            flipped[decided[rng.permutation(len(decided))[:n_flip]]] = True
        self._flipped = flipped
        if self.synthetic_labels:
            # Both labels relative to the served order: p (or 1 - p) that the first image wins.
            self._synthetic = np.where(self._swap, 1.0 - judge, judge)
            human = np.where(self._swap, 1.0 - label, label)
            human = np.where(flipped, 1.0 - human, human)
            self._human_label = np.where(self._human_mask, human, np.nan)
        self.num_ties = int(is_tie.sum())
        self.num_ties_dropped = 0 if self.keep_ties else self.num_ties
        self.num_flipped = n_flip
        self.flipped_rows = rows[flipped].tolist()
        self._log()

    def _log(self) -> None:
        level = logging.WARNING if (self.num_malformed or self.num_undecodable) else logging.INFO
        logger.log(
            level,
            "%s: %d rows read, %d pairs served; skipped %d malformed, %d undecodable; %d ties %s; "
            "%d flipped (flip_rate=%g, flip_seed=%d)",
            self.source,
            self.num_rows,
            len(self),
            self.num_malformed,
            self.num_undecodable,
            self.num_ties,
            "kept" if self.keep_ties else "dropped",
            self.num_flipped,
            self.flip_rate,
            self.flip_seed,
        )
        if self.synthetic_labels:
            logger.info(
                "DeDPO mode: pairs ordered by the judge (%s); %d of %d pairs keep their human label "
                "(human_fraction=%g, human_seed=%d, propensity=%.6g); %d rows with a malformed judge value skipped",
                self.judge_column,
                self.num_human_labelled,
                len(self),
                self.human_fraction,
                self.human_seed,
                self.propensity,
                len(self.judge_malformed_rows),
            )
        if self.num_malformed or self.num_undecodable:
            logger.warning(
                "skipped rows: malformed %s, undecodable %s",
                format_rows(self.skipped["malformed"]),
                format_rows(self.skipped["undecodable"]),
            )
        if self.num_flipped:
            logger.info("flipped rows: %s", format_rows(self.flipped_rows))

    def without_rows(self, rows: Sequence[int], reason: str = "undecodable") -> "PreferenceDataset":
        """A copy with the given source rows skipped (counted under ``reason``); ties, truncation
        and flips are recomputed over the rows left, exactly as a fresh build would."""
        drop = set(int(r) for r in rows) & set(self.valid_rows.tolist())
        if not drop:
            return self
        other = copy.copy(self)
        other.skipped = {k: list(v) for k, v in self.skipped.items()}
        other.skipped.setdefault(reason, [])
        other.skipped[reason] = sorted(other.skipped[reason] + sorted(drop))
        keep = np.asarray([r not in drop for r in self.valid_rows.tolist()], dtype=bool)
        other.valid_rows = self.valid_rows[keep]
        other._label = self._label[keep]
        if self._judge is not None:
            other._judge = self._judge[keep]
        other._select()
        return other

    # -- counts --------------------------------------------------------------------------------

    @property
    def num_malformed(self) -> int:
        return len(self.skipped["malformed"])

    @property
    def num_undecodable(self) -> int:
        return len(self.skipped["undecodable"])

    @property
    def flipped(self) -> torch.Tensor:
        """``[len(self)]`` bool: which served pairs are flipped."""
        return torch.from_numpy(self._flipped.copy())

    @property
    def rows(self) -> np.ndarray:
        """The source row of every served pair, in item order."""
        return self._rows.copy()

    @property
    def human_mask(self) -> torch.Tensor:
        """``[len(self)]`` bool: which served pairs keep their human label (DeDPO mode only)."""
        self._require_synthetic("human_mask")
        return torch.from_numpy(self._human_mask.copy())

    def _require_synthetic(self, name: str) -> None:
        if not self.synthetic_labels:
            raise ValueError(f"{name} needs a dataset built with synthetic_labels=True (DeDPO mode)")

    def judge_agreement(self) -> Dict[str, float]:
        """How far the judge is from the humans on the human-labelled pairs (DeDPO mode only).

        Over the ``m`` pairs with ``human_mask``, with ``p`` = ``synthetic_label`` and ``y`` =
        ``human_label`` as served (flips included: the labels the loss sees):
        ``{"num_labelled": m, "accuracy": mean of 1 where the judge's preferred image is the
        human's (p > 0.5 and y = 1, or p < 0.5 and y = 0), 0.5 where p == 0.5, else 0,
        "mean_abs_error": mean |p - y|}``; the two means are NaN when ``m == 0``.
        """
        self._require_synthetic("judge_agreement")
        p = self._synthetic[self._human_mask]
        y = self._human_label[self._human_mask]
        if len(p) == 0:
            return {"num_labelled": 0, "accuracy": float("nan"), "mean_abs_error": float("nan")}
        correct = np.where(p == 0.5, 0.5, ((p > 0.5) == (y == 1.0)).astype(np.float64))
        return {
            "num_labelled": int(len(p)),
            "accuracy": float(correct.mean()),
            "mean_abs_error": float(np.abs(p - y).mean()),
        }

    def summary(self) -> dict:
        """The counts for logs and ``train_summary.json``: ``split``, ``rows`` (in the split),
        ``pairs`` and ``num_pairs`` (both the number served, after filtering and the subset),
        ``malformed``, ``undecodable`` (found while building), ``ties``, ``ties_dropped``,
        ``flipped``; DeDPO mode adds ``judge_malformed`` and ``human_labelled``."""
        out = {
            "split": self.split,
            "num_pairs": len(self),
            "rows": self.num_rows,
            "pairs": len(self),
            "malformed": self.num_malformed,
            "undecodable": self.num_undecodable,
            "ties": self.num_ties,
            "ties_dropped": self.num_ties_dropped,
            "flipped": self.num_flipped,
        }
        if self.synthetic_labels:
            out.update(judge_malformed=len(self.judge_malformed_rows), human_labelled=self.num_human_labelled)
        return out

    # -- items ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._rows)

    def caption(self, row: int) -> str:
        """The caption of source ``row``."""
        return self._captions[int(row)].as_py()

    def item_info(self, index: int) -> dict:
        """Everything of item ``index`` but the pixels (no image is decoded), plus ``swap``:
        whether the stored ``jpg_1`` is served first (winner is jpg_1, xor flipped; in DeDPO mode:
        the judge prefers jpg_1). DeDPO mode adds ``synthetic_label`` (float), ``human_mask``
        (bool) and ``propensity`` (float); ``human_label`` is then NaN where unlabelled."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        index = index % len(self)
        tie, flipped = bool(self._tie[index]), bool(self._flipped[index])
        row = int(self._rows[index])
        info = {"index": index, "row": row, "caption": self.caption(row), "flipped": flipped, "tie": tie}
        if self.synthetic_labels:
            info.update(
                human_label=float(self._human_label[index]),
                synthetic_label=float(self._synthetic[index]),
                human_mask=bool(self._human_mask[index]),
                propensity=float(self.propensity),
                swap=bool(self._swap[index]),  # the judge's order; flips touch the human label only
            )
        else:
            info.update(
                human_label=0.5 if tie else (0.0 if flipped else 1.0),
                # stored jpg_1 goes first when it is the winner, or when a pair is flipped
                swap=bool(self._swap[index]) != flipped,
            )
        return info

    def __getitem__(self, key) -> dict:
        index, position = key if isinstance(key, tuple) else (key, None)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        index = index % len(self)
        skipped: List[int] = []
        for attempt in range(len(self)):
            item = self.item_info((index + attempt) % len(self))
            try:
                images = [decode_image(self.image_data(item["row"], which)) for which in (0, 1)]
            except Exception as error:  # noqa: BLE001 - any decoder failure: the next item stands in
                logger.warning("row %d does not decode (%s); skipped, the next pair stands in", item["row"], error)
                skipped.append(item["row"])
                continue
            if item.pop("swap"):
                images.reverse()
            self._add_pixels(item, images, index if position is None else position)
            item["skipped_rows"] = skipped
            return item
        raise RuntimeError(f"no pair of the {len(self)} in {self.source} decodes")

    def _add_pixels(self, item: dict, images: list, position: int) -> None:
        """``pixel_values``, ``original_sizes`` and ``crop_top_lefts`` of the pair (served order),
        with one crop position and one flip coin for both images."""
        crop, flip = None, False
        if self.random_crop or self.hflip:
            draw = np.random.default_rng([self.augment_seed, _AUGMENT_STREAM, int(position)]).random(3)
            crop = (float(draw[0]), float(draw[1])) if self.random_crop else None
            flip = self.hflip and bool(draw[2] < 0.5)
        pixels, sizes, crops = zip(*(preprocess(image, self.resolution, crop=crop, flip=flip) for image in images))
        item["pixel_values"] = torch.stack(pixels)
        item["original_sizes"] = torch.tensor(sizes, dtype=torch.int64)
        item["crop_top_lefts"] = torch.tensor(crops, dtype=torch.int64)


def _check_arguments(resolution, flip_rate, max_pairs, keep_ties, synthetic_labels, human_fraction, human_seed):
    """``ValueError`` for a bad argument of :class:`PreferenceDataset`, before any file is read."""
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    if not (isinstance(flip_rate, (int, float)) and 0.0 <= flip_rate <= 1.0):
        raise ValueError(f"flip_rate must be in [0, 1], got {flip_rate!r}")
    if max_pairs is not None and max_pairs < 0:
        raise ValueError(f"max_pairs must be >= 0, got {max_pairs}")
    if human_fraction is not None:
        if not synthetic_labels:
            raise ValueError(
                "human_fraction needs synthetic_labels=True (DeDPO mode): without a judge's label every pair keeps "
                "its human label"
            )
        if (
            isinstance(human_fraction, bool)
            or not isinstance(human_fraction, (int, float))
            or not 0.0 < human_fraction <= 1.0
        ):
            raise ValueError(f"human_fraction must be in (0, 1], got {human_fraction!r}")
    if synthetic_labels and keep_ties:
        raise ValueError(
            "keep_ties=True cannot be used with synthetic_labels=True: a tie (label_0 = 0.5) has no 0/1 human "
            "label, which the DeDPO estimator needs, so DeDPO mode always drops ties"
        )
    if isinstance(human_seed, bool) or not isinstance(human_seed, (int, np.integer)):
        raise ValueError(f"human_seed must be an int, got {human_seed!r}")


def _decodes(cells: Sequence[bytes]) -> bool:
    try:
        for data in cells:
            decode_image(data)
    except Exception:  # noqa: BLE001 - any decoder failure means "skip this row"
        return False
    return True


def _is_hf_dataset(value) -> bool:
    return type(value).__module__.startswith("datasets.") and hasattr(value, "column_names")


def _numbers(column) -> np.ndarray:
    """An Arrow column of numbers as float64 (NaN where null); NaN everywhere for any other type
    (booleans and strings are not labels)."""
    import pyarrow as pa

    kind = column.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        return np.full(len(column), np.nan)
    return np.asarray(column.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def format_rows(rows: Sequence[int], n: int = 20) -> str:
    """The first ``n`` of ``rows`` as a list, for log lines (with the count when cut)."""
    rows = list(rows)
    return str(rows[:n])[:-1] + (f", ... ({len(rows)} in all)]" if len(rows) > n else "]")


# --------------------------------------------------------------------------------------------
# order
# --------------------------------------------------------------------------------------------


class PairSampler(torch.utils.data.Sampler):
    """Seeded, resumable order over ``num_pairs`` items. Hand-written because torch's samplers
    cannot start mid-epoch without replaying it: this one starts at any sample position.

    Epoch ``e`` visits ``permutation(e)`` (NumPy ``default_rng([seed, e]).permutation``, or
    ``arange`` with ``shuffle=False``). Global position ``p`` (samples consumed since the very
    start) is item ``permutation(p // n)[p % n]``. ``start`` is the position to begin at: to
    resume, pass the number of samples the run had consumed (``step * batch_size`` ...), and
    the stream continues exactly where it stopped, across epoch boundaries too.

    ``infinite=False``: one pass, from ``start`` to the end of ``start``'s epoch; then
    :meth:`set_epoch` moves to the start of another epoch. ``infinite=True``: never ends.
    ``with_position=True`` yields ``(item, position)`` pairs, the keys by which
    :class:`PreferenceDataset` seeds a fetch's random crop and flip.
    """

    def __init__(
        self,
        num_pairs: int,
        seed: int = 0,
        *,
        start: int = 0,
        shuffle: bool = True,
        infinite: bool = False,
        with_position: bool = False,
    ):
        if num_pairs < 1:
            raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.num_pairs = int(num_pairs)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.infinite = bool(infinite)
        self.start = int(start)
        self.with_position = bool(with_position)
        self._cache: Dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if self.shuffle:
                perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_pairs)
            else:
                perm = np.arange(self.num_pairs)
            self._cache = {epoch: perm}  # keep one epoch: the stream moves forward
        return self._cache[epoch]

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(int(position), self.num_pairs)
        return int(self.permutation(epoch)[offset])

    def set_epoch(self, epoch: int) -> None:
        self.start = int(epoch) * self.num_pairs

    def state_dict(self) -> dict:
        return {"seed": self.seed, "start": self.start, "num_pairs": self.num_pairs, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        if state["num_pairs"] != self.num_pairs:
            raise ValueError(f"sampler state is for {state['num_pairs']} pairs, this dataset has {self.num_pairs}")
        self.seed, self.start, self.shuffle = int(state["seed"]), int(state["start"]), bool(state["shuffle"])
        self._cache = {}

    def __iter__(self) -> Iterator[Union[int, Tuple[int, int]]]:
        position = self.start
        end = None if self.infinite else (position // self.num_pairs + 1) * self.num_pairs
        while end is None or position < end:
            yield (self.index_at(position), position) if self.with_position else self.index_at(position)
            position += 1

    def __len__(self) -> int:
        if self.infinite:
            raise TypeError("an infinite PairSampler has no length")
        return self.num_pairs - self.start % self.num_pairs


# --------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------

_BATCH_NAMES = {"caption": "captions"}
# Item fields that hold one entry per image ([2, ...]: winner, loser); batched as [2B, ...].
PER_IMAGE = ("pixel_values", "latents", "original_sizes", "crop_top_lefts")


def collate_pairs(items: Sequence[dict]) -> dict:
    """Stack B items into the trainer's batch.

    Per-image tensors (``pixel_values``, ``latents``, ``original_sizes``, ``crop_top_lefts``;
    ``[2, ...]`` per item) become ``[2B, ...]``: all B winners, then all B losers -- the layout
    that the UNet and ``fastpref.adaptive_dpo_loss`` take (diffusers' DPO script stacks the pair
    on channels, ``[B, 6, R, R]``, and its ``cat(chunk(2, dim=1))`` gives the same
    ``[2B, 3, R, R]``). Per-pair tensors (``prompt_embeds [B, L, D]``, ``pooled_prompt_embeds``)
    stack to ``[B, ...]``; ``flipped``/``tie`` -> bool ``[B]``, ``human_label`` -> float32
    ``[B]``, ``index``/``row`` -> int64 ``[B]``, ``caption`` -> the list ``captions``. DeDPO
    items (``synthetic_labels=True``) add ``synthetic_label``, ``propensity`` -> float32 ``[B]``
    (``human_label`` float32 ``[B]`` with NaN where unlabelled) and ``human_mask`` -> bool
    ``[B]``: the keywords of ``adaptive_dpo_loss(..., loss_type="dedpo")``. ``skipped_rows``
    becomes one flat list of the rows passed over at fetch."""
    if not items:
        raise ValueError("collate_pairs needs at least one item")
    batch = {}
    for key, first in items[0].items():
        if key == "skipped_rows":  # the rows passed over at fetch, for BatchEncoder's count
            batch[key] = [row for item in items for row in item[key]]
            continue
        values = [item[key] for item in items]
        name = _BATCH_NAMES.get(key, key)
        if key in PER_IMAGE:
            batch[name] = torch.stack(values, dim=1).flatten(0, 1)  # [2, B, ...] -> [2B, ...]
        elif isinstance(first, torch.Tensor):
            batch[name] = torch.stack(values)
        elif isinstance(first, bool):
            batch[name] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(first, int):
            batch[name] = torch.tensor(values, dtype=torch.int64)
        elif isinstance(first, float):
            batch[name] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[name] = list(values)
    return batch


# --------------------------------------------------------------------------------------------
# encoding
# --------------------------------------------------------------------------------------------


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
        from ..files import write_json_atomic

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
    images at a time.

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
        skips: Optional[FetchSkips] = None,
        summary: Optional[dict] = None,
        gather=None,
    ):
        self.family = family
        self.vae, self.tokenizers, self.text_encoders = vae, tokenizers, text_encoders
        self.resolution, self.device, self.vae_batch_size = resolution, device, vae_batch_size
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

    def __call__(self, batch: dict) -> dict:
        self.count_skips(batch)
        labels = ("flipped", "synthetic_label", "human_label", "human_mask", "propensity")
        out = {k: batch[k] for k in labels if k in batch}
        if "latents" in batch:  # cached: the text conditioning is in the batch too
            out["latents"] = batch["latents"]
        else:
            pixels = batch["pixel_values"].to(self.device)
            out["latents"] = self.family.encode_images(self.vae, pixels, self.vae_batch_size).float()
            batch = {**batch, **self.family.encode_prompts(batch["captions"], self.tokenizers, self.text_encoders)}
        out.update(self.family.batch_conditioning(batch, self.resolution))
        return out
