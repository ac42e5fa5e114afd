"""A dependency-free SVG writer: round axis ticks and a labelled scatter (the experiment's
memory against accuracy)."""
from __future__ import annotations

import math


def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round values between lo and hi (steps of 1, 2 or 5 times a power of ten)."""
    raw = (hi - lo) / max(n - 1, 1)
    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def _frame(width, height, box, title, title_x, title_y, x_ticks, y_ticks, x_label, y_label,
           label_gap, y_label_x) -> list[str]:
    """The opening of a plot: white page, title, grid lines at the ticks [(pixel, text)],
    the two axes and their labels (the x label `label_gap` above the bottom edge, the
    rotated y label at x = y_label_x). box = (left, right, top, bottom) in pixels."""
    left, right, top, bottom = box
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{title_x}" y="{title_y}" text-anchor="middle">{title}</text>']
    for x, text in x_ticks:
        parts += [f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#ddd"/>',
                  f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">{text}</text>']
    for y, text in y_ticks:
        parts += [f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#ddd"/>',
                  f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{text}</text>']
    y_mid = (top + bottom) / 2
    parts += [f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>',
              f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="black"/>',
              f'<text x="{(left + right) / 2}" y="{height - label_gap}" text-anchor="middle">{x_label}</text>',
              f'<text x="{y_label_x}" y="{y_mid}" transform="rotate(-90 {y_label_x} {y_mid})" '
              f'text-anchor="middle">{y_label}</text>']
    return parts


def svg_scatter(points, baseline=None, title="", width=520, height=340) -> str:
    """A dependency-free SVG scatter of (name, peak MiB, mean accuracy %, std % or None):
    one labelled point per method, ± std error bars where there are seeds to give one, and
    a dashed line at the zero-shot accuracy (no training, so no training memory)."""
    xs = [p[1] for p in points]
    ys = [p[2] + sign * (p[3] or 0) for p in points for sign in (-1, 1)]
    ys += [] if baseline is None else [baseline]
    x0, x1 = min(xs) * 0.95, max(xs) * 1.05 + 1
    y0, y1 = min(ys) - 1, max(ys) + 1
    left, right, top, bottom = 64, width - 24, 40, height - 44
    X = lambda x: left + (x - x0) / (x1 - x0) * (right - left)
    Y = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)
    parts = _frame(width, height, (left, right, top, bottom), title, width / 2, 20,
                   [(X(t), f"{t:g}") for t in ticks(x0, x1)], [(Y(t), f"{t:g}") for t in ticks(y0, y1)],
                   "peak training memory (ledger, MiB)", "mean accuracy (%)", label_gap=8, y_label_x=16)
    if baseline is not None:
        parts += [f'<line x1="{left}" y1="{Y(baseline):.1f}" x2="{right}" y2="{Y(baseline):.1f}" '
                  f'stroke="#999" stroke-dasharray="6 4"/>',
                  f'<text x="{right - 4}" y="{Y(baseline) - 5:.1f}" text-anchor="end" fill="#666">'
                  f'zero-shot {baseline:.1f}</text>']
    for name, x, y, std in points:
        if std:
            parts.append(f'<line x1="{X(x):.1f}" y1="{Y(y - std):.1f}" x2="{X(x):.1f}" '
                         f'y2="{Y(y + std):.1f}" stroke="#3366cc"/>')
        parts += [f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="5" fill="#3366cc"/>',
                  f'<text x="{X(x) + 8:.1f}" y="{Y(y) + 4:.1f}">{name}</text>']
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


COLOURS = ("#3366cc", "#dc3912", "#ff9900", "#109618", "#990099", "#0099c6", "#dd4477",
           "#66aa00", "#b82e2e", "#316395")


def svg_curves(series, title="", x_label="sequence length T (tokens)",
               y_label="peak memory (MiB)", width=640, height=400) -> str:
    """Lines and points against a base-2 log x axis (sequence lengths): series is a list
    of (label, line [(x, y)], points [(x, y)]): the line is the prediction, the points what
    was measured (either may be empty). One colour per series, a legend at the right."""
    xs = [x for _, line, pts in series for x, _ in line + pts]
    ys = [y for _, line, pts in series for _, y in line + pts]
    lx0, lx1 = math.log2(min(xs)), math.log2(max(xs))
    lx1 = lx1 if lx1 > lx0 else lx0 + 1
    y0, y1 = 0.0, max(ys) * 1.08
    left, right, top, bottom = 70, width - 190, 40, height - 50
    X = lambda x: left + (math.log2(x) - lx0) / (lx1 - lx0) * (right - left)
    Y = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)
    parts = _frame(width, height, (left, right, top, bottom), title, (left + right) / 2, 22,
                   [(X(2 ** e), str(2 ** e)) for e in range(math.ceil(lx0), math.floor(lx1) + 1)],
                   [(Y(t), f"{t:g}") for t in ticks(y0, y1)], x_label, y_label, label_gap=12, y_label_x=18)
    for k, (label, line, pts) in enumerate(series):
        colour = COLOURS[k % len(COLOURS)]
        if line:
            path = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in sorted(line))
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="4" fill="white" stroke="{colour}" '
                  f'stroke-width="2"/>' for x, y in pts]
        ly = top + 8 + 18 * k
        parts += [f'<line x1="{right + 14}" y1="{ly}" x2="{right + 36}" y2="{ly}" stroke="{colour}" stroke-width="2"/>',
                  f'<text x="{right + 42}" y="{ly + 4}">{label}</text>']
    note_y = top + 8 + 18 * len(series) + 10
    parts += [f'<text x="{right + 14}" y="{note_y}" fill="#666">lines: planned</text>',
              f'<text x="{right + 14}" y="{note_y + 16}" fill="#666">circles: measured</text>',
              "</svg>"]
    return "\n".join(parts) + "\n"
