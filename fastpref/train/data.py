"""Preference pairs for the trainer: Pick-a-Pic v2 parquet in, the trainer's ``[2B, ...]`` batches out.

:class:`PreferenceDataset` serves winner-first pairs (ties, flips, bad rows, DeDPO labels),
:class:`PairSampler` their seeded, resumable order and :func:`collate_pairs` the batch layout;
:func:`encode_images`, :func:`encode_prompts` and :class:`BatchEncoder` make the latents and text
embeddings the trainer takes (the latent cache encodes with them too, so both paths agree).
"""

from __future__ import annotations

import bisect
import copy
import io
import logging
import math
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .arch import detect_arch

logger = logging.getLogger("fastpref.train.data")

CAPTION, IMAGE_0, IMAGE_1, LABEL = "caption", "jpg_0", "jpg_1", "label_0"
JUDGE = "synthetic_label_0"  # the AI judge's probability that jpg_0 is preferred (DeDPO mode)
VALID_LABELS = (0.0, 0.5, 1.0)
# Mixed into the flip RNG's seed so that flip_seed == sampler seed still gives unrelated streams.
_FLIP_STREAM = 0xF11B
# Likewise for the choice of the pairs that keep their human label (human_seed).
_HUMAN_STREAM = 0xDED0


# --------------------------------------------------------------------------------------------
# files and images
# --------------------------------------------------------------------------------------------


def parquet_files(source, pattern: str = "*.parquet") -> List[Path]:
    """``source`` itself if it is a file, else every file under it matching ``pattern``
    (recursively), sorted by path."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"dataset_name: no such file or folder: {source}")
    files = sorted(p for p in source.rglob(pattern) if p.is_file())
    if not files:
        raise FileNotFoundError(f"dataset_name: no {pattern} files under {source}")
    return files


def image_bytes(value) -> Optional[bytes]:
    """The encoded bytes in a parquet image cell (raw bytes or a ``{"bytes": ...}`` struct);
    ``None`` when the cell holds no bytes."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) > 0:
        return bytes(value)
    return None


