"""report.html: one training run on one self-contained page (no scripts, fonts or links
from elsewhere), written when training ends and by `python3 main.py --report`.

metrics.csv is the source of truth: the page draws its rows, with SVG line plots drawn
here (axes, ticks, labels, log scale, legend, resume points marked), and adds the run's
config (the keys that differ from config.CONFIG_V3 first), the final figures and the
interim and final samples.
"""

import html
import math
import os

import numpy as np

import config as config_module
from utils import UserError, atomic_output, bits_per_byte, read_log_columns

REPORT_FILENAME = "report.html"
SAMPLES_SHOWN = 20_000  # characters of each samples file shown (its end)
COLORS = ("#1f63b4", "#d2452a", "#2a9d3a", "#8a4fb8")
WIDTH, HEIGHT = 600, 340
MARGIN = {"left": 64, "right": 16, "top": 34, "bottom": 48}
# Points of a plotted line at most: a plot is about 520 pixels wide, so a line of more
# draws nothing new, and a page of a million-step run's every point is tens of MB.
MAX_LINE_POINTS = 2_000


# ---------------------------------------------------------------------------
# metrics.csv

# The columns of metrics.csv the page draws from; a file from an older version may lack one.
COLUMNS = ("step", "elapsed_seconds", "train_loss", "val_bits_per_byte", "learning_rate",
           "bytes_per_second", "scored_bytes", "split_bytes")


def read_metrics(path):
    """(table, unreadable) of metrics.csv: the table's COLUMNS as float arrays (NaN where
    a row has no value, or one that is not a finite number) and "event" as strings ("" in
    the rows of no event), and how many rows could not be read at all
    (utils.read_log_columns). Columns, not rows: a long run's file has a million rows."""
    cells, unreadable = read_log_columns(path)
    rows = len(next(iter(cells.values()), []))
    table = {name: _numbers(cells.get(name, [""] * rows)) for name in COLUMNS}
    table["event"] = np.array(cells.get("event", [""] * rows), dtype=str)
    return table, unreadable


def _numbers(cells):
    """Floats of a column's strings: NaN where a cell is empty, or not a finite number."""
    values = np.full(len(cells), np.nan)
    # Most cells of most columns are empty: only the others are parsed.
    filled = np.fromiter(map(bool, cells), bool, len(cells))
    try:
        values[filled] = np.fromiter(map(float, filter(None, cells)), np.float64)
    except ValueError:  # a garbled cell: parse one by one, so that it alone is left out
        values = np.array([_number(cell) for cell in cells], dtype=np.float64)  # None: NaN
    values[~np.isfinite(values)] = np.nan
    return values


def _number(text):
    try:
        return float(text) if text else None
    except ValueError:
        return None


def resume_points(table):
    """(step, elapsed seconds) of each resume: the event row's step, and the time of the
    last row logged before it (the event row itself carries no time)."""
    resume = table["event"] == "resume"
    seconds = table["elapsed_seconds"]
    timed = np.flatnonzero(np.isfinite(seconds) & ~resume)
    before = np.searchsorted(timed, np.flatnonzero(resume)) - 1  # the last timed row before
    return [(float(table["step"][row]), float(seconds[timed[k]]) if k >= 0 else 0.0)
            for row, k in zip(np.flatnonzero(resume), before)]


def _pairs(x, y):
    """(x, y) of two columns row by row, None where a row has no value."""
    return [(None if math.isnan(a) else a, None if math.isnan(b) else b)
            for a, b in zip(x.tolist(), y.tolist())]


# ---------------------------------------------------------------------------
# Axes

