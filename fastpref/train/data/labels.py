"""Label policies: how a :class:`~fastpref.train.data.dataset.PreferenceDataset` orders its pairs
and labels them (docs/data.md).

A policy reads the columns it needs beside ``label_0`` (:attr:`columns`), says which rows those
columns make usable, which pairs are served (ties) and, over the served pairs, gives their
:class:`PairLabels`: the served order, the label flips and the labels of each item.
:class:`HumanOrder` puts the human's winner first; :class:`JudgeOrder` (DeDPO) lets the AI judge
order every pair and keeps the human label on a seeded subset. A custom policy implements the
same methods (:class:`LabelPolicy`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .log import logger

JUDGE = "synthetic_label_0"  # the AI judge's probability that jpg_0 is preferred (DeDPO mode)
# Mixed into the flip RNG's seed so that flip_seed == sampler seed still gives unrelated streams.
_FLIP_STREAM = 0xF11B
# Likewise for the choice of the pairs that keep their human label (human_seed).
_HUMAN_STREAM = 0xDED0


def _needs_judge(name: str) -> ValueError:
    return ValueError(f"{name} needs a dataset built with synthetic_labels=True (DeDPO mode)")


def round_half_up(x: float) -> int:
    """``floor(x + 0.5)``: the count ``round(f * n)`` of the docs (Python's ``round`` rounds half to even)."""
    return int(math.floor(x + 0.5))


def choose_flips(n: int, candidates: np.ndarray, flip_rate: float, flip_seed: int) -> np.ndarray:
    """``[n]`` bool: ``round(flip_rate * len(candidates))`` of the ``candidates`` (indices into the
    ``n`` served pairs), the first of ``default_rng([flip_seed, 0xF11B]).permutation``."""
    n_flip = round_half_up(flip_rate * len(candidates))
    flipped = np.zeros(n, dtype=bool)
    if n_flip:
        rng = np.random.default_rng([flip_seed, _FLIP_STREAM])
        flipped[candidates[rng.permutation(len(candidates))[:n_flip]]] = True
    return flipped


@dataclasses.dataclass(frozen=True, eq=False)
class PairLabels:
    """The labels of the ``n`` served pairs, in item order (all arrays ``[n]``).

    ``swap`` (bool): the stored ``jpg_1`` is served first. ``flipped`` (bool): a label flip.
    ``human_label`` (float64): the probability that the served first image is the human's
    choice (NaN where the pair has no human label).
    """

    swap: np.ndarray
    flipped: np.ndarray
    human_label: np.ndarray

    def item(self, index: int) -> dict:
        """The label fields of item ``index``: ``human_label`` (float), ``swap`` (bool)."""
        return {"human_label": float(self.human_label[index]), "swap": bool(self.swap[index])}

    def summary(self) -> dict:
        """Counts beyond the dataset's own, for ``PreferenceDataset.summary``."""
        return {}

    def log(self, num_pairs: int) -> None:
        """Log what the policy decided (nothing beyond the dataset's line here)."""

    @property
    def human_mask(self) -> np.ndarray:
        raise _needs_judge("human_mask")

    def judge_agreement(self) -> Dict[str, float]:
        raise _needs_judge("judge_agreement")


@dataclasses.dataclass(frozen=True, eq=False)
class JudgedLabels(PairLabels):
    """:class:`PairLabels` in DeDPO mode, with ``synthetic_label`` (float64 ``[n]``: the judge's
    probability that the served first image wins), ``human_mask`` (bool ``[n]``), the
    ``propensity`` m / n, the rows skipped for a malformed judge value, and the policy."""

    synthetic_label: np.ndarray
    mask: np.ndarray
    propensity: float
    num_judge_malformed: int
    policy: "JudgeOrder"

    @property
    def human_mask(self) -> np.ndarray:
        return self.mask

    @property
    def num_human_labelled(self) -> int:
        return int(self.mask.sum())

    def item(self, index: int) -> dict:
        """``human_label``, ``synthetic_label``, ``propensity`` (float), ``human_mask``, ``swap`` (bool)."""
        return {
            "human_label": float(self.human_label[index]),
            "synthetic_label": float(self.synthetic_label[index]),
            "human_mask": bool(self.mask[index]),
            "propensity": float(self.propensity),
            "swap": bool(self.swap[index]),  # the judge's order; flips touch the human label only
        }

    def summary(self) -> dict:
        return {"judge_malformed": self.num_judge_malformed, "human_labelled": self.num_human_labelled}

    def log(self, num_pairs: int) -> None:
        logger.info(
            "DeDPO mode: pairs ordered by the judge (%s); %d of %d pairs keep their human label "
            "(human_fraction=%g, human_seed=%d, propensity=%.6g); %d rows with a malformed judge value skipped",
            self.policy.judge_column,
            self.num_human_labelled,
            num_pairs,
            self.policy.human_fraction,
            self.policy.human_seed,
            self.propensity,
            self.num_judge_malformed,
        )

    def judge_agreement(self) -> Dict[str, float]:
        """How far the judge is from the humans on the human-labelled pairs.

        Over the ``m`` pairs with ``human_mask``, with ``p`` = ``synthetic_label`` and ``y`` =
        ``human_label`` as served (flips included: the labels the loss sees):
        ``{"num_labelled": m, "accuracy": mean of 1 where the judge's preferred image is the
        human's (p > 0.5 and y = 1, or p < 0.5 and y = 0), 0.5 where p == 0.5, else 0,
        "mean_abs_error": mean |p - y|}``; the two means are NaN when ``m == 0``.
        """
        p = self.synthetic_label[self.mask]
        y = self.human_label[self.mask]
        if len(p) == 0:
            return {"num_labelled": 0, "accuracy": float("nan"), "mean_abs_error": float("nan")}
        correct = np.where(p == 0.5, 0.5, ((p > 0.5) == (y == 1.0)).astype(np.float64))
        return {
            "num_labelled": int(len(p)),
            "accuracy": float(correct.mean()),
            "mean_abs_error": float(np.abs(p - y).mean()),
        }


class LabelPolicy:
    """What a label policy provides; :class:`HumanOrder` and :class:`JudgeOrder` are the two the
    trainer uses. ``label`` arrays are the human ``label_0`` values (float64, in {0, 0.5, 1})."""

    synthetic_labels: bool = False  # whether items carry a judge's label (DeDPO mode)
    human_fraction: Optional[float] = None
    keep_ties: bool = False
    columns: Tuple[str, ...] = ()  # the columns read beside the caption, the images and label_0

    def check_columns(self, names: Sequence[str]) -> None:
        """``ValueError`` when a column of :attr:`columns` is not among ``names``."""

    def usable(self, values: Dict[str, np.ndarray], num_rows: int) -> np.ndarray:
        """``[num_rows]`` bool: the rows whose :attr:`columns` values (float64, NaN where not a
        number) this policy can use; the others are malformed."""
        return np.ones(num_rows, dtype=bool)

    def served(self, label: np.ndarray) -> np.ndarray:
        """Bool, per valid row: whether its pair is served (ties are dropped unless kept)."""
        return np.ones(len(label), dtype=bool) if self.keep_ties else label != 0.5

    def assign(
        self, label: np.ndarray, values: Dict[str, np.ndarray], flip_rate: float, flip_seed: int, num_unusable: int
    ) -> PairLabels:
        """The :class:`PairLabels` of the served pairs (``label`` and ``values`` ``[n]``, in item
        order), with label flips at ``flip_rate`` drawn from ``flip_seed``; ``num_unusable`` rows
        were dropped by :meth:`usable`."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class HumanOrder(LabelPolicy):
    """The human order: the human's winner first (``jpg_1`` first when ``label_0 == 0``); ties
    dropped unless ``keep_ties`` (a kept tie keeps the stored order, ``human_label`` 0.5); label
    flips swap the images of ``round(flip_rate * n)`` of the ``n`` non-tie pairs."""

    keep_ties: bool = False

    def assign(self, label, values, flip_rate, flip_seed, num_unusable) -> PairLabels:
        tie = label == 0.5
        flipped = choose_flips(len(label), np.flatnonzero(~tie), flip_rate, flip_seed)
        return PairLabels(
            # stored jpg_1 goes first when it is the winner, or when a pair is flipped
            swap=(label == 0.0) != flipped,
            flipped=flipped,
            human_label=np.where(tie, 0.5, np.where(flipped, 0.0, 1.0)),
        )


@dataclasses.dataclass(frozen=True)
class JudgeOrder(LabelPolicy):
    """The judge order (DeDPO): the judge's column (``judge_column``, its probability ``p`` that
    ``jpg_0`` is preferred) orders every pair, ``jpg_0`` first when ``p >= 0.5``; a seeded
    ``max(1, round(human_fraction * n))`` of the ``n`` pairs keep their human label
    (``human_seed``); label flips invert the human label of ``round(flip_rate * m)`` of those
    ``m``; ties are always dropped; a missing, NaN or out-of-range ``p`` makes the row malformed.
    """

    human_fraction: float = 1.0
    human_seed: int = 0
    judge_column: str = JUDGE
    synthetic_labels = True

    def __post_init__(self):
        _check_fraction(self.human_fraction)
        _check_seed(self.human_seed)
        object.__setattr__(self, "human_fraction", float(self.human_fraction))
        object.__setattr__(self, "human_seed", int(self.human_seed))

    @property
    def columns(self) -> Tuple[str, ...]:
        return (self.judge_column,)

    def check_columns(self, names):
        if self.judge_column not in names:
            raise ValueError(
                f"the dataset has no column {self.judge_column!r} (has {names}); synthetic_labels=True (--loss_type "
                "dedpo) reads the judge's column"
            )

    def usable(self, values, num_rows):
        judge = values[self.judge_column]
        return (judge >= 0.0) & (judge <= 1.0)  # NaN fails both comparisons

    def assign(self, label, values, flip_rate, flip_seed, num_unusable) -> JudgedLabels:
        judge = values[self.judge_column]
        n = len(label)
        # The judge orders every pair (jpg_1 first when it prefers jpg_1), so that the order of
        # an unlabelled pair says nothing about its hidden human label.
        swap = judge < 0.5
        n_human = max(1, round_half_up(self.human_fraction * n)) if n else 0
        mask = np.zeros(n, dtype=bool)
        if n_human:
            mask[np.random.default_rng([self.human_seed, _HUMAN_STREAM]).permutation(n)[:n_human]] = True
        flipped = choose_flips(n, np.flatnonzero(mask), flip_rate, flip_seed)  # human labels only
        # Both labels relative to the served order: p (or 1 - p) that the first image wins.
        human = np.where(swap, 1.0 - label, label)
        human = np.where(flipped, 1.0 - human, human)
        return JudgedLabels(
            swap=swap,
            flipped=flipped,
            human_label=np.where(mask, human, np.nan),
            synthetic_label=np.where(swap, 1.0 - judge, judge),
            mask=mask,
            propensity=n_human / n if n else self.human_fraction,
            num_judge_malformed=num_unusable,
            policy=self,
        )


def _check_fraction(human_fraction) -> None:
    if (
        isinstance(human_fraction, bool)
        or not isinstance(human_fraction, (int, float))
        or not 0.0 < human_fraction <= 1.0
    ):
        raise ValueError(f"human_fraction must be in (0, 1], got {human_fraction!r}")


def _check_seed(human_seed) -> None:
    if isinstance(human_seed, bool) or not isinstance(human_seed, (int, np.integer)):
        raise ValueError(f"human_seed must be an int, got {human_seed!r}")


def label_policy_for(
    synthetic_labels: bool, keep_ties: bool, human_fraction: Optional[float], human_seed: int, judge_column: str
) -> LabelPolicy:
    """The policy :class:`PreferenceDataset`'s keywords name: :class:`JudgeOrder` when
    ``synthetic_labels`` (``human_fraction=None`` is 1.0), else :class:`HumanOrder`;
    ``ValueError`` for a keyword the policy cannot take."""
    if human_fraction is not None and not synthetic_labels:
        raise ValueError(
            "human_fraction needs synthetic_labels=True (DeDPO mode): without a judge's label every pair keeps "
            "its human label"
        )
    if human_fraction is not None:
        _check_fraction(human_fraction)
    if synthetic_labels and keep_ties:
        raise ValueError(
            "keep_ties=True cannot be used with synthetic_labels=True: a tie (label_0 = 0.5) has no 0/1 human "
            "label, which the DeDPO estimator needs, so DeDPO mode always drops ties"
        )
    if not synthetic_labels:
        _check_seed(human_seed)
        return HumanOrder(keep_ties=bool(keep_ties))
    fraction = 1.0 if human_fraction is None else human_fraction
    return JudgeOrder(human_fraction=fraction, human_seed=human_seed, judge_column=judge_column)
