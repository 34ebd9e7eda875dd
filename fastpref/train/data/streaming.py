"""Streamed preference pairs (``fastpref train --streaming``): :class:`PairStream` reads the rows
as they are needed, with ``datasets``' streaming (the ``webdataset`` builder for tar shards, the
``parquet`` builder for parquet files, local or on the Hub), and resumes exactly from a
checkpoint without holding anything of the data's size (docs/data.md, "Streaming").

The order, per process, epoch ``e`` (one pass over the stream):

1. the shard files in the order ``default_rng([seed, 0x5A4D, e]).permutation``;
2. ``datasets.distributed.split_dataset_by_node``: process ``rank`` of ``world`` reads its own
   shards (when ``world`` divides the shard count) or every ``world``-th row;
3. a *block* buffer of ``buffer_size`` rows: ``buffer_size`` rows are read, permuted with
   ``default_rng([seed, 0xB10C, e, block])`` and served in that order; then the next block.

The position in the stream is ``(epoch, block, the stream's state_dict() at the block's start,
rows of the block consumed)``: a resume re-opens the stream at the block's start and re-reads at
most one block (``datasets``' own ``state_dict()`` of a buffer-shuffled stream drops the buffer,
so it would not resume exactly). Hand-written only for that block; reading is ``datasets``'.
"""

from __future__ import annotations

import atexit
import copy
import itertools
import json
import weakref
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .batches import collate_pairs
from .dataset import CAPTION, IMAGE_0, IMAGE_1, LABEL, VALID_LABELS, UndecodableDataError, add_pair_pixels
from .images import decode_image, image_bytes
from .labels import HumanOrder
from .log import logger

WEBDATASET, PARQUET = "webdataset", "parquet"
BUILDERS = {".tar": WEBDATASET, ".parquet": PARQUET}
DEFAULT_BUFFER_SIZE = 1000  # rows per shuffle block: datasets' IterableDataset.shuffle default
# Mixed into the seeds of the shard order and of the block permutations (unrelated streams).
_SHARD_STREAM = 0x5A4D
_BLOCK_STREAM = 0xB10C
_COUNTS = ("rows", "malformed", "undecodable", "ties", "ties_dropped", "pairs")


def stream_source(name, split: str = "train", cache_dir: Optional[str] = None) -> Tuple[str, List[str]]:
    """``(builder, files)``: the ``datasets`` builder (``"webdataset"`` or ``"parquet"``) and the
    data files of split ``split`` of ``name``, in a fixed order.

    ``name`` is a ``.tar`` or ``.parquet`` file (the split ``train``); a local folder of tar
    shards or parquet files, in the Hub's layout (split names from file and folder names, as
    ``datasets`` reads them) or not (every file is ``train``); else a Hub id, whose data files
    ``datasets.load_dataset_builder`` lists (nothing is downloaded). ``ValueError`` /
    ``FileNotFoundError`` name the flag."""
    path = Path(str(name)).expanduser()
    if path.is_file():
        if path.suffix not in BUILDERS:
            raise ValueError(f"--dataset_name: --streaming reads .tar (webdataset) or .parquet files, not {name}")
        if split != "train":
            raise ValueError(f"--dataset_split_name: a single file is the split 'train', got {split!r}")
        return BUILDERS[path.suffix], [str(path)]
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            raise ValueError(
                f"--streaming: {name} is a save_to_disk folder, memory-mapped already: train on it without --streaming"
            )
        splits = local_splits(path)
        if split not in splits:
            raise ValueError(f"--dataset_split_name: {name} has no split {split!r} (it has {sorted(splits)})")
        return splits[split]
    import datasets

    try:
        builder = datasets.load_dataset_builder(str(name), cache_dir=cache_dir)
    except Exception as error:  # offline, unknown id: say which flag
        raise ValueError(
            f"--dataset_name: {name} is no local file or folder, and datasets.load_dataset_builder could not open "
            f"it ({type(error).__name__}: {error})"
        ) from None
    files = dict(builder.config.data_files or {})
    if builder.name not in (WEBDATASET, PARQUET):
        raise ValueError(f"--streaming: {name} is read by datasets' {builder.name!r} builder: not parquet or tar")
    if split not in files:
        raise ValueError(f"--dataset_split_name: {name} has no split {split!r} (it has {sorted(files)})")
    return builder.name, [str(f) for f in files[split]]


