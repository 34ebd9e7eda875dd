"""The data layer's logger (``fastpref.train.data``) and the form of the row lists in its lines."""

from __future__ import annotations

import logging
from typing import Sequence

logger = logging.getLogger("fastpref.train.data")


def format_rows(rows: Sequence[int], n: int = 20) -> str:
    """The first ``n`` of ``rows`` as a list, for log lines (with the count when cut)."""
    rows = list(rows)
    return str(rows[:n])[:-1] + (f", ... ({len(rows)} in all)]" if len(rows) > n else "]")
