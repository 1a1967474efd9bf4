"""The evaluator: known predictions give known bits, the sliding plan scores every byte
exactly once with enough context, per-file figures add up, and `main.py --evaluate`
on folders, short files and invalid UTF-8 under each policy."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import main as main_module
import evaluate as evaluate_module
from evaluate import (SAMPLE_PIECES, SlidingPlan, Totals, bounded_plan, score_text,
                      score_windows)
from tests.conftest import make_tiny_config
from tests.test_main import TINY_MODEL
from utils import ConfigError, UserError

CPU = torch.device("cpu")


class CertainModel(torch.nn.Module):
    """Predicts byte b + 1 after byte b with (all but) certainty."""

    def forward(self, x):
        return 100.0 * F.one_hot((x + 1) % 256, 256).float()  # (B, T, 256)


class UniformModel(torch.nn.Module):
    def forward(self, x):
        return torch.zeros(*x.shape, 256)


class BigramModel(torch.nn.Module):
    """Logits from the last byte alone, so each byte's cross-entropy is known without
    knowing which window scored it."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(256, 256)

    def forward(self, x):
        return self.table(x)

    def reference_nats(self, data, position):
        """-log p(data[position] | data[position - 1])."""
        logits = self.table.weight[int(data[position - 1])].detach()
        return -torch.log_softmax(logits.double(), dim=0)[int(data[position])].item()


def test_a_certain_model_scores_zero_bits_and_a_uniform_one_eight():
    data = (np.arange(1000) % 256).astype(np.uint8)  # every byte is the previous one + 1
    plan = SlidingPlan(0, len(data), context_length=32, stride=8)
    certain, _ = score_text(CertainModel(), data, plan, CPU, batch_size=7)
    uniform, _ = score_text(UniformModel(), data, plan, CPU, batch_size=7)
    assert certain.count == uniform.count == len(data) - 1
    assert certain.bits_per_byte == pytest.approx(0.0, abs=1e-6)
    assert uniform.bits_per_byte == pytest.approx(8.0)
    assert uniform.perplexity == pytest.approx(256.0)
    windows = score_windows(UniformModel(), data, [0, 100], 32, CPU)  # the trainer's path
    assert windows.count == 64 and windows.bits_per_byte == pytest.approx(8.0)


@pytest.mark.parametrize("begin,end,length,stride", [
    (0, 1000, 64, 64), (0, 1000, 64, 1), (0, 1000, 64, 10), (37, 500, 16, 5),
    (0, 65, 64, 64),  # exactly one window
    (3, 13, 64, 64),  # shorter than one window: one window of 9 bytes of context
])
def test_the_sliding_plan_scores_every_byte_once_with_enough_context(begin, end, length,
                                                                      stride):
    plan = SlidingPlan(begin, end, length, stride)
    starts, score_from = plan.windows(0, len(plan))
    scored = []
    for start, first in zip(starts, score_from):
        assert begin <= start and start + plan.context_length + 1 <= end  # inside the span
        for target in range(first, plan.context_length):
            position = start + 1 + target
            scored.append(position)
            if start > begin:  # after the first window: at least length - stride of context
                assert position - start >= plan.context_length - plan.stride + 1
    assert sorted(scored) == list(range(begin + 1, end))  # every byte but the first, once
    assert plan.context_length == min(length, end - begin - 1)
    # A plan never holds its windows: one over a terabyte costs what a small one does.
    huge = SlidingPlan(0, 10**12, length, stride)
    last_start, _ = huge.windows(len(huge) - 1, len(huge))
    assert last_start[0] == 10**12 - 1 - length


def test_per_file_figures_match_a_reference_and_add_up_to_the_total():
    torch.manual_seed(0)
    model = BigramModel()
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 700).astype(np.uint8)
    files = [[0, 300], [302, 310], [312, 700]]  # two bytes of separator between files
    plan = SlidingPlan(0, len(data), context_length=16, stride=4)
    total, per_file = score_text(model, data, plan, CPU, batch_size=5, parts=files)
    for (start, end), part in zip(files, per_file):
        positions = range(max(start, 1), end)  # the very first byte has nothing before it
        assert part.count == len(positions)
        expected = sum(model.reference_nats(data, p) for p in positions)
        assert part.nats == pytest.approx(expected, rel=1e-5)
    assert total.count == sum(p.count for p in per_file) == 700 - 1 - 4  # no separators
    assert total.nats == pytest.approx(sum(p.nats for p in per_file))
    # Ranks scoring their shares of the windows add up to one process's figures.
    shares = [score_text(model, data, plan, CPU, parts=files, windows=plan.share(r, 3))[0]
              for r in range(3)]
    combined = sum(shares, Totals())
    assert combined.count == total.count
    assert combined.nats == pytest.approx(total.nats, rel=1e-6)


