"""The order of the pairs: :class:`PairSampler`, seeded and resumable at any sample position."""

from __future__ import annotations

from typing import Dict, Iterator, Tuple, Union

import numpy as np
import torch


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
