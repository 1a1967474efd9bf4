"""report.html: the plotted points are metrics.csv's values (read back through the axes'
ticks), resumes are marked, the page is self-contained, and it renders in a browser."""

import csv
import io
import math
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ElementTree

import pytest

import main as main_module
from config import CONFIG_V3
from report import MAX_LINE_POINTS, Axis, tick_label, write_report
from tests.conftest import make_tiny_config
from trainer import METRICS_COLUMNS
from utils import UserError, read_log_columns, read_log_rows

SVG = "{http://www.w3.org/2000/svg}"


def plots_of(html):
    """{title: parsed <svg>} of every plot in the page."""
    plots = {}
    for match in re.finditer(r"<svg .*?</svg>", html, re.S):
        svg = ElementTree.fromstring(match.group(0))
        plots[svg.get("data-title")] = svg
    return plots


def axis_of(svg, which):
    """value -> pixel inverted: the axis' ticks give its scale (linear or log10)."""
    group = next(g for g in svg.iter(f"{SVG}g") if f"{which}-axis" in g.get("class", ""))
    log = group.get("data-log") == "1"
    ticks = []
    for tick in group.findall(f"{SVG}g"):
        line = tick.find(f"{SVG}line")
        pixel = float(line.get("x1" if which == "x" else "y1"))
        ticks.append((float(tick.get("data-value")), pixel))
    (v0, p0), (v1, p1) = ticks[0], ticks[-1]
    scale = math.log10 if log else (lambda v: v)

    def value(pixel):
        position = scale(v0) + (pixel - p0) * (scale(v1) - scale(v0)) / (p1 - p0)
        return 10 ** position if log else position
    value.pixel = lambda v: p0 + (scale(v) - scale(v0)) * (p1 - p0) / (scale(v1) - scale(v0))
    label = group.find(f"{SVG}text[@class='label']").text
    return value, label


def plotted(svg, series_name):
    """The (x, y) data values of one series, read back from its pixels."""
    x_value, _ = axis_of(svg, "x")
    y_value, _ = axis_of(svg, "y")
    group = next(g for g in svg.iter(f"{SVG}g") if g.get("data-name") == series_name)
    line = group.find(f"{SVG}polyline")
    if line is not None:
        pairs = [pair.split(",") for pair in line.get("points").split()]
    else:
        pairs = [(c.get("cx"), c.get("cy")) for c in group.iter(f"{SVG}circle")]
    return [(x_value(float(px)), y_value(float(py))) for px, py in pairs]


def marks(svg):
    return [float(g.get("data-x")) for g in svg.iter(f"{SVG}g") if g.get("class") == "mark"]


