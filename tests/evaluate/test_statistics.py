"""The evaluation's statistics against a hand-computed example (3 prompts x 2 seeds)."""

import numpy as np
import pytest

from fastpref.evaluate.statistics import compare, wins

BASE = [[1.0, 2.0], [3.0, 3.0], [0.0, 1.0]]
TUNED = [[2.0, 2.0], [4.0, 2.0], [1.0, 1.0]]
T_975_DF2 = 4.302653  # Student's t, 97.5 % quantile, 2 degrees of freedom


def test_means_differences_and_win_rates_match_the_hand_computed_example():
    result = compare({"base": BASE, "tuned": TUNED}, base="base")
    # Per-prompt means: base 1.5, 3, 0.5; tuned 2, 3, 1.
    assert result["base"]["mean"]["mean"] == pytest.approx(5 / 3)
    assert "win_rate" not in result["base"]
    # Differences 0.5, 0, 0.5: mean 1/3, sample std sqrt(1/12), half-width t * std / sqrt(3).
    half = T_975_DF2 * (1 / 12) ** 0.5 / 3**0.5
    difference = result["tuned"]["difference"]
    assert difference["mean"] == pytest.approx(1 / 3)
    assert (difference["low"], difference["high"]) == pytest.approx((1 / 3 - half, 1 / 3 + half), abs=1e-5)
    assert difference["n"] == 3
    # Wins per seed: prompt 0 (win, tie) = 0.75; prompt 1 (win, loss) = 0.5; prompt 2 (win, tie) = 0.75.
    half = T_975_DF2 * (1 / 48) ** 0.5 / 3**0.5
    win = result["tuned"]["win_rate"]
    assert win["mean"] == pytest.approx(2 / 3)
    assert win["low"] == pytest.approx(2 / 3 - half, abs=1e-5)
    assert win["high"] == 1.0  # 2/3 + 0.3586 clipped to 1


def test_ties_count_one_half_and_shapes_must_pair():
    assert wins(np.array([[1.0, 1.0, 0.0]]), np.array([[0.0, 1.0, 1.0]])).tolist() == [[1.0, 0.5, 0.0]]
    with pytest.raises(ValueError, match="tuned: scores .* do not pair"):
        compare({"base": BASE, "tuned": [[1.0], [2.0], [3.0]]}, base="base")
    with pytest.raises(ValueError, match="base model 'base' has no scores"):
        compare({"tuned": TUNED}, base="base")