def scored_positions(plan):
    """Every byte position the plan scores, in order, with the context each one gets."""
    starts, score_from = plan.windows(0, len(plan))
    return [(start + 1 + target, target + 1) for start, first in zip(starts, score_from)
            for target in range(first, plan.context_length)]


@pytest.mark.parametrize("begin,end,length,stride,bound", [
    (0, 10_000, 16, 16, 1000), (7, 5000, 16, 5, 999), (0, 3000, 64, 64, 2000),
    (0, 1000, 64, 64, 40),  # a bound below one window: one short piece
])
def test_a_bounded_plan_scores_spread_pieces_within_the_bound(begin, end, length, stride,
                                                              bound):
    plan, scope = bounded_plan(begin, end, length, stride, bound, "validation split")
    scored = scored_positions(plan)
    positions = [p for p, _ in scored]
    count = int(scope.split(" bytes of")[0].replace(",", ""))
    assert len(positions) == len(set(positions)) == count == plan.bytes_scored(0, len(plan))
    assert bound - SAMPLE_PIECES < count <= bound and f"of the {end - begin:,}-byte" in scope
    assert begin < min(positions) and max(positions) < end
    if bound >= length:  # pieces of whole windows, spread from one end of the span to the other
        assert plan.context_length == length and "evenly spread" in scope
        assert min(positions) - begin <= length and end - max(positions) <= length
        # Inside a piece a byte after the first window has the context it has when the
        # whole span is scored.
        pieces = np.split(np.array(scored), np.flatnonzero(np.diff(positions) > 1) + 1)
        assert all((piece[length:, 1] >= length - stride + 1).all() for piece in pieces)
    shares = [plan.windows(*plan.share(rank, 3)) for rank in range(3)]
    assert np.concatenate([starts for starts, _ in shares]).tolist() == \
        plan.windows(0, len(plan))[0].tolist()


def test_a_bound_at_least_the_span_scores_the_whole_of_it():
    for bound in (None, 999, 10**9):
        plan, scope = bounded_plan(0, 1000, 16, 4, bound, "validation split")
        assert scope == "the whole validation split of 1,000 bytes"
        assert [p for p, _ in scored_positions(plan)] == list(range(1, 1000))


def test_a_bounded_plan_scores_its_bytes_as_a_reference_does_and_ranks_add_up():
    torch.manual_seed(0)
    model = BigramModel()
    data = np.random.default_rng(1).integers(0, 256, 3000).astype(np.uint8)
    plan, _ = bounded_plan(100, 3000, 16, 8, 500)
    total, _ = score_text(model, data, plan, CPU, batch_size=3)
    positions = [p for p, _ in scored_positions(plan)]
    assert total.count == len(positions)
    assert total.nats == pytest.approx(sum(model.reference_nats(data, p) for p in positions),
                                       rel=1e-5)
    shares = [score_text(model, data, plan, CPU, windows=plan.share(r, 3))[0] for r in range(3)]
    assert sum(shares, Totals()).count == total.count
    assert sum(shares, Totals()).nats == pytest.approx(total.nats, rel=1e-6)


def test_the_progress_bar_counts_bytes_and_ends_at_its_total(monkeypatch):
    bars = []

    class RecordingBar(evaluate_module.tqdm):
        def __init__(self, **options):
            super().__init__(**options)
            self.options, self.updates = options, []
            bars.append(self)

        def update(self, n=1):
            self.updates.append(n)
            return super().update(n)
    monkeypatch.setattr(evaluate_module, "tqdm", RecordingBar)
    data = (np.arange(5000) % 256).astype(np.uint8)
    for plan in (SlidingPlan(0, 5000, 32, 8), bounded_plan(0, 5000, 32, 8, 700)[0]):
        total, _ = score_text(UniformModel(), data, plan, CPU, batch_size=9, progress=True)
        bar = bars.pop()
        assert bar.options["unit"] == "B" and bar.options["unit_scale"]
        assert bar.options["total"] == sum(bar.updates) == total.count


def test_a_stride_longer_than_the_window_is_a_config_error(tmp_path):
    config = make_tiny_config(str(tmp_path), evaluation_stride=17)  # sequence_length 16
    with pytest.raises(ConfigError, match="evaluation_stride"):
        main_module.check_config(config)
    main_module.check_config({**config, "evaluation_stride": 16})