def read_rows(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def check_plots_match_metrics(html, metrics_path):
    """Every plotted series equals its column of metrics.csv (within a pixel's rounding)."""
    rows = read_rows(metrics_path)
    plots = plots_of(html)
    train = [r for r in rows if r["train_loss"]]
    validation = [r for r in rows if r["val_bits_per_byte"] and not r["event"]]
    expected = {
        ("Bits per byte by step (log scale)", "training (mean since last row)"):
            [(float(r["step"]), float(r["train_loss"]) / math.log(2)) for r in train],
        ("Bits per byte by step (log scale)", "validation (sample)"):
            [(float(r["step"]), float(r["val_bits_per_byte"])) for r in validation],
        ("Learning rate", "learning rate"):
            [(float(r["step"]), float(r["learning_rate"])) for r in train],
        ("Training throughput", "bytes per second"):
            [(float(r["step"]), float(r["bytes_per_second"])) for r in train],
    }
    for (title, name), points in expected.items():
        got = plotted(plots[title], name)
        assert len(got) == len(points), (title, name)
        # Pixels (points and ticks) are written with 2 decimals: compare where they are
        # drawn, to a fiftieth of a pixel, since a value far below the axis' range (a slow
        # step among fast ones) loses more than 1e-3 of itself to that rounding.
        y_pixel = axis_of(plots[title], "y")[0].pixel
        for (x, y), (gx, gy) in zip(points, got):
            assert gx == pytest.approx(x, rel=1e-3, abs=1e-3), (title, name)
            assert y_pixel(gy) == pytest.approx(y_pixel(y), abs=0.02), (title, name, y, gy)
    time_plot = plots["Bits per byte by training time (log scale)"]
    unit = {"(s)": 1, "(min)": 60, "(h)": 3600}[axis_of(time_plot, "x")[1].split()[-1]]
    got = plotted(time_plot, "validation (sample)")
    for row, (gx, gy) in zip(validation, got):
        assert gx == pytest.approx(float(row["elapsed_seconds"]) / unit, rel=1e-3, abs=1e-3)
    return plots


def write_metrics(folder, rows):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.csv"), "w", newline="") as file:
        writer = csv.DictWriter(file, METRICS_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)


def a_resumed_run():
    """metrics.csv rows of a run stopped at step 40 and resumed, over 20 minutes."""
    rows = []
    for step in range(10, 81, 10):
        loss = 5.5 * math.exp(-step / 40) + 1.2
        rows.append({"step": step, "epoch": 1, "train_loss": loss,
                     "learning_rate": 3e-3 * min(1, step / 20), "bytes_per_second": 25_000 + step,
                     "elapsed_seconds": step * 15.0})
        if step % 20 == 0:
            rows.append({"step": step, "epoch": 1, "val_loss": loss + 0.1,
                         "val_bits_per_byte": (loss + 0.1) / math.log(2),
                         "learning_rate": 3e-3, "elapsed_seconds": step * 15.0 + 1})
        if step == 40:
            rows.append({"step": 40, "event": "resume"})
    rows.append({"step": 80, "val_loss": 2.0, "val_bits_per_byte": 2.0 / math.log(2),
                 "elapsed_seconds": 1205.0, "event": "final_validation",
                 "scored_bytes": 200_000, "split_bytes": 30_000_000})
    return rows


def test_plotted_points_are_the_values_of_metrics_csv(tmp_path):
    config = make_tiny_config(str(tmp_path))
    write_metrics(config["checkpoint_dir"], a_resumed_run())
    path = write_report(config)
    with open(path, encoding="utf-8") as file:
        html = file.read()
    plots = check_plots_match_metrics(html, f"{config['checkpoint_dir']}/metrics.csv")
    assert len(plots) == 4
    # The run was resumed at step 40, logged last at 601 s: marked on every plot.
    assert marks(plots["Bits per byte by step (log scale)"]) == [40]
    assert marks(plots["Learning rate"]) == [40]
    assert marks(plots["Bits per byte by training time (log scale)"]) == [
        pytest.approx(601 / 60, abs=1e-3)]  # in minutes, as the axis says
    final = plotted(plots["Bits per byte by step (log scale)"],
                    "final model, end of a run")
    assert final == [(pytest.approx(80, abs=0.01), pytest.approx(2 / math.log(2), rel=1e-3))]
    assert "<td>final model, 200,000 bytes of the 30,000,000-byte validation split</td>" \
        "<td>2.8854 bits/byte</td>" in html  # the final figure, in the table too
    assert "<td>resumes</td><td>1</td>" in html


def write_a_million_step_run(folder, spike_at=123_457):
    """metrics.csv of a 10^6-step run: a training row every step (a loss spike at
    `spike_at`), a validation every 1,000 steps, a resume at step 500,000 and the final
    validation; written as text, which is fast."""
    os.makedirs(folder, exist_ok=True)
    lines = [",".join(METRICS_COLUMNS)]
    for step in range(1, 1_000_001):
        loss = 9.0 if step == spike_at else 1.0 + 4.0 / (1 + step / 1000)
        lines.append(f"{step},1,{loss:.6g},,,0.003,25000,{step * 0.1:.6g},,,")
        if step % 1000 == 0:
            lines.append(f"{step},1,,{loss:.6g},{loss / math.log(2):.6g},0.003,,"
                         f"{step * 0.1 + 0.05:.6g},,,")
        if step == 500_000:
            lines.append(f"{step},,,,,,,,resume,,")
    lines.append(f"1000000,,,1.5,2.16404,,,100001,final_validation,200000,30000000")
    with open(os.path.join(folder, "metrics.csv"), "w", newline="") as file:
        file.write("\r\n".join(lines) + "\r\n")  # csv.writer's line ends, as the trainer's


def test_a_million_step_run_gives_a_small_page_of_downsampled_lines(tmp_path):
    config = make_tiny_config(str(tmp_path))
    write_a_million_step_run(config["checkpoint_dir"])
    path = write_report(config)
    assert os.path.getsize(path) <= 2_000_000
    with open(path, encoding="utf-8") as file:
        plots = plots_of(file.read())
    for svg in plots.values():
        for line in svg.iter(f"{SVG}polyline"):
            assert len(line.get("points").split()) <= MAX_LINE_POINTS
    by_step = plots["Bits per byte by step (log scale)"]
    training = plotted(by_step, "training (mean since last row)")
    assert training[-1][0] == pytest.approx(1_000_000, rel=1e-3)  # the last point is drawn
    assert max(training, key=lambda point: point[1])[0] == pytest.approx(123_457, rel=1e-3)
    assert max(y for _, y in training) == pytest.approx(9.0 / math.log(2), rel=1e-3)
    validation = plotted(by_step, "validation (sample)")
    assert [round(x, -3) for x, _ in validation] == list(range(1000, 1_000_001, 1000))
    assert marks(by_step) == [500_000]


def test_ticks_are_round_values_with_short_labels():
    for values, log in [([1.52, 7.9], True), ([2e-5, 3e-3], False), ([0, 31_500], False),
                        ([0.2, 1190.0], False), ([4.0, 4.0], True), ([5.0], False)]:
        axis = Axis(values, 0, 500, log=log)
        assert len(axis.ticks) >= 3 and axis.ticks == sorted(axis.ticks)
        low, high = (10 ** axis.low, 10 ** axis.high) if log else (axis.low, axis.high)
        assert low <= min(values) and max(values) <= high  # every point inside the frame
        for tick in axis.ticks:
            assert low <= tick <= high
            assert len(tick_label(tick)) <= 6, tick_label(tick)
            significant = f"{tick:.12g}".lstrip("-0.").replace(".", "").rstrip("0")
            assert len(significant) <= 2, tick  # 0.002, 30000, 1.5: round numbers
    assert tick_label(30_000) == "30k" and tick_label(0.003) == "0.003"


def test_the_page_is_self_contained_and_lists_changed_keys_first(tmp_path):
    config = make_tiny_config(str(tmp_path), learning_rate=1e-3)
    write_metrics(config["checkpoint_dir"], a_resumed_run())
    with open(f"{config['checkpoint_dir']}/interim_samples.txt", "w", encoding="utf-8") as file:
        file.write("=== step 10 ===\nThe <b>cat</b> & the 🐱\n")
    with open(write_report(config), encoding="utf-8") as file:
        html = file.read()
    without_namespace = html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    for outside in ("http:", "https:", "<script", "<link", "@import", "url(", "src="):
        assert outside not in without_namespace
    assert "The &lt;b&gt;cat&lt;/b&gt; &amp; the 🐱" in html  # samples shown as text
    changed = html[html.index('<div class="differs">'):html.index("<details>")]
    assert "learning_rate" in changed and "sequence_length" in changed
    assert "adam_beta1" not in changed and "adam_beta1" in html[html.index("<details>"):]
    assert "none (generated_samples.txt not written)" in html


def test_report_without_metrics_is_a_clear_error(tmp_path):
    config = make_tiny_config(str(tmp_path))
    with pytest.raises(UserError, match="metrics.csv"):
        write_report(config)
    with pytest.raises(UserError, match="train first"):
        main_module.main([f"--checkpoint_dir={tmp_path}/nothing", "--report"])


CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser",
                                                  "google-chrome") if shutil.which(name)), None)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)")
