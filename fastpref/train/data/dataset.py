"""The preference pairs served to the trainer: :class:`PreferenceDataset` (docs/data.md)."""

from __future__ import annotations

import copy
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .images import decode_image, decodes, image_bytes, preprocess
from .labels import JUDGE, HumanOrder, LabelPolicy, PairLabels, label_policy_for
from .log import format_rows, logger
from .sources import is_hf_dataset, open_split

CAPTION, IMAGE_0, IMAGE_1, LABEL = "caption", "jpg_0", "jpg_1", "label_0"
VALID_LABELS = (0.0, 0.5, 1.0)
# Mixed into the seed of the random crops and flips of one fetch (augment_seed, sample position)
# so that augment_seed == sampler seed still gives unrelated streams.
_AUGMENT_STREAM = 0xA06


class UndecodableDataError(ValueError):
    """No pair of a :class:`PreferenceDataset` decodes: every fetch would fail."""


class PreferenceDataset(torch.utils.data.Dataset):
    """Pick-a-Pic v2 preference pairs (``caption``, ``jpg_0``, ``jpg_1``, ``label_0``) over the
    rows of a Hugging Face dataset, served winner first; docs/data.md has the rules.

    Building reads only the small columns and sorts the rows (malformed, undecodable, valid); the
    label policy (:mod:`.labels`: the human order, or DeDPO's judge order) then orders and labels
    the served pairs, with seeded label flips and a seeded subset. ``dataset[i]`` (or
    ``dataset[(i, position)]``) decodes the pair then: ``pixel_values [2, 3, R, R]`` float32
    (the served first image at 0), ``original_sizes``, ``crop_top_lefts [2, 2]`` int64 and the
    labels (``flipped``, ``tie`` bool, ``human_label`` float; DeDPO: ``synthetic_label``,
    ``human_mask``, ``propensity``). Counts: ``num_rows``, ``num_malformed``, ``num_undecodable``,
    ``num_ties``, ``num_ties_dropped``, ``num_flipped``, :meth:`summary`; ``len(dataset)`` is the
    number of pairs served.

    Args:
        source: what :func:`open_split` takes (a Hub id, a folder, a parquet file), or a
            ``datasets.Dataset``.
        resolution: the side ``R`` of the square images served.
        split, cache_dir: :func:`open_split`'s (``--dataset_split_name``, ``--cache_dir``).
        keep_ties: serve ties (label 0.5) in stored order instead of dropping them.
        flip_rate, flip_seed: the share of label flips and its seed.
        check_images: decode every image while building (skip the undecodable rows up front).
        max_pairs, subset_seed: serve the seeded subset of this many pairs.
        hflip, random_crop, augment_seed: the horizontal flip and random crop of fetched pixels.
        synthetic_labels: DeDPO mode (the judge order).
        human_fraction: in (0, 1]; DeDPO mode only; the share of pairs that keep a human label.
        human_seed: the seed of the choice of those pairs.
        caption_column, image_columns, label_column, judge_column: the columns' names.
        label_policy: a policy object (:class:`~.labels.LabelPolicy`) in place of
            ``synthetic_labels``, ``keep_ties``, ``human_fraction``, ``human_seed`` and ``judge_column``.
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
        label_policy: Optional[LabelPolicy] = None,
    ):
        _check_arguments(resolution, flip_rate, max_pairs)
        by_keywords = label_policy_for(synthetic_labels, keep_ties, human_fraction, human_seed, judge_column)
        if label_policy is None:
            label_policy = by_keywords
        elif by_keywords != HumanOrder():
            raise ValueError(
                "label_policy replaces synthetic_labels, keep_ties and human_fraction: pass one or the other"
            )
        self.label_policy = label_policy
        self.source = source if is_hf_dataset(source) else str(source)
        self.split = split
        self.data = source if is_hf_dataset(source) else open_split(source, split, cache_dir)
        self.resolution = resolution
        self.keep_ties = bool(label_policy.keep_ties)
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
        # Kept out of self.columns: the cache key (dataset_fingerprint) must not depend on the policy.
        self.synthetic_labels = bool(label_policy.synthetic_labels)
        self.human_fraction = label_policy.human_fraction
        self.human_seed = int(getattr(label_policy, "human_seed", human_seed))
        self.judge_column = getattr(label_policy, "judge_column", judge_column)
        labels, values = self._read_small_columns()
        self._scan_rows(labels, values)
        self._select()

    # -- construction steps --------------------------------------------------------------------

    def _read_small_columns(self) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        """Check the columns (a missing one raises ``ValueError`` naming its flag) and read the
        small ones: the captions (kept as Arrow, memory-mapped), the labels and the label
        policy's columns (DeDPO mode: the judge's) as float64 arrays (NaN where not a number),
        and whether each image cell is empty -- from the cells' lengths, without reading their
        bytes."""
        import pyarrow as pa
        import pyarrow.compute as pc

        names = self.data.column_names
        flags = {"caption": "--caption_column", "image_0": "--image_column_0", "image_1": "--image_column_1"}
        flags["label"] = "--label_column"
        for key, column in self.columns.items():
            if column not in names:
                raise ValueError(f"{flags[key]}: the dataset has no column {column!r} (it has {names})")
        self.label_policy.check_columns(names)
        small = [self.columns["caption"], self.columns["label"], *self.label_policy.columns]
        table = self.data.select_columns(small).with_format("arrow")[:]
        self.num_rows = table.num_rows
        self._captions = table.column(self.columns["caption"])
        if pa.types.is_string(self._captions.type) or pa.types.is_large_string(self._captions.type):
            self._caption_ok = np.asarray(pc.is_valid(self._captions).to_numpy(zero_copy_only=False), dtype=bool)
        else:  # not text at all: every row is malformed
            self._caption_ok = np.zeros(self.num_rows, dtype=bool)
        labels = _numbers(table.column(self.columns["label"]))
        values = {name: _numbers(table.column(name)) for name in self.label_policy.columns}
        self._images = self.data.select_columns([self.columns["image_0"], self.columns["image_1"]]).with_format("arrow")
        # From the memory-mapped table of all stored rows (then the dataset's index mapping, if it
        # has one): only the cells' offsets and validity bitmaps are read, never the bytes. datasets
        # has no public accessor of the mapping; flatten_indices() would copy every image.
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
        return labels, values

    def _scan_rows(self, labels: np.ndarray, values: Dict[str, np.ndarray]) -> None:
        """Sort every row into malformed, undecodable (decoded only with ``check_images``) or
        valid; keep the valid rows' labels and label-policy values."""
        label_ok = np.isin(labels, VALID_LABELS)
        ok = self._caption_ok & label_ok & self._image_ok
        unusable = ok & ~self.label_policy.usable(values, self.num_rows)
        ok &= ~unusable
        malformed = np.flatnonzero(~ok)
        undecodable: List[int] = []
        if self.check_images:
            for row in np.flatnonzero(ok).tolist():
                if not decodes([self.image_data(row, 0), self.image_data(row, 1)]):
                    undecodable.append(row)
            ok[undecodable] = False
        self.skipped = {"malformed": malformed.tolist(), "undecodable": undecodable}
        self.judge_malformed_rows = np.flatnonzero(unusable).tolist()
        self.valid_rows = np.flatnonzero(ok).astype(np.int64)
        self._label = labels[self.valid_rows]
        self._values = {name: value[self.valid_rows] for name, value in values.items()}

    def image_data(self, row: int, which: int) -> Optional[bytes]:
        """The encoded bytes of image ``which`` (0: ``jpg_0``, 1: ``jpg_1``) of source ``row``
        (``None`` for an empty cell); read from the memory-mapped Arrow file."""
        column = self.columns["image_0" if which == 0 else "image_1"]
        return image_bytes(self._images[int(row)].column(column)[0].as_py())

    def _select(self) -> None:
        """Drop ties (unless kept), truncate to max_pairs, let the label policy order and label
        the pairs (flips included); then log."""
        is_tie = self._label == 0.5
        keep = self.label_policy.served(self._label)
        rows, label = self.valid_rows[keep], self._label[keep]
        values = {name: value[keep] for name, value in self._values.items()}
        if self.max_pairs is not None and self.max_pairs < len(rows):
            # datasets' shuffle(seed).select(range(N)) draws this permutation; kept in row order
            pick = np.sort(np.random.default_rng(self.subset_seed).permutation(len(rows))[: self.max_pairs])
            rows, label = rows[pick], label[pick]
            values = {name: value[pick] for name, value in values.items()}
        self._rows = rows
        self._tie = label == 0.5
        self._labels = self.label_policy.assign(
            label, values, self.flip_rate, self.flip_seed, len(self.judge_malformed_rows)
        )
        self.num_ties = int(is_tie.sum())
        self.num_ties_dropped = int((is_tie & ~keep).sum())
        self.num_flipped = int(self._labels.flipped.sum())
        self.flipped_rows = rows[self._labels.flipped].tolist()
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
        self._labels.log(len(self))
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
        other._values = {name: value[keep] for name, value in self._values.items()}
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
        return torch.from_numpy(self._labels.flipped.copy())

    @property
    def rows(self) -> np.ndarray:
        """The source row of every served pair, in item order."""
        return self._rows.copy()

    @property
    def labels(self) -> PairLabels:
        """The label policy's labels of the served pairs (:class:`PairLabels`, arrays in item order)."""
        return self._labels

    @property
    def human_mask(self) -> torch.Tensor:
        """``[len(self)]`` bool: which served pairs keep their human label (DeDPO mode only)."""
        return torch.from_numpy(self._labels.human_mask.copy())

    @property
    def propensity(self) -> float:
        """m / n, the probability that a pair keeps its human label (DeDPO mode only)."""
        return self._labels.propensity

    @property
    def num_human_labelled(self) -> int:
        """m, the number of served pairs that keep their human label (DeDPO mode only)."""
        return self._labels.num_human_labelled

    def judge_agreement(self) -> Dict[str, float]:
        """How far the judge is from the humans on the human-labelled pairs (DeDPO mode only;
        :meth:`JudgedLabels.judge_agreement <fastpref.train.data.labels.JudgedLabels.judge_agreement>`)."""
        return self._labels.judge_agreement()

    def summary(self) -> dict:
        """The counts for logs and ``train_summary.json``: ``split``, ``rows`` (in the split),
        ``pairs`` and ``num_pairs`` (both the number served, after filtering and the subset),
        ``malformed``, ``undecodable`` (found while building), ``ties``, ``ties_dropped``,
        ``flipped``; DeDPO mode adds ``judge_malformed`` and ``human_labelled``."""
        return {
            "split": self.split,
            "num_pairs": len(self),
            "rows": self.num_rows,
            "pairs": len(self),
            "malformed": self.num_malformed,
            "undecodable": self.num_undecodable,
            "ties": self.num_ties,
            "ties_dropped": self.num_ties_dropped,
            "flipped": self.num_flipped,
            **self._labels.summary(),
        }

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
        row = int(self._rows[index])
        info = {"index": index, "row": row, "caption": self.caption(row)}
        info.update(flipped=bool(self._labels.flipped[index]), tie=bool(self._tie[index]))
        info.update(self._labels.item(index))
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
        raise UndecodableDataError(
            f"{self.source}: no pair decodes ({len(skipped)} rows skipped as undecodable, all {len(self)} pairs tried)"
        )

    def _add_pixels(self, item: dict, images: list, position: int) -> None:
        add_pair_pixels(item, images, self.resolution, position, self.augment_seed, self.random_crop, self.hflip)


