"""Preference pairs for the trainer: a Hugging Face dataset in, the trainer's ``[2B, ...]`` batches out.

:func:`open_split` opens the pairs (a Hub id, a folder in the Hub's layout, parquet files or a
``save_to_disk`` folder) as a memory-mapped ``datasets.Dataset`` (:mod:`.sources`);
:class:`PreferenceDataset` serves winner-first pairs over its row indices (ties, flips, bad rows,
DeDPO labels, a seeded subset), decoding the images of a pair only when it is
fetched (:mod:`.images`); :class:`PairSampler` gives their seeded, resumable order and
:func:`collate_pairs` the batch layout; :class:`BatchEncoder` makes the latents and text
embeddings the trainer takes, with the model family's encoders (the latent cache encodes with
them too, so both paths agree). With ``--streaming``, :class:`PairStream` reads the pairs as they
are needed instead, in a seeded block-shuffled order that a checkpoint resumes exactly (:mod:`.streaming`).
"""

from .batches import PER_IMAGE, collate_pairs
from .dataset import CAPTION, IMAGE_0, IMAGE_1, LABEL, VALID_LABELS, PreferenceDataset
from .encoding import BatchEncoder, FetchSkips
from .images import decode_image, image_bytes, preprocess
from .labels import JUDGE, HumanOrder, JudgedLabels, JudgeOrder, LabelPolicy, PairLabels
from .log import format_rows, logger
from .sampler import PairSampler
from .sources import open_split, parquet_splits
from .streaming import DEFAULT_BUFFER_SIZE, PairStream

__all__ = [
    "BatchEncoder",
    "CAPTION",
    "DEFAULT_BUFFER_SIZE",
    "FetchSkips",
    "HumanOrder",
    "IMAGE_0",
    "IMAGE_1",
    "JUDGE",
    "JudgeOrder",
    "JudgedLabels",
    "LABEL",
    "LabelPolicy",
    "PER_IMAGE",
    "PairLabels",
    "PairSampler",
    "PairStream",
    "PreferenceDataset",
    "VALID_LABELS",
    "collate_pairs",
    "decode_image",
    "format_rows",
    "image_bytes",
    "logger",
    "open_split",
    "parquet_splits",
    "preprocess",
]