def test_a_browser_renders_the_report(tmp_path):
    config = make_tiny_config(str(tmp_path))
    write_metrics(config["checkpoint_dir"], a_resumed_run())
    report = write_report(config)
    picture = tmp_path / "report.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path}/profile",
                    f"--screenshot={picture}", "--window-size=1280,1400",
                    f"file://{os.path.abspath(report)}"],
                   capture_output=True, timeout=120, check=False)
    with open(picture, "rb") as file:
        png = file.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1280, 1400)
    assert len(png) > 50_000  # plots and tables drawn, not a blank page (~5 KB)


def table_cells(html):
    """[[cell text, ...] per row] of every <table> of the page, as a browser parses it."""
    from html.parser import HTMLParser

    class Tables(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows, self.cell = [], None

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                self.rows.append([])
            elif tag in ("td", "th"):
                self.cell = ""

        def handle_endtag(self, tag):
            if tag in ("td", "th") and self.cell is not None:
                self.rows[-1].append(self.cell)
                self.cell = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data
    parser = Tables()
    parser.feed(html)
    return parser.rows


def test_every_text_of_the_page_is_escaped(tmp_path):
    hostile = "</td><b>&"
    config = make_tiny_config(str(tmp_path), generation_prompts=[hostile],
                              interim_test_prompt=hostile, data_dir=hostile)
    write_metrics(config["checkpoint_dir"], a_resumed_run())
    with open(write_report(config), encoding="utf-8") as file:
        html = file.read()
    assert hostile not in html and "&lt;/td&gt;&lt;b&gt;&amp;" in html
    config_rows = [row for row in table_cells(html) if row and row[0] in CONFIG_V3]
    assert len(config_rows) == len(CONFIG_V3)  # one row a key: no cell broke out
    assert all(len(row) == 3 for row in config_rows)  # key | this run | default
    rows = {row[0]: row[1:] for row in config_rows}
    for key, value in (("generation_prompts", [hostile]), ("interim_test_prompt", hostile),
                       ("data_dir", hostile)):
        assert rows[key] == [repr(value), repr(CONFIG_V3[key])]


def test_a_damaged_metrics_file_is_reported_without_its_unreadable_rows(tmp_path, capsys):
    config = make_tiny_config(str(tmp_path))
    write_metrics(config["checkpoint_dir"], a_resumed_run())
    metrics = f"{config['checkpoint_dir']}/metrics.csv"
    with open(metrics, "ab") as file:
        file.write(b"abc,x,1,2,3,4,5,6,\n"  # garbled
                   b"90,1,inf,,,0.001,inf,1300,\n"  # non-finite: missing values
                   b"95,1,\xff\xfe,,,0.001,100,1310,\n"  # not UTF-8
                   b"99,1,2.5,,,0.001,25000,13")  # half-written by a killed run
    with open(write_report(config, log=print), encoding="utf-8") as file:
        html = file.read()
    assert "2 unreadable row(s)" in html and "2 unreadable row(s)" in capsys.readouterr().out
    plots = plots_of(html)
    steps = [x for x, _ in plotted(plots["Bits per byte by step (log scale)"],
                                   "training (mean since last row)")]
    assert round(steps[-1]) == 80  # neither the inf nor the half-written row is plotted
    assert f"{len(a_resumed_run()) + 2} rows" in html  # the rows at steps 90 and 95
    assert "<td>steps</td><td>95</td>" in html


def reference_log_rows(path):
    """utils.read_log_rows as csv.DictReader reads it: the plain reference."""
    with open(path, newline="", encoding="utf-8", errors="replace") as file:
        text = file.read()
    complete = text[:text.rfind("\n") + 1]
    rows = list(csv.DictReader(io.StringIO(complete)))
    kept = [{key: value or "" for key, value in row.items() if key is not None}
            for row in rows if (row.get("step") or "").isdigit()]
    return kept, len(rows) - len(kept) + int(complete != text)


@pytest.mark.parametrize("body", [
    b"1,a,b\n2,,\n3,c,d\n",  # every row the header's width: the split fast path
    b"1,a,b\r\n2,,\r\n3,c,d\r\n4,e",  # csv.writer's line ends (the trainer's), half a row
    b"1,a,b\n2,,\n3,c,d\n4,e",  # and a half-written last row
    b"1,a\n2,a,b,c\n\n3,,\nx,1,2\n",  # short, long, blank and garbled rows
    b'1,"a,b",c\n2,"two\nlines",\n3,\xff,d\r\n4,e,f\n',  # quoted cells, \r\n, not UTF-8
    b"",  # the header alone
])
def test_log_rows_are_read_as_the_csv_module_reads_them(tmp_path, body):
    path = tmp_path / "metrics.csv"
    path.write_bytes(b"step,one,two\r\n" + body)
    assert read_log_rows(path) == reference_log_rows(path)
    columns, unreadable = read_log_columns(path)
    rows, _ = read_log_rows(path)
    assert columns == {key: [row[key] for row in rows] for key in ("step", "one", "two")}


def test_a_log_as_the_trainer_writes_it_is_read_without_the_csv_module(tmp_path, monkeypatch):
    """The csv module reads a million-row log in seconds: a log of csv.writer's rows (the
    trainer's, with its \\r\\n line ends) takes the plain split instead."""
    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as file:
        csv.writer(file).writerows([METRICS_COLUMNS, [1, 1, 2.5] + [""] * 8,
                                    [2, "", "", "", "", "", "", "", "resume", "", ""]])
    expected = read_log_columns(path)

    def not_used(*args, **kwargs):
        raise AssertionError("the csv module read a log of uniform rows")
    monkeypatch.setattr(csv, "reader", not_used)
    assert read_log_columns(path) == expected
    assert expected[0]["event"] == ["", "resume"] and expected[1] == 0
