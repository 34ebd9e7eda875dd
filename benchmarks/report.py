"""What the benchmark scripts' reports share: markdown tables, the device's slug in file names,
and the JSON file of a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from fastpref.files import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"  # wherever the script is run from


def markdown(rows: List[dict], columns: List[str], formats: Dict[str, str]) -> str:
    """A markdown table of ``rows``: one column per key in ``columns``, each cell formatted by
    ``formats[column]`` (``str`` by default), ``-`` where the value is None."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = ["-" if row[c] is None else formats.get(c, "{}").format(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def slug(text: str) -> str:
    """``text`` (a device's name) as a file-name part: lower case, ``-`` for every other character
    than a letter or digit, at most 60 characters."""
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()[:60]


def result_path(stem: str, quick: bool) -> Path:
    """``benchmarks/results/[quick-]<stem>.json``: where a run's JSON goes by default."""
    return RESULTS / f"{'quick-' if quick else ''}{stem}.json"


def write_json(path: Path, report: dict) -> None:
    """``report`` as indented JSON (keys in their order) at ``path``, written atomically; the
    folders above it are made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(report, indent=1))