def local_splits(folder) -> Dict[str, Tuple[str, List[str]]]:
    """``{split: (builder, files)}`` of a local folder of tar shards or parquet files, split names
    as ``datasets`` reads them; files sorted by path. One kind of file per split."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(str(folder))
    except Exception:  # datasets finds no data file at all
        patterns = {}
    found = DataFilesDict.from_patterns(patterns, base_path=str(folder)) if patterns else {}
    splits = {}
    for split, files in found.items():
        by_kind: Dict[str, List[str]] = {}
        for file in sorted(str(f) for f in files):
            kind = BUILDERS.get(Path(file).suffix)
            if kind is not None:
                by_kind.setdefault(kind, []).append(file)
        if len(by_kind) > 1:
            raise ValueError(f"--dataset_name: the {split!r} split of {folder} mixes tar shards and parquet files")
        if by_kind:
            splits[split] = next(iter(by_kind.items()))
    if not splits:
        raise FileNotFoundError(f"--dataset_name: no *.tar or *.parquet files under {folder}")
    return splits


def label_value(value) -> float:
    """A label cell as a float (a webdataset's ``label_0.txt`` is text); NaN when not a number
    (booleans included, as in the map-style path)."""
    if isinstance(value, bool):
        return float("nan")
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


class PairStream:
    """The pairs of ``source`` read as a stream, for one process of ``world_size``: winner first,
    ties dropped unless ``keep_ties``, malformed and undecodable rows skipped and counted, in a
    seeded order (the module's docstring), resumable exactly (:meth:`state_dict`).

    :meth:`next_batch` gives the next ``batch_size`` pairs collated as
    :func:`~fastpref.train.data.collate_pairs` does, with the fields of a
    :class:`~fastpref.train.data.PreferenceDataset` item; pair ``i`` of a process's ``k``-th
    batch has the global sample position ``k * batch_size * world_size + rank * batch_size + i``
    (the map-style path's), which seeds its random crop and flip. A pass over the stream that
    serves no pair raises :class:`~fastpref.train.data.dataset.UndecodableDataError` (a
    ``ValueError``) with the counts.

    Args:
        source: a Hub id, a local folder of tar shards or parquet files, or one such file
            (:func:`stream_source`).
        resolution: the side ``R`` of the square images served.
        split, cache_dir: the split, and ``datasets``' cache (only a Hub id's metadata).
        seed: the seed of the shard order, the blocks' permutations and the crops and flips.
        buffer_size: rows per shuffle block (``--shuffle_buffer_size``).
        batch_size: pairs per batch of this process.
        rank, world_size: this process and the number of processes.
        keep_ties, hflip, random_crop: as :class:`~fastpref.train.data.PreferenceDataset`'s.
        caption_column, image_columns, label_column: the columns' names (a webdataset's keys
            without their file extension: ``jpg_0.jpg`` is the column ``jpg_0``).
    """

    def __init__(
        self,
        source,
        resolution: int = 512,
        *,
        split: str = "train",
        cache_dir: Optional[str] = None,
        seed: int = 0,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        batch_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
        keep_ties: bool = False,
        hflip: bool = False,
        random_crop: bool = False,
        caption_column: str = CAPTION,
        image_columns: Tuple[str, str] = (IMAGE_0, IMAGE_1),
        label_column: str = LABEL,
    ):
        if buffer_size < 1 or batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad stream geometry: buffer {buffer_size}, batch {batch_size}, rank {rank}/{world_size}")
        self.source, self.split, self.cache_dir = str(source), split, cache_dir
        self.builder, self.files = stream_source(source, split, cache_dir)
        self.resolution, self.seed, self.buffer_size = int(resolution), int(seed), int(buffer_size)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.policy = HumanOrder(keep_ties=bool(keep_ties))
        self.hflip, self.random_crop = bool(hflip), bool(random_crop)
        self.columns = {"caption": caption_column, "image_0": image_columns[0], "image_1": image_columns[1]}
        self.columns["label"] = label_column
        self.state = self.initial_state()
        self._stream = self._rows = self._block = None
        self.check_columns()
        atexit.register(_close, weakref.ref(self))  # before pyarrow is torn down: a quiet exit

    # -- the stream ----------------------------------------------------------------------------

    def initial_state(self) -> dict:
        return {
            "epoch": 0,
            "block": 0,
            "block_start": None,  # the datasets stream's state_dict() at the block's start; None: the epoch's start
            "offset": 0,  # rows of the block consumed
            "served": 0,  # pairs served by this process since the start
            "epoch_pairs": 0,  # pairs served in this epoch
            "world_size": self.world_size,
            "counts": {name: 0 for name in _COUNTS},
        }

    def shard_order(self, epoch: int) -> List[str]:
        """The data files in epoch ``epoch``'s order."""
        order = np.random.default_rng([self.seed, _SHARD_STREAM, int(epoch)]).permutation(len(self.files))
        return [self.files[i] for i in order]

    def open(self, epoch: int):
        """This process's ``datasets.IterableDataset`` of epoch ``epoch`` (images left encoded)."""
        import datasets
        from datasets.distributed import split_dataset_by_node

        files = self.shard_order(epoch)
        stream = datasets.load_dataset(self.builder, data_files={self.split: files}, split=self.split, streaming=True)
        stream = stream.decode(False)
        if self.builder == WEBDATASET and stream.features is not None:  # "jpg_0.jpg" -> "jpg_0"
            names = {k: k.rsplit(".", 1)[0] for k in stream.features if "." in k and not k.startswith("__")}
            if len(set(names.values())) == len(names) and not set(names.values()) & set(stream.features):
                stream = stream.rename_columns(names)
        return split_dataset_by_node(stream, rank=self.rank, world_size=self.world_size)

    def check_columns(self) -> None:
        """``ValueError`` naming the flag of a column the stream does not have (from its features:
        the parquet schema, or a webdataset's first rows)."""
        names = self.open(0).features
        if names is None:
            return
        flags = {"caption": "--caption_column", "image_0": "--image_column_0", "image_1": "--image_column_1"}
        flags["label"] = "--label_column"
        for key, column in self.columns.items():
            if column not in names:
                raise ValueError(f"{flags[key]}: the dataset has no column {column!r} (it has {sorted(names)})")

    def _next_block(self) -> None:
        """Read the next block of rows (opening the stream where the state says) and permute it;
        at the end of the stream, move to the next epoch."""
        state = self.state
        while True:
            if self._rows is None:  # a fresh process, or a new epoch: open at the block's start
                self._stream = self.open(state["epoch"])
                if state["block_start"] is not None:
                    self._stream.load_state_dict(copy.deepcopy(state["block_start"]))
                self._rows = iter(self._stream)
            elif self._block is not None:  # the block is used up: the next one starts here
                state["block"] += 1
                state["offset"] = 0
                state["block_start"] = copy.deepcopy(self._stream.state_dict())
            rows = list(itertools.islice(self._rows, self.buffer_size))
            if rows:
                order = np.random.default_rng([self.seed, _BLOCK_STREAM, state["epoch"], state["block"]])
                self._block = [rows[i] for i in order.permutation(len(rows))]
                return
            if state["epoch_pairs"] == 0:
                counts = state["counts"]
                raise UndecodableDataError(
                    f"--dataset_name {self.source}: no usable pair in a whole pass over the stream (process "
                    f"{self.rank}: {counts['rows']} rows read, {counts['malformed']} malformed, "
                    f"{counts['undecodable']} undecodable, {counts['ties_dropped']} ties dropped)"
                )
            state.update(epoch=state["epoch"] + 1, block=0, block_start=None, offset=0, epoch_pairs=0)
            self._rows = self._block = None

    def _next_row(self) -> Tuple[int, dict]:
        """The next row of the block order and its id (rows read before it x world + rank)."""
        while self._block is None or self.state["offset"] >= len(self._block):
            self._next_block()
        row = self._block[self.state["offset"]]
        self.state["offset"] += 1
        counts = self.state["counts"]
        counts["rows"] += 1
        return (counts["rows"] - 1) * self.world_size + self.rank, row

    def _next_pair(self, skipped: List[int]) -> dict:
        """The next served pair as an item; undecodable rows on the way are added to ``skipped``."""
        counts = self.state["counts"]
        while True:
            row_id, row = self._next_row()
            caption = row.get(self.columns["caption"])
            if isinstance(caption, bytes):
                caption = caption.decode("utf-8", "replace")
            label = label_value(row.get(self.columns["label"]))
            cells = [image_bytes(row.get(self.columns[key])) for key in ("image_0", "image_1")]
            if not isinstance(caption, str) or label not in VALID_LABELS or None in cells:
                counts["malformed"] += 1
                continue
            if label == 0.5:
                counts["ties"] += 1
                if not self.policy.keep_ties:
                    counts["ties_dropped"] += 1
                    continue
            try:
                images = [decode_image(cell) for cell in cells]
            except Exception as error:  # noqa: BLE001 - any decoder failure: the next row stands in
                where = f" ({row['__key__']} of {row['__url__']})" if "__key__" in row else ""
                logger.warning("streamed row %d%s does not decode (%s); skipped", row_id, where, error)
                counts["undecodable"] += 1
                skipped.append(row_id)
                continue
            labels = self.policy.assign(np.array([label]), {}, 0.0, 0, 0).item(0)
            if labels.pop("swap"):
                images.reverse()
            item = {"index": self.state["served"], "row": row_id, "caption": caption, "flipped": False}
            item.update(tie=label == 0.5, **labels)
            add_pair_pixels(item, images, self.resolution, self.position(), self.seed, self.random_crop, self.hflip)
            self.state["served"] += 1
            self.state["epoch_pairs"] += 1
            counts["pairs"] += 1
            return item

    def position(self) -> int:
        """The global sample position of the next pair this process serves."""
        batch, within = divmod(self.state["served"], self.batch_size)
        return (batch * self.world_size + self.rank) * self.batch_size + within

    def next_batch(self) -> dict:
        """The next ``B = batch_size`` pairs, collated: ``pixel_values [2B, 3, R, R]`` float32 (the
        B winners, then the B losers), ``original_sizes``, ``crop_top_lefts [2B, 2]`` int64,
        ``captions`` (list of B str), ``flipped``, ``tie`` bool ``[B]``, ``human_label`` float32
        ``[B]``, ``index``, ``row`` int64 ``[B]`` and ``skipped_rows`` (the undecodable rows passed)."""
        skipped: List[int] = []
        items = [self._next_pair(skipped) for _ in range(self.batch_size)]
        batch = collate_pairs(items)
        batch["skipped_rows"] = skipped
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    def close(self) -> None:
        """Close the open reader (a later batch re-opens it where the state says)."""
        if self._rows is not None and hasattr(self._rows, "close"):
            self._rows.close()
        self._stream = self._rows = self._block = None

    # -- counts and state ----------------------------------------------------------------------

    def summary(self) -> dict:
        """The counts of this process's stream so far, for logs and ``train_summary.json``:
        ``split``, ``streaming`` (True), ``rows`` read, ``pairs`` served, ``malformed``,
        ``undecodable``, ``ties``, ``ties_dropped``, ``epoch``; ``num_pairs`` is None (a stream
        has no length)."""
        counts = self.state["counts"]
        return {"split": self.split, "streaming": True, "num_pairs": None, **counts, "epoch": self.state["epoch"]}

    def state_dict(self) -> dict:
        """The position (JSON-able): epoch, block, the block's start, the offset in it, the pairs
        served and the counts."""
        return copy.deepcopy(self.state)

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (of :meth:`state_dict`): the next pair is the one that would
        have followed. ``ValueError`` when it was written by another number of processes."""
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"--streaming: the checkpoint's stream was split across {state['world_size']} processes, this run has "
                f"{self.world_size}; resume with {state['world_size']}"
            )
        self.state = copy.deepcopy(state)
        self._stream = self._rows = self._block = None  # the next row re-reads the block, at its offset

    def install(self, accelerator) -> None:
        """Save this process's position in every checkpoint (``stream_state_<rank>.json``, through
        accelerate's save/load state hooks) and continue from it on resume."""
        from ...files import write_json_atomic

        name = f"stream_state_{self.rank}.json"

        def save(models, weights, output_dir):
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            write_json_atomic(Path(output_dir) / name, self.state_dict())

        def load(models, input_dir):
            file = Path(input_dir) / name
            if not file.exists():
                raise ValueError(f"--streaming: {input_dir} holds no stream position ({name}); not a streamed run's")
            self.load_state_dict(json.loads(file.read_text()))

        accelerator.register_save_state_pre_hook(save)
        accelerator.register_load_state_pre_hook(load)


def _close(ref) -> None:
    stream = ref()
    if stream is not None:
        stream.close()