def decode_image(data: bytes):
    """A fully decoded RGB PIL image; raises whatever PIL raises on bad bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert("RGB")


def preprocess(image, resolution: int) -> Tuple[torch.Tensor, Tuple[int, int], Tuple[int, int]]:
    """Resize the shorter side to ``resolution`` (bilinear), centre crop, scale to [-1, 1].

    Returns ``(pixels [3, R, R] float32, (orig_h, orig_w), (crop_top, crop_left))``.
    """
    from PIL import Image

    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    if (new_w, new_h) != (resolution, resolution):
        image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)
    pixels = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    return pixels, (height, width), (top, left)


# --------------------------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------------------------


class PreferenceDataset(torch.utils.data.Dataset):
    """Pick-a-Pic v2 preference pairs from a parquet file, or every ``*.parquet`` under a folder
    (sorted by path), with the columns ``caption`` (str), ``jpg_0``/``jpg_1`` (encoded image
    bytes, or the ``{"bytes": ...}`` struct of a Hugging Face ``Image`` feature) and ``label_0``
    in {1, 0, 0.5}. Other columns are ignored.

    * **Winner first.** Item ``i`` holds ``pixel_values [2, 3, R, R]`` in [-1, 1], index 0 the
      preferred image: ``jpg_0`` first when ``label_0 == 1``, ``jpg_1`` first when ``label_0 == 0``.
    * **Ties** (``label_0 == 0.5``) are dropped unless ``keep_ties=True``; a kept tie keeps the
      stored order and has ``human_label == 0.5``.
    * **Skipped rows.** A row whose caption is not a string, whose label is not 1, 0 or 0.5, or
      whose image cell is empty is *malformed*; one with an image PIL cannot decode is
      *undecodable*. Both are skipped and counted (``num_malformed``, ``num_undecodable``, the
      rows in ``skipped``) and logged once on the ``fastpref.train.data`` logger; nothing
      raises. Images are decoded once while the dataset is built (``check_images=True``) so that
      every row that survives is known to decode; with ``check_images=False`` only the cheap
      checks run there (use it with the latent cache, which records the undecodable rows when it
      encodes them).
    * **Label flips.** ``flip_rate`` in [0, 1] swaps the two images of exactly
      ``round(flip_rate * n)`` of the ``n`` non-tie pairs, chosen by ``flip_seed`` (NumPy
      ``default_rng([flip_seed, ...])``). ``flipped`` is recorded per item (``flipped_rows``
      lists the source rows, logged) so that the trainer can report the metric on flipped vs
      kept pairs; ``human_label`` is the probability that the *returned first* image is the
      human's choice (1, 0 for a flipped pair, 0.5 for a tie).
    * **Preprocessing** is deterministic (:func:`preprocess`): shorter side resized to ``R`` (PIL
      bilinear), centre crop to ``R x R``, ``x / 127.5 - 1``; ``original_sizes [2, 2]`` (h, w
      before resizing) and ``crop_top_lefts [2, 2]`` (top, left of the crop) feed SDXL's
      ``add_time_ids``.

    ``dataset[i]`` is a dict: ``pixel_values [2, 3, R, R]`` float32 (winner first; in DeDPO mode
    the judge's preferred image first), ``caption`` (str), ``flipped``, ``tie`` (bool),
    ``human_label`` (float), ``index`` (= i), ``row`` (int; the source row: the position over all
    files in sorted order), ``original_sizes [2, 2]``, ``crop_top_lefts [2, 2]`` (int64).

    Attributes: ``files``, ``resolution``, ``num_rows`` (rows read), ``num_malformed``,
    ``num_undecodable``, ``skipped`` ({"malformed": rows, "undecodable": rows}), ``valid_rows``
    (every row that passed, ties included), ``num_ties`` (ties among them), ``num_ties_dropped``,
    ``num_flipped``, ``flipped_rows``; ``len(dataset)`` is the number of pairs served.

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
        source: a parquet file, or a folder searched for ``pattern``.
        resolution: the side ``R`` of the square images served.
        keep_ties: serve ties (label 0.5) in stored order instead of dropping them.
        flip_rate, flip_seed: the share of labels flipped on purpose and its seed (see above).
        check_images: decode every image while building (skip the undecodable rows up front).
        max_pairs: serve at most this many pairs (the first ones, after dropping ties).
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
        keep_ties: bool = False,
        flip_rate: float = 0.0,
        flip_seed: int = 0,
        check_images: bool = True,
        max_pairs: Optional[int] = None,
        pattern: str = "*.parquet",
        caption_column: str = CAPTION,
        image_columns: Tuple[str, str] = (IMAGE_0, IMAGE_1),
        label_column: str = LABEL,
        synthetic_labels: bool = False,
        human_fraction: Optional[float] = None,
        human_seed: int = 0,
        judge_column: str = JUDGE,
    ):
        _check_arguments(resolution, flip_rate, max_pairs, keep_ties, synthetic_labels, human_fraction, human_seed)
        self.source = Path(source)
        self.files = parquet_files(source, pattern)
        self.resolution = resolution
        self.keep_ties = bool(keep_ties)
        self.flip_rate = float(flip_rate)
        self.flip_seed = int(flip_seed)
        self.check_images = bool(check_images)
        self.max_pairs = max_pairs
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
        captions, labels, judges = self._read_tables()
        self._scan_rows(captions, labels, judges)
        self._select()

    # -- construction steps --------------------------------------------------------------------

    def _read_tables(self) -> Tuple[list, list, list]:
        """Read the needed columns of every file (a missing one raises ``ValueError``); returns
        the captions, labels and (DeDPO mode) judge values of all rows, in order."""
        import pyarrow.parquet as pq

        needed = list(self.columns.values()) + ([self.judge_column] if self.synthetic_labels else [])
        self._tables = []
        for file in self.files:
            names = pq.read_schema(file).names
            missing = [c for c in needed if c not in names]
            if missing:
                hint = ""
                if self.judge_column in missing and self.synthetic_labels:
                    hint = " (synthetic_labels=True reads the judge's column)"
                raise ValueError(f"dataset_name: {file} has no column(s) {missing} (has {names}){hint}")
            self._tables.append(pq.read_table(file, columns=needed))
        self._offsets = np.cumsum([0] + [t.num_rows for t in self._tables]).tolist()
        self.num_rows = self._offsets[-1]
        captions: List = []
        labels: List = []
        judges: List = []
        for table in self._tables:
            captions += table.column(self.columns["caption"]).to_pylist()
            labels += table.column(self.columns["label"]).to_pylist()
            if self.synthetic_labels:
                judges += table.column(self.judge_column).to_pylist()
        self._captions = captions
        return captions, labels, judges

    def _scan_rows(self, captions: list, labels: list, judges: list) -> None:
        """Sort every row into malformed, undecodable (decoded only with ``check_images``) or
        valid; keep the valid rows' labels and judge values."""
        skipped: Dict[str, List[int]] = {"malformed": [], "undecodable": []}
        judge_malformed: List[int] = []
        valid = []
        for row in range(self.num_rows):
            label = _label_value(labels[row])
            cells = [self.image_data(row, 0), self.image_data(row, 1)]
            if not isinstance(captions[row], str) or label is None or None in cells:
                skipped["malformed"].append(row)
                continue
            if self.synthetic_labels and _judge_value(judges[row]) is None:
                skipped["malformed"].append(row)
                judge_malformed.append(row)
                continue
            if self.check_images and not _decodes(cells):
                skipped["undecodable"].append(row)
                continue
            valid.append(row)
        self.skipped = skipped
        self.judge_malformed_rows = judge_malformed
        self.valid_rows = np.asarray(valid, dtype=np.int64)
        self._label = np.asarray([_label_value(labels[r]) for r in valid], dtype=np.float64)
        self._judge = (
            np.asarray([_judge_value(judges[r]) for r in valid], dtype=np.float64) if self.synthetic_labels else None
        )

    def image_data(self, row: int, which: int) -> Optional[bytes]:
        """The encoded bytes of image ``which`` (0: ``jpg_0``, 1: ``jpg_1``) of source ``row``
        (``None`` for an empty cell)."""
        file = bisect.bisect_right(self._offsets, row) - 1
        column = self.columns["image_0" if which == 0 else "image_1"]
        return image_bytes(self._tables[file].column(column)[row - self._offsets[file]].as_py())

    def _select(self) -> None:
        """Drop ties (unless kept), truncate to max_pairs, order the pairs, pick the human-labelled
        (DeDPO mode) and the flipped pairs; then log."""
        is_tie = self._label == 0.5
        keep = np.ones(len(self.valid_rows), dtype=bool) if self.keep_ties else ~is_tie
        rows = self.valid_rows[keep]
        label = self._label[keep]
        judge = self._judge[keep] if self.synthetic_labels else None
        if self.max_pairs is not None:
            rows, label = rows[: self.max_pairs], label[: self.max_pairs]
            judge = judge[: self.max_pairs] if judge is not None else None
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

    def summary(self) -> Dict[str, int]:
        out = {
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
        return self._captions[row]

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
        info = {"index": index, "row": row, "caption": self._captions[row], "flipped": flipped, "tie": tie}
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

    def __getitem__(self, index: int) -> dict:
        item = self.item_info(index)
        row = item["row"]
        pixels, sizes, crops = [], [], []
        for which in (1, 0) if item.pop("swap") else (0, 1):
            data = self.image_data(row, which)
            try:
                image = decode_image(data)
            except Exception as error:  # only reachable with check_images=False
                raise RuntimeError(
                    f"row {row}: image {which} does not decode ({error}); build the dataset with check_images=True "
                    "to skip such rows up front"
                ) from error
            tensor, size, crop = preprocess(image, self.resolution)
            pixels.append(tensor)
            sizes.append(size)
            crops.append(crop)
        item["pixel_values"] = torch.stack(pixels)
        item["original_sizes"] = torch.tensor(sizes, dtype=torch.int64)
        item["crop_top_lefts"] = torch.tensor(crops, dtype=torch.int64)
        return item


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


def _label_value(value) -> Optional[float]:
    """1.0, 0.0 or 0.5 for a valid ``label_0`` cell, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if value in VALID_LABELS else None


def _judge_value(value) -> Optional[float]:
    """The judge's probability in a valid ``synthetic_label_0`` cell (a finite number in
    [0, 1]), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if 0.0 <= value <= 1.0 else None  # NaN fails both comparisons


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
    """

    def __init__(self, num_pairs: int, seed: int = 0, *, start: int = 0, shuffle: bool = True, infinite: bool = False):
        if num_pairs < 1:
            raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.num_pairs = int(num_pairs)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.infinite = bool(infinite)
        self.start = int(start)
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

    def __iter__(self) -> Iterator[int]:
        position = self.start
        end = None if self.infinite else (position // self.num_pairs + 1) * self.num_pairs
        while end is None or position < end:
            yield self.index_at(position)
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
    ``[B]``: the keywords of ``adaptive_dpo_loss(..., loss_type="dedpo")``."""
    if not items:
        raise ValueError("collate_pairs needs at least one item")
    batch = {}
    for key, first in items[0].items():
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
# encoding (shared by the cache and the trainer's uncached path, so both give the same numbers)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_images(vae, pixel_values: torch.Tensor) -> torch.Tensor:
    """Latents of ``[N, 3, R, R]`` pixels in [-1, 1]: ``(latent_dist.mean - shift) * scaling_factor``.

    The *mean* of the VAE posterior, not a sample: deterministic, so a cached latent does not
    depend on a generator or on the batch it was encoded in. (The SD VAE's posterior std is
    small next to the mean; the diffusers DPO script samples instead.)
    """
    parameter = next(vae.parameters())
    mean = vae.encode(pixel_values.to(device=parameter.device, dtype=parameter.dtype)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        mean = mean - shift
    return mean * vae.config.scaling_factor


@torch.no_grad()
def encode_prompts(
    captions: Sequence[str], tokenizers: Sequence, text_encoders: Sequence
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Text conditioning as the pipelines build it.

    One encoder (SD 1.5): ``(last_hidden_state [N, L, D], None)``. Two (SDXL): the penultimate
    hidden states of both, concatenated on the last dim, and the projected pooled embedding
    (``text_embeds``) of the second: ``([N, L, D1 + D2], [N, P])``.
    """
    if len(tokenizers) != len(text_encoders) or len(tokenizers) not in (1, 2):
        raise ValueError("need one (sd15) or two (sdxl) tokenizers with as many text encoders")
    captions = list(captions)
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(next(encoder.parameters()).device)
        if len(text_encoders) == 1:
            hidden.append(encoder(ids).last_hidden_state)
        else:
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", None)
            if pooled is None:
                pooled = out.pooler_output
    return torch.cat(hidden, dim=-1), pooled


def load_encoders(model_path, arch: Optional[str] = None, dtype: torch.dtype = torch.float32, device="cpu"):
    """``(vae, tokenizers, text_encoders)`` of a diffusers pipeline (a folder, a Hub id or a
    :class:`~fastpref.train.models.ModelSource`), in eval mode (see ``ModelSource.load_encoders``)."""
    from .models import ModelSource

    source = model_path if isinstance(model_path, ModelSource) else ModelSource(str(model_path))
    return source.load_encoders(arch or detect_arch(source.path, source.revision), dtype, device)


def time_ids(batch: dict, resolution: int) -> torch.Tensor:
    """SDXL ``add_time_ids [2B, 6]``: (original h, w, crop top, left, target h, w) per image."""
    target = torch.tensor([resolution, resolution], dtype=torch.int64).expand(batch["original_sizes"].shape[0], 2)
    return torch.cat([batch["original_sizes"], batch["crop_top_lefts"], target], dim=-1).float()


class BatchEncoder:
    """Turns a collated batch (pixels and captions, or cached latents and embeddings) into the
    trainer's batch (:mod:`fastpref.train.trainer`); the encoders are needed for pixels only."""

    def __init__(self, vae, tokenizers, text_encoders, resolution: int, device):
        self.vae, self.tokenizers, self.text_encoders = vae, tokenizers, text_encoders
        self.resolution, self.device = resolution, device

    def __call__(self, batch: dict) -> dict:
        labels = ("flipped", "synthetic_label", "human_label", "human_mask", "propensity")
        out = {k: batch[k] for k in labels if k in batch}
        if "latents" in batch:
            out["latents"] = batch["latents"]
            out["encoder_hidden_states"] = batch["prompt_embeds"]
            pooled = batch.get("pooled_prompt_embeds")
        else:
            out["latents"] = encode_images(self.vae, batch["pixel_values"].to(self.device)).float()
            out["encoder_hidden_states"], pooled = encode_prompts(
                batch["captions"], self.tokenizers, self.text_encoders
            )
        if pooled is not None:
            out["pooled_prompt_embeds"] = pooled
            out["add_time_ids"] = time_ids(batch, self.resolution)
        return out