class Axis:
    """Values from `low` to `high` onto pixels from `start` to `end`, linear or log10;
    `ticks` are round values inside the range."""

    def __init__(self, values, start, end, log=False, include_zero=False):
        values = [v for v in values if v is not None and (v > 0 or not log)]
        low, high = (min(values), max(values)) if values else (1.0, 10.0)
        if include_zero and not log:
            low = min(low, 0.0)
        self.log, self.start, self.end = log, start, end
        if log:
            if high / low < 1.2:  # one value or nearly: widen so the line sits inside
                low, high = low / 1.1, high * 1.1
            pad = 0.04 * math.log10(high / low)  # keep the extreme points off the frame
            low, high = low / 10 ** pad, high * 10 ** pad
            self.ticks = _log_ticks(low, high)
            self.low, self.high = math.log10(low), math.log10(high)
        else:
            if high - low < 1e-12 * max(1.0, abs(high)):
                low, high = low - max(1.0, abs(low) * 0.1), high + max(1.0, abs(high) * 0.1)
            step = _nice_step((high - low) / 5)
            low, high = math.floor(low / step) * step, math.ceil(high / step) * step
            count = round((high - low) / step)
            self.ticks = [_tidy(low + i * step) for i in range(count + 1)]
            self.low, self.high = low, high

    def pixel(self, value):
        position = math.log10(value) if self.log else value
        return self.start + (position - self.low) / (self.high - self.low) * (self.end - self.start)

    def holds(self, value):
        return value is not None and (value > 0 or not self.log)


def _nice_step(rough):
    """The smallest of 1, 2, 5 x 10^k that is at least `rough`."""
    power = 10 ** math.floor(math.log10(rough))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= rough * (1 - 1e-9))


def _tidy(value):
    """A tick value without the float noise of repeated addition (0.30000000000000004)."""
    return float(f"{value:.12g}")