def add_pair_pixels(
    item: dict, images: list, resolution: int, position: int, augment_seed: int, random_crop: bool, hflip: bool
) -> None:
    """Add ``pixel_values [2, 3, R, R]`` float32, ``original_sizes`` and ``crop_top_lefts``
    ``[2, 2]`` int64 of a pair's two PIL ``images`` (served order) to ``item``: one crop position
    and one flip coin for both images, drawn from ``(augment_seed, position)`` -- the pair's
    global sample position, so a resumed run draws the same."""
    crop, flip = None, False
    if random_crop or hflip:
        draw = np.random.default_rng([augment_seed, _AUGMENT_STREAM, int(position)]).random(3)
        crop = (float(draw[0]), float(draw[1])) if random_crop else None
        flip = hflip and bool(draw[2] < 0.5)
    pixels, sizes, crops = zip(*(preprocess(image, resolution, crop=crop, flip=flip) for image in images))
    item["pixel_values"] = torch.stack(pixels)
    item["original_sizes"] = torch.tensor(sizes, dtype=torch.int64)
    item["crop_top_lefts"] = torch.tensor(crops, dtype=torch.int64)


def _check_arguments(resolution, flip_rate, max_pairs):
    """``ValueError`` for a bad argument of :class:`PreferenceDataset`, before any file is read."""
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    if not (isinstance(flip_rate, (int, float)) and 0.0 <= flip_rate <= 1.0):
        raise ValueError(f"flip_rate must be in [0, 1], got {flip_rate!r}")
    if max_pairs is not None and max_pairs < 0:
        raise ValueError(f"max_pairs must be >= 0, got {max_pairs}")


def _numbers(column) -> np.ndarray:
    """An Arrow column of numbers as float64 (NaN where null); NaN everywhere for any other type
    (booleans and strings are not labels)."""
    import pyarrow as pa

    kind = column.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        return np.full(len(column), np.nan)
    return np.asarray(column.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