# ---------------------------------------------------------------------------
# main.py --evaluate, in process on a model trained once

def arguments(root, *extra):
    return [f"--data_dir={root}/data", f"--processed_data_dir={root}/processed",
            f"--checkpoint_dir={root}/ckpt", f"--profiler_log_dir={root}/prof",
            *TINY_MODEL, "--test_every_batches=0", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    os.makedirs(root / "data")
    (root / "data" / "train.txt").write_text("the cat sat on the mat. " * 300)
    assert main_module.main(arguments(root, "--max_steps=3", "--DO_PREDICTION=False")) == 0
    return root


def evaluate(root, path, *extra):
    """--evaluate=path with --json; the figures it wrote."""
    figures = f"{root}/figures.json"
    if os.path.exists(figures):
        os.remove(figures)
    assert main_module.main(arguments(root, f"--evaluate={path}", f"--json={figures}",
                                      *extra)) == 0
    with open(figures, encoding="utf-8") as file:
        return json.load(file)


def write(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as file:
        file.write(content)


def test_evaluating_a_folder_gives_each_file_and_the_total(trained, capsys):
    folder = trained / "held_out"
    write(f"{folder}/a.txt", b"the dog sat on the log. " * 40)
    write(f"{folder}/sub/b.txt", b"zq xv jk " * 30)
    write(f"{folder}/tiny.txt", b"Hi.")  # shorter than one window
    latest = os.path.getmtime(f"{trained}/ckpt/grug_v3_latest.pth")
    training_cache = os.path.getmtime(f"{trained}/processed/all_bytes_grug_v3.npy")

    figures = evaluate(trained, folder)
    files = {entry["file"]: entry for entry in figures["files"]}
    assert set(files) == {"a.txt", "sub/b.txt", "tiny.txt"}
    assert files["a.txt"]["bytes"] == 960 - 1  # its first byte is the text's first
    assert files["sub/b.txt"]["bytes"] == 270 and files["tiny.txt"]["bytes"] == 3
    total = figures["total"]
    assert total["bytes"] == sum(entry["bytes"] for entry in files.values())
    weighted = sum(e["bits_per_byte"] * e["bytes"] for e in files.values()) / total["bytes"]
    assert total["bits_per_byte"] == pytest.approx(weighted)
    assert total["perplexity"] == pytest.approx(math.exp(total["nats_per_byte"]))
    bits = [entry["bits_per_byte"] for entry in figures["files"]]
    assert bits == sorted(bits, reverse=True)  # hardest first
    printed = capsys.readouterr().out
    assert "total" in printed and "sub/b.txt" in printed and "evaluating with" in printed
    # Evaluation changes no checkpoint and leaves the training cache alone.
    assert os.path.getmtime(f"{trained}/ckpt/grug_v3_latest.pth") == latest
    assert os.path.getmtime(f"{trained}/processed/all_bytes_grug_v3.npy") == training_cache


def test_a_text_shorter_than_one_window_is_one_short_window(trained):
    write(f"{trained}/short.txt", b"the mat.")  # 8 bytes, window 16
    figures = evaluate(trained, f"{trained}/short.txt")
    assert figures["context_length"] == 7 and figures["total"]["bytes"] == 7
    assert 0 < figures["total"]["bits_per_byte"] < 16
    write(f"{trained}/one.txt", b"x")
    with pytest.raises(UserError, match="nothing to predict"):
        main_module.main(arguments(trained, f"--evaluate={trained}/one.txt"))


@pytest.mark.parametrize("policy", ["replace", "skip", "keep", "error"])
def test_invalid_utf8_follows_the_training_policy(trained, policy):
    folder = trained / f"mixed_{policy}"
    write(f"{folder}/good.txt", b"the cat sat. " * 20)
    write(f"{folder}/bad.txt", b"the mat \xff\xfe sat. " * 10)
    if policy == "error":
        with pytest.raises(UserError, match="bad.txt"):
            evaluate(trained, folder, "--utf8_error_policy=error")
        return
    figures = evaluate(trained, folder, f"--utf8_error_policy={policy}")
    files = {entry["file"]: entry["bytes"] for entry in figures["files"]}
    if policy == "skip":
        assert figures["skipped"] == ["bad.txt"] and list(files) == ["good.txt"]
        return
    assert figures["invalid_utf8"] == {"bad.txt": 20}  # \xff and \xfe, 10 times
    # "replace" turns each bad byte into U+FFFD's 3 bytes; "keep" keeps them as they are.
    bad_bytes = 160 - 1 + (40 if policy == "replace" else 0)
    assert files == {"bad.txt": bad_bytes, "good.txt": 260}


def test_evaluate_errors_are_clear(trained):
    with pytest.raises(UserError, match="no such file"):
        main_module.main(arguments(trained, f"--evaluate={trained}/missing"))
    with pytest.raises(ConfigError, match="--evaluate"):
        main_module.main(arguments(trained, "--json=out.json"))


def test_the_stride_is_checked_against_the_checkpoints_window(trained, capsys):
    write(f"{trained}/held.txt", b"the dog sat on the log. " * 40)
    write(f"{trained}/stride.txt", b"the dog sat on the log. " * 40)
    # The config's window is 64, the checkpoint's 16: a stride of 48 would skip bytes.
    with pytest.raises(UserError, match=r"longer than the checkpoint's window \(16 bytes"):
        main_module.main(arguments(trained, f"--evaluate={trained}/stride.txt",
                                   "--sequence_length=64", "--evaluation_stride=48"))
    assert not [name for name in os.listdir(f"{trained}/processed")
                if name.startswith("evaluate_stride")]  # said before the data work
    figures = evaluate(trained, f"{trained}/held.txt", "--sequence_length=64",
                       "--evaluation_stride=8")
    assert (figures["context_length"], figures["stride"]) == (16, 8)
    printed = capsys.readouterr().out
    assert "the checkpoint's window 16, stride 8 (evaluation_stride;" in printed


def test_an_unwritable_json_path_is_refused_before_the_work(trained, capsys):
    write(f"{trained}/held.txt", b"the dog sat on the log. " * 40)
    capsys.readouterr()
    with pytest.raises(UserError, match="does not exist"):
        main_module.main(arguments(trained, f"--evaluate={trained}/held.txt",
                                   f"--json={trained}/no_such_folder/figures.json"))
    assert "evaluating with" not in capsys.readouterr().out  # nothing was loaded or scored
    with pytest.raises(UserError, match="is a folder"):
        main_module.main(arguments(trained, f"--evaluate={trained}/held.txt",
                                   f"--json={trained}"))


def test_a_failed_json_write_is_a_clear_error_after_the_figures_are_printed(
        trained, capsys, monkeypatch):
    write(f"{trained}/held.txt", b"the dog sat on the log. " * 40)

    def full_disk(path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(main_module, "atomic_output", full_disk)
    capsys.readouterr()
    with pytest.raises(UserError, match="cannot write the figures to .*No space left on device"):
        main_module.main(arguments(trained, f"--evaluate={trained}/held.txt",
                                   f"--json={trained}/figures.json"))
    printed = capsys.readouterr().out
    assert "bits/byte" in printed and "total" in printed  # the figures are not lost


def test_evaluate_speaks_of_evaluation_and_checks_the_checkpoint_first(trained, tmp_path):
    write(f"{trained}/empty.txt", b"")
    with pytest.raises(UserError, match="nothing to evaluate") as caught:
        main_module.main(arguments(trained, f"--evaluate={trained}/empty.txt"))
    assert "to train" not in str(caught.value) and "dummy" not in str(caught.value)
    os.mkfifo(f"{tmp_path}/pipe.txt")
    with pytest.raises(UserError, match="not a regular file"):
        main_module.main(arguments(trained, f"--evaluate={tmp_path}/pipe.txt"))

    untrained = arguments(tmp_path, f"--evaluate={trained}/empty.txt")
    with pytest.raises(UserError, match="no checkpoint to generate from"):
        main_module.main(untrained)
    assert not os.path.exists(f"{tmp_path}/processed")  # no data processed before it


def test_evaluate_and_report_remove_their_stale_temporaries(trained, tmp_path):
    import socket
    stale = f".tmp_{socket.gethostname()}_999999_"  # a writer that no longer runs
    for folder, name in ((f"{trained}/ckpt", "report.html"), (str(tmp_path), "figures.json")):
        write(f"{folder}/{stale}{name}", b"half written")
    write(f"{trained}/held.txt", b"the dog sat on the log. " * 40)
    main_module.main(arguments(trained, "--report"))
    main_module.main(arguments(trained, f"--evaluate={trained}/held.txt",
                               f"--json={tmp_path}/figures.json"))
    assert not [n for n in os.listdir(f"{trained}/ckpt") if n.startswith(".tmp_")]
    assert os.listdir(tmp_path) == ["figures.json"]