def _log_ticks(low, high):
    """Round values in [low, high]: powers of ten, or 1-2-5, or every digit, whichever
    first gives at least three ticks; a range too narrow for that gets linear ones."""
    for mantissas in ((1,), (1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [_tidy(m * 10.0 ** e)
                 for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
                 for m in mantissas if low <= m * 10.0 ** e <= high]
        if len(ticks) >= 3:
            return ticks
    step = _nice_step((high - low) / 8)  # a step at most 2.5x this: 3 ticks or more
    return [_tidy(k * step) for k in range(math.ceil(low / step), math.floor(high / step) + 1)]


def tick_label(value):
    """Short, readable: 0.003, 2.5, 250, 30k, 1.2M."""
    size = abs(value)
    if size >= 1e6:
        return f"{value / 1e6:.3g}M"
    if size >= 1e4:
        return f"{value / 1e3:.3g}k"
    return f"{value:.4g}"


def time_unit(seconds):
    """(name, seconds per unit) that keeps time ticks short."""
    if seconds > 3 * 3600:
        return "h", 3600.0
    if seconds > 300:
        return "min", 60.0
    return "s", 1.0


# ---------------------------------------------------------------------------
# Plots

def _esc(text):
    return html.escape(str(text), quote=True)


def line_plot(title, series, x_label, y_label, log_y=False, include_zero=False, marks=()):
    """An SVG plot. `series`: (name, [(x, y), ...], style) with style "line", "line+dots"
    or "dot"; `marks`: (x, label) drawn as dashed vertical lines (resume points)."""
    left, right = MARGIN["left"], WIDTH - MARGIN["right"]
    top, bottom = MARGIN["top"], HEIGHT - MARGIN["bottom"]
    xs = [x for _, points, _ in series for x, _ in points] + [x for x, _ in marks]
    x_axis = Axis(xs, left, right)
    y_axis = Axis([y for _, points, _ in series for _, y in points], bottom, top, log=log_y,
                  include_zero=include_zero)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{WIDTH}" '
             f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" data-title="{_esc(title)}">',
             f'<text class="title" x="{left}" y="20">{_esc(title)}</text>',
             f'<rect class="frame" x="{left}" y="{top}" width="{right - left}" '
             f'height="{bottom - top}"/>',
             _axis_svg(x_axis, "x", x_label, (top, bottom)),
             _axis_svg(y_axis, "y", y_label, (left, right))]
    for x, label in marks:
        px = x_axis.pixel(x)
        parts.append(f'<g class="mark" data-x="{x:g}"><line x1="{px:.2f}" y1="{top}" '
                     f'x2="{px:.2f}" y2="{bottom}"/><text x="{px + 3:.2f}" y="{bottom - 5}">'
                     f'{_esc(label)}</text></g>')
    for index, (name, points, style) in enumerate(series):
        points = [(x, y) for x, y in points if x is not None and y_axis.holds(y)]
        parts.append(_series_svg(name, points, style, COLORS[index % len(COLORS)],
                                 x_axis, y_axis))
    parts.append(_legend_svg(series, right))
    parts.append("</svg>")
    return "\n".join(parts)


def _axis_svg(axis, which, label, across):
    """Ticks, grid lines, tick labels and the axis label; every tick carries its value."""
    parts = [f'<g class="axis {which}-axis" data-log="{int(axis.log)}">']
    for value in axis.ticks:
        p = axis.pixel(value)
        if which == "x":
            line = f'x1="{p:.2f}" y1="{across[0]}" x2="{p:.2f}" y2="{across[1]}"'
            text = f'x="{p:.2f}" y="{across[1] + 16}" text-anchor="middle"'
        else:
            line = f'x1="{across[0]}" y1="{p:.2f}" x2="{across[1]}" y2="{p:.2f}"'
            text = f'x="{across[0] - 6}" y="{p + 4:.2f}" text-anchor="end"'
        parts.append(f'<g class="tick" data-value="{value!r}"><line {line}/>'
                     f'<text {text}>{tick_label(value)}</text></g>')
    if which == "x":
        place = f'x="{(axis.start + axis.end) / 2:.0f}" y="{HEIGHT - 10}" text-anchor="middle"'
    else:
        middle = (axis.start + axis.end) / 2
        place = (f'x="14" y="{middle:.0f}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {middle:.0f})"')
    parts.append(f'<text class="label" {place}>{_esc(label)}</text></g>')
    return "".join(parts)


def downsample(y, cap=MAX_LINE_POINTS):
    """Indices (ascending) of at most `cap` of the values `y` that draw the line they
    draw at a plot's width: the first, the last, and in each of (cap - 2) // 2 runs of
    consecutive values between them its lowest and its highest. A spike stays visible,
    which evenly spaced points would skip."""
    if len(y) <= cap:
        return np.arange(len(y))
    runs = (cap - 2) // 2
    run = np.arange(len(y) - 2) * runs // (len(y) - 2)  # of each inner value, nondecreasing
    by_height = np.lexsort((y[1:-1], run))  # run by run, lowest first
    firsts = np.searchsorted(run, np.arange(runs))
    lasts = np.append(firsts[1:], len(run)) - 1
    inner = np.unique(np.concatenate([by_height[firsts], by_height[lasts]])) + 1
    return np.concatenate([[0], inner, [len(y) - 1]])


def line_points(x, y, log=False):
    """The (x, y) points of a line from columns `x` and `y` (float arrays, NaN where a row
    has no value): the rows where both are finite (y > 0 on a log scale), downsampled."""
    keep = np.isfinite(x) & np.isfinite(y) & ((y > 0) if log else True)
    x, y = x[keep], y[keep]
    kept = downsample(y)
    return list(zip(x[kept].tolist(), y[kept].tolist()))


def _series_svg(name, points, style, color, x_axis, y_axis):
    pixels = [(x_axis.pixel(x), y_axis.pixel(y)) for x, y in points]
    parts = [f'<g class="series" data-name="{_esc(name)}" data-style="{style}">']
    if "line" in style and len(pixels) > 1:
        coordinates = " ".join(f"{px:.2f},{py:.2f}" for px, py in pixels)
        parts.append(f'<polyline points="{coordinates}" stroke="{color}"/>')
    if "dot" in style or len(pixels) == 1:
        radius = 4 if style == "dot" else 2.5
        parts += [f'<circle cx="{px:.2f}" cy="{py:.2f}" r="{radius}" fill="{color}"/>'
                  for px, py in pixels]
    parts.append("</g>")
    return "".join(parts)


def _legend_svg(series, right):
    """Top right, on a white box so that curves under it do not hide the names."""
    width = 34 + 6.2 * max(len(name) for name, _, _ in series)  # ~6.2 px per character
    x, top = right - width - 6, MARGIN["top"] + 6
    parts = ['<g class="legend">', f'<rect x="{x - 6:.0f}" y="{top - 2}" width="{width:.0f}" '
                                   f'height="{16 * len(series) + 4}"/>']
    for index, (name, _, style) in enumerate(series):
        color, y = COLORS[index % len(COLORS)], top + 12 + 16 * index
        symbol = (f'<circle cx="{x + 10}" cy="{y - 4}" r="4" fill="{color}"/>' if style == "dot"
                  else f'<line x1="{x}" y1="{y - 4}" x2="{x + 20}" y2="{y - 4}" '
                       f'stroke="{color}" stroke-width="2"/>')
        parts.append(f'{symbol}<text x="{x + 26}" y="{y}">{_esc(name)}</text>')
    parts.append("</g>")
    return "".join(parts)


def training_plots(table):
    """The four plots of a run: bits per byte by step and by time, learning rate and
    bytes per second, with every resume marked. Training lines are downsampled
    (line_points); validation points and resume marks are all drawn."""
    event, bits = table["event"], table["val_bits_per_byte"]
    validation = np.isfinite(bits) & (event == "")
    final = event == "final_validation"
    resumes = resume_points(table)
    unit, per_unit = time_unit(float(np.max(table["elapsed_seconds"], initial=0.0,
                                            where=np.isfinite(table["elapsed_seconds"]))))
    # The columns of the training rows only (a validation row has a learning rate too).
    train = np.isfinite(table["train_loss"])
    step, seconds, loss, rate, speed = (
        table[key][train] for key in ("step", "elapsed_seconds", "train_loss", "learning_rate",
                                      "bytes_per_second"))

    def bits_series(x, x_train):
        return [("training (mean since last row)",
                 line_points(x_train, bits_per_byte(loss), log=True), "line"),
                ("validation (sample)", _pairs(x[validation], bits[validation]), "line+dots"),
                ("final model, end of a run", _pairs(x[final], bits[final]), "dot")]
    return [
        line_plot("Bits per byte by step (log scale)", bits_series(table["step"], step),
                  "step", "bits per byte", log_y=True,
                  marks=[(s, "resume") for s, _ in resumes]),
        line_plot("Bits per byte by training time (log scale)",
                  bits_series(table["elapsed_seconds"] / per_unit, seconds / per_unit),
                  f"training time ({unit})", "bits per byte", log_y=True,
                  marks=[(t / per_unit, "resume") for _, t in resumes]),
        line_plot("Learning rate", [("learning rate", line_points(step, rate), "line")],
                  "step", "learning rate", marks=[(s, "resume") for s, _ in resumes]),
        line_plot("Training throughput", [("bytes per second", line_points(step, speed), "line")],
                  "step", "bytes per second", include_zero=True,
                  marks=[(s, "resume") for s, _ in resumes]),
    ]


# ---------------------------------------------------------------------------
# The page

def final_figures(table):
    """(what, value) pairs of the run's outcome, read from metrics.csv."""
    step, seconds, bits = table["step"], table["elapsed_seconds"], table["val_bits_per_byte"]
    train = np.flatnonzero(np.isfinite(table["train_loss"]))
    validation = np.flatnonzero(np.isfinite(bits) & (table["event"] == ""))
    final = np.flatnonzero(table["event"] == "final_validation")
    times = seconds[np.isfinite(seconds)]
    figures = [("steps", f"{step.max():,.0f}" if len(step) else "none"),
               ("training time", f"{times.max() / 60:.1f} min" if len(times) else "unknown")]
    if len(train):
        last = train[-1]
        figures.append(("last training loss",
                        f"{bits_per_byte(table['train_loss'][last]):.4f} bits/byte "
                        f"(step {step[last]:,.0f})"))
        rates = table["bytes_per_second"][train]
        rates = rates[np.isfinite(rates) & (rates != 0)]
        if len(rates):
            figures.append(("throughput (median)", f"{np.median(rates):,.0f} bytes/s"))
    if len(validation):
        best = validation[np.argmin(bits[validation])]  # the first of equal ones
        figures.append(("best validation (sample)", f"{bits[best]:.4f} bits/byte "
                                                    f"(step {step[best]:,.0f})"))
    if len(final):
        scored, split = table["scored_bytes"][final[-1]], table["split_bytes"][final[-1]]
        of = (f"{scored:,.0f} bytes of the {split:,.0f}-byte validation split"
              if np.isfinite([scored, split]).all() and scored and split
              else "validation split")  # older files: the whole split
        figures.append((f"final model, {of}", f"{bits[final[-1]]:.4f} bits/byte"))
    figures.append(("resumes", str(len(resume_points(table)))))
    return figures


def config_table(run_config):
    """Tables key | this run | default: the keys that differ from CONFIG_V3, then the
    others folded away."""
    defaults = config_module.CONFIG_V3
    differ = [k for k in run_config if k not in defaults or run_config[k] != defaults[k]]
    same = [k for k in run_config if k not in differ]

    def table(keys):
        rows = "".join(f"<tr><td>{_esc(key)}</td><td>{_esc(repr(run_config[key]))}</td><td>"
                       f"{_esc(repr(defaults[key]) if key in defaults else '(not a key now)')}"
                       f"</td></tr>" for key in keys)
        return f"<table><tr><th>key</th><th>this run</th><th>default</th></tr>{rows}</table>"
    return (f'<p>{len(differ)} key(s) differ from the defaults in config.py:</p>'
            f'<div class="differs">{table(differ)}</div><details><summary>the other '
            f'{len(same)} keys (at their defaults)</summary>{table(same)}</details>')


def samples_section(title, path):
    if not os.path.isfile(path):
        return f"<h2>{_esc(title)}</h2><p>none ({_esc(os.path.basename(path))} not written)</p>"
    with open(path, encoding="utf-8", errors="replace") as file:
        text = file.read()
    note = ""
    if len(text) > SAMPLES_SHOWN:
        text, note = text[-SAMPLES_SHOWN:], f" (its last {SAMPLES_SHOWN:,} characters)"
    return (f"<h2>{_esc(title)}</h2><p>from {_esc(path)}{note}</p>"
            f"<pre>{_esc(text)}</pre>")


STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1260px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
svg.plot { background: #fff; border: 1px solid #ddd; font-size: 11px; }
svg .title { font-size: 13px; font-weight: bold; }
svg .frame { fill: none; stroke: #888; }
svg .tick line { stroke: #e4e4e4; }
svg .label { font-size: 12px; }
svg .mark line { stroke: #555; stroke-dasharray: 5 4; }
svg .mark text { fill: #555; }
svg polyline { fill: none; stroke-width: 1.6; }
svg .legend text { font-size: 11px; }
svg .legend rect { fill: #fff; fill-opacity: 0.85; stroke: #ccc; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
.differs td { background: #fff4cc; }
summary { margin: 10px 0; cursor: pointer; }
pre { background: #f6f6f6; padding: 10px; white-space: pre-wrap; font-size: 12px; }
"""


def write_report(run_config, log=print):
    """Write checkpoint_dir/report.html from checkpoint_dir/metrics.csv; return its path.
    Rows of metrics.csv that cannot be read are left out, and counted (`log`, the page)."""
    folder = run_config["checkpoint_dir"]
    metrics = os.path.join(folder, "metrics.csv")
    if not os.path.isfile(metrics):
        raise UserError(f"no {metrics} to report on: train first (the report draws its rows)")
    table, unreadable = read_metrics(metrics)
    left_out = (f"; {unreadable} unreadable row(s) (garbled, or half-written by a killed "
                f"run) left out" if unreadable else "")
    if unreadable:
        log(f"note: {metrics}{left_out}")
    figures = "".join(f"<tr><td>{_esc(what)}</td><td>{_esc(value)}</td></tr>"
                      for what, value in final_figures(table))
    page = "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>GrugV3 training report: {_esc(folder)}</title><style>{STYLE}</style></head>",
        f"<body><h1>GrugV3 training report</h1><p>{_esc(metrics)}, {len(table['step'])} rows"
        f"{_esc(left_out)}. Bits "
        f"per byte = nats / ln 2; 8 is a uniform guess over the 256 bytes.</p>",
        f"<h2>Final figures</h2><table>{figures}</table>",
        '<h2>Curves</h2><div class="plots">', *training_plots(table), "</div>",
        "<h2>Config</h2>", config_table(run_config),
        samples_section("Interim samples", os.path.join(folder, "interim_samples.txt")),
        samples_section("Final samples", os.path.join(
            folder, run_config.get("generation_output_file", "generated_samples.txt"))),
        "</body></html>"])
    path = os.path.join(folder, REPORT_FILENAME)
    with atomic_output(path) as file:
        file.write(page.encode("utf-8"))
    return path
