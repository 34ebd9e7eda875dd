"""Two small PNG charts drawn with PIL (no matplotlib needed): lines with error bars, and bars.

    line_chart(path, {"dpo": (xs, ys, errs), ...}, title=..., xlabel=..., ylabel=...)
    bar_chart(path, ["a", "b"], [0.1, 0.2], errs=[0.01, 0.02], title=..., ylabel=...)

Both write an RGB PNG of ``size`` pixels and return its path. Values must be finite; a ``None``
or NaN point is skipped. A dashed horizontal reference line (``hline``) is optional.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
MARGIN = (70, 40, 20, 50)  # left, top, right, bottom


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _ok(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _nice_ticks(low: float, high: float, count: int = 5) -> Sequence[float]:
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    for mult in (1, 2, 2.5, 5, 10):
        if raw <= mult * step:
            step *= mult
            break
    start = math.floor(low / step) * step
    ticks, t = [], start
    while t <= high + 1e-9 * step:
        if t >= low - 1e-9 * step:
            ticks.append(round(t, 10))
        t += step
    return ticks


class _Canvas:
    """Axes mapping data (x, y) into the plot area of a PIL image."""

    def __init__(self, size, xlim, ylim, title, xlabel, ylabel, right: int = MARGIN[2]):
        from PIL import Image, ImageDraw

        self.image = Image.new("RGB", size, "white")
        self.draw = ImageDraw.Draw(self.image)
        self.font, self.small = _font(14), _font(12)
        self.x0, self.y0 = MARGIN[0], MARGIN[1]
        self.x1, self.y1 = size[0] - right, size[1] - MARGIN[3]
        self.xlim, self.ylim = xlim, ylim
        self.draw.text((self.x0, 10), title, fill="black", font=self.font)
        self.draw.text(
            ((self.x0 + self.x1) // 2 - 4 * len(xlabel), self.y1 + 28), xlabel, fill="black", font=self.small
        )
        self.draw.text((6, self.y0 - 16), ylabel, fill="black", font=self.small)
        for t in _nice_ticks(*ylim):
            y = self.py(t)
            self.draw.line([self.x0 - 4, y, self.x0, y], fill="black")
            self.draw.line([self.x0 + 1, y, self.x1 - 1, y], fill="#eeeeee")
            self.draw.text((6, y - 7), f"{t:g}", fill="black", font=self.small)
        self.draw.rectangle([self.x0, self.y0, self.x1, self.y1], outline="black")

    def px(self, x: float) -> float:
        lo, hi = self.xlim
        return self.x0 + (x - lo) / (hi - lo) * (self.x1 - self.x0)

    def py(self, y: float) -> float:
        lo, hi = self.ylim
        return self.y1 - (y - lo) / (hi - lo) * (self.y1 - self.y0)

    def xtick(self, x: float, label: str) -> None:
        self.draw.line([self.px(x), self.y1, self.px(x), self.y1 + 4], fill="black")
        self.draw.text((self.px(x) - 3 * len(label), self.y1 + 8), label, fill="black", font=self.small)

    def hline(self, y: float, label: str) -> None:
        yy = self.py(y)
        for xs in range(int(self.x0), int(self.x1), 12):
            self.draw.line([xs, yy, min(xs + 6, self.x1), yy], fill="gray")
        self.draw.text((self.x1 - 8 * len(label) - 4, yy - 15), label, fill="gray", font=self.small)

    def legend(self, names: Sequence[str]) -> None:
        """To the right of the plot area."""
        x, y = self.x1 + 10, self.y0 + 6
        for i, name in enumerate(names):
            colour = PALETTE[i % len(PALETTE)]
            self.draw.line([x, y + 7, x + 18, y + 7], fill=colour, width=3)
            self.draw.text((x + 24, y), name, fill="black", font=self.small)
            y += 16


def _limits(values: Sequence[float], pad: float = 0.08) -> Tuple[float, float]:
    values = [v for v in values if _ok(v)]
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    span = hi - lo if hi > lo else max(abs(hi), 1.0) * 0.1
    return lo - pad * span, hi + pad * span


def line_chart(
    path,
    series: Dict[str, Tuple[Sequence[float], Sequence[float], Optional[Sequence[float]]]],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    xticks: Optional[Sequence[Tuple[float, str]]] = None,
    hline: Optional[Tuple[float, str]] = None,
    size=(820, 460),
) -> Path:
    """One line per series ``name -> (xs, ys, errs or None)`` with error bars of +- errs."""
    xs_all = [x for xs, _, _ in series.values() for x in xs]
    ys_all = []
    for _, ys, errs in series.values():
        for i, y in enumerate(ys):
            if _ok(y):
                e = errs[i] if errs is not None and _ok(errs[i]) else 0.0
                ys_all += [y - e, y + e]
    if hline is not None:
        ys_all.append(hline[0])
    xlim = (min(xs_all), max(xs_all)) if xs_all else (0.0, 1.0)
    if xlim[0] == xlim[1]:
        xlim = (xlim[0] - 1, xlim[1] + 1)
    span = xlim[1] - xlim[0]
    legend_width = 40 + 7 * max((len(name) for name in series), default=0)
    canvas = _Canvas(
        size, (xlim[0] - 0.05 * span, xlim[1] + 0.05 * span), _limits(ys_all), title, xlabel, ylabel, right=legend_width
    )
    for x, label in xticks if xticks is not None else [(x, f"{x:g}") for x in sorted(set(xs_all))]:
        canvas.xtick(x, label)
    if hline is not None:
        canvas.hline(*hline)
    for i, (name, (xs, ys, errs)) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        points = [(canvas.px(x), canvas.py(y)) for x, y in zip(xs, ys) if _ok(y)]
        if len(points) > 1:
            canvas.draw.line(points, fill=colour, width=2)
        for j, (x, y) in enumerate(zip(xs, ys)):
            if not _ok(y):
                continue
            cx, cy = canvas.px(x), canvas.py(y)
            if errs is not None and _ok(errs[j]) and errs[j] > 0:
                top, bottom = canvas.py(y + errs[j]), canvas.py(y - errs[j])
                canvas.draw.line([cx, top, cx, bottom], fill=colour, width=1)
                canvas.draw.line([cx - 4, top, cx + 4, top], fill=colour)
                canvas.draw.line([cx - 4, bottom, cx + 4, bottom], fill=colour)
            canvas.draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
    canvas.legend(list(series))
    path = Path(path)
    canvas.image.save(path)
    return path


def bar_chart(
    path,
    labels: Sequence[str],
    values: Sequence[float],
    *,
    errs: Optional[Sequence[float]] = None,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    hline: Optional[Tuple[float, str]] = None,
    size=(720, 460),
) -> Path:
    """One bar per label, from 0 or from the bottom of the axis when 0 is below it (the y range
    follows the values, so that small differences show)."""
    tops = [v + (errs[i] if errs is not None and _ok(errs[i]) else 0.0) for i, v in enumerate(values) if _ok(v)]
    lows = [v - (errs[i] if errs is not None and _ok(errs[i]) else 0.0) for i, v in enumerate(values) if _ok(v)]
    extra = [hline[0]] if hline is not None else []
    ylim = _limits(tops + lows + extra, pad=0.15)
    n = max(len(labels), 1)
    canvas = _Canvas(size, (0.0, float(n)), ylim, title, xlabel, ylabel)
    base = canvas.py(min(max(0.0, ylim[0]), ylim[1]))  # bars start at 0, or at the axis' bottom when 0 is below it
    for i, (label, v) in enumerate(zip(labels, values)):
        canvas.xtick(i + 0.5, label)
        if not _ok(v):
            continue
        colour = PALETTE[i % len(PALETTE)]
        left, right = canvas.px(i + 0.2), canvas.px(i + 0.8)
        y = canvas.py(v)
        canvas.draw.rectangle([left, min(y, base), right, max(y, base)], fill=colour)
        if errs is not None and _ok(errs[i]) and errs[i] > 0:
            cx = canvas.px(i + 0.5)
            canvas.draw.line([cx, canvas.py(v + errs[i]), cx, canvas.py(v - errs[i])], fill="black", width=1)
    if hline is not None:
        canvas.hline(*hline)
    path = Path(path)
    canvas.image.save(path)
    return path
