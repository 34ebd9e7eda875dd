"""``fastpref.testing.toy_data`` and ``fastpref make-toy-data``: generated Pick-a-Pic v2 pairs
(ties, corrupt rows, the seeded biased judge)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

pytest.importorskip("pyarrow")

import pyarrow.parquet as pq  # noqa: E402
from offline import CORRUPT, PAIRS, RES, TIES  # noqa: E402

from fastpref.testing.toy_data import JUDGE_COLUMN, judge_probabilities, make_rows  # noqa: E402


def test_toy_data_schema_and_content(toy):
    from PIL import Image

    table = pq.read_table(toy)
    assert {"caption", "jpg_0", "jpg_1", "label_0"} <= set(table.column_names)
    assert table.num_rows == PAIRS
    labels = table.column("label_0").to_pylist()
    assert labels.count(0.5) == TIES and {0.0, 1.0} <= set(labels) <= {0.0, 0.5, 1.0}
    bad = 0
    for row in range(PAIRS):
        for col in ("jpg_0", "jpg_1"):
            try:
                assert Image.open(io.BytesIO(table.column(col)[row].as_py())).convert("RGB").size == (RES, RES)
            except (OSError, SyntaxError):
                bad += 1
    assert bad == CORRUPT
    # Same seed, same rows; another seed, other rows.
    assert make_rows(6, seed=3) == make_rows(6, seed=3)
    assert make_rows(6, seed=3)["caption"] != make_rows(6, seed=4)["caption"]


def test_toy_judge_is_seeded_biased_and_leaves_rows_alone(toy, toy_judge):
    plain, judged = pq.read_table(toy), pq.read_table(toy_judge)
    assert judged.column_names == plain.column_names + [JUDGE_COLUMN]
    assert judged.select(plain.column_names).equals(plain)  # the judge draws from its own stream
    p = np.asarray(judged.column(JUDGE_COLUMN).to_pylist())
    assert p.dtype == np.float64 and ((p >= 0) & (p <= 1)).all()
    rows = make_rows(300, resolution=8, seed=5, judge=True)
    assert rows == make_rows(300, resolution=8, seed=5, judge=True)
    assert rows[JUDGE_COLUMN] != make_rows(300, resolution=8, seed=6, judge=True)[JUDGE_COLUMN]
    p, label = np.asarray(rows[JUDGE_COLUMN]), np.asarray(rows["label_0"])
    right = (p > 0.5) == (label == 1.0)
    red = np.asarray([caption.startswith("a red ") for caption in rows["caption"]])
    assert 20 < red.sum() < 80
    assert right[~red].mean() > 0.75 and right[red].mean() < 0.3  # Phi(1) ~ 0.84 off red, ~ 0.16 on red
    # Without noise the judge is exactly right off the bias color and exactly wrong on it.
    exact = judge_probabilities(
        [True, False, True, None], ["blue", "blue", "red", "red"], bias_color="red", strength=2.0, noise=0.0
    )
    sig = 1 / (1 + math.exp(-2.0))
    assert exact == pytest.approx([sig, 1 - sig, 1 - sig, 0.5], abs=1e-15)
    with pytest.raises(ValueError, match="judge_bias_color"):
        make_rows(3, resolution=8, judge=True, judge_bias_color="mauve")
    with pytest.raises(ValueError, match="judge_noise"):
        make_rows(3, resolution=8, judge=True, judge_noise=-1.0)
