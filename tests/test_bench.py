"""bench.py: a --quick run end to end in a subprocess, and the helpers its figures rest on."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bench
from config import CONFIG_V3
from tests.conftest import REPO_ROOT, make_tiny_config, write_text_corpus
from dataset import ByteSequenceDataset, dummy_corpus_text
from model import ByteLLM_GrugV3
from utils import bits_per_byte


# ---------------------------------------------------------------------------
# The quick run

def numbers_in(value):
    """Every int/float inside nested dicts and lists (bools excluded)."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers_in(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers_in(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


@pytest.mark.slow
def test_the_main_generation_designs_are_the_two_streams_of_config_py(monkeypatch):
    """--generation-designs main (a shorter run) times config.py's single and parallel
    stream, with every figure the targets need, and no other design; "all" (the default)
    adds every other parallel design."""
    timed, real_bench_generation = [], bench.bench_generation
    monkeypatch.setattr(bench, "bench_generation",
                        lambda device, scale, designs: timed.append(designs) or ({}, []))
    monkeypatch.setattr(bench, "print_section", lambda name, result: None)
    for argv in (["--generation-designs", "main"], []):
        assert bench.main(["--quick", "--only", "generation", *argv]) == 0
    assert timed == [bench.generation_designs("main"), bench.generation_designs("all")]
    assert set(timed[0]) == set(bench.GENERATION_DESIGNS)
    assert set(timed[1]) > set(timed[0]) and len(bench.PARALLEL_GENERATION_DESIGNS) > 0
    result, targets = real_bench_generation(torch.device("cpu"), bench.SCALES["quick"],
                                            timed[0])
    assert {row["model"] for row in result["rows"]} == set(bench.GENERATION_DESIGNS)
    assert {batch["model"] for batch in result["batches"]} == set(bench.GENERATION_DESIGNS)
    # cache, compiled, batch; 7 against the seed or of the first byte
    assert len(targets) == 3 * len(bench.GENERATION_DESIGNS) + 7


@pytest.mark.parametrize("stride", [4, 5])
def test_the_compile_time_covers_both_programs_of_the_parallel_stream(tmp_path, stride):
    """The first call that bench.py times as the compile runs the parallel stream's step
    both with and without the patch stream: the two programs a compiled call needs."""
    from predictor import Predictor
    config = make_tiny_config(str(tmp_path), use_parallel_stream_model=True,
                              sequence_length=128, agg_cnn_stride=stride,
                              agg_cnn_kernel_size=stride)
    model = ByteLLM_GrugV3(config).eval()
    patch_due, decode_step = [], model.decode_step
    model.decode_step = lambda *args: patch_due.append(args[3]) or decode_step(*args)
    bench.compile_seconds_of(Predictor(model, "cpu", config, compile="never"))
    assert set(patch_due) == {True, False}


@pytest.mark.slow
def test_quick_run_prints_tables_and_writes_every_figure(tmp_path):
    write_text_corpus(str(tmp_path / "corpus"), dummy_corpus_text(target_bytes=200_000))
    out = tmp_path / "bench.json"
    # One thread: two threads on a busy 2-core machine can be ten times slower. No git
    # history reachable (GIT_DIR names no repository): a clone without it runs every section.
    done = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "bench.py"), "--quick",
                           "--threads", "1", "--data", str(tmp_path / "corpus" / "corpus.txt"),
                           "--json", str(out)],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=180,
                          env={**os.environ, "GIT_DIR": str(tmp_path / "no-history")})
    assert done.returncode == 0, done.stderr[-3000:]
    for heading in ("== training ==", "== quality ==", "== generation ==", "== data ==",
                    "== TARGETS =="):
        assert heading in done.stdout
    assert "PASS" in done.stdout or "FAIL" in done.stdout

    report = json.loads(out.read_text())
    assert report["machine"]["threads"] == 1
    assert report["machine"]["torch"] == torch.__version__
    for key in ("date", "cpu", "device"):
        assert report["machine"][key]
    assert list(report["sections"]) == list(bench.DEFAULT_SECTIONS)  # scale: only when asked
    assert all(math.isfinite(n) for n in numbers_in(report))

    training = report["sections"]["training"]
    ours = [row for row in training["rows"] if row["model"] != "nanoGPT (reference)"]
    assert {(r["model"], r["precision"]) for r in ours} == {
        (a, p) for a in [*bench.ARCHITECTURES, *(f"defaults, {name}" for name in
                                                 bench.DEFAULT_MODEL_VARIANTS)]
        for p in bench.PRECISIONS}
    for row in ours:
        assert row["ms_per_step"] > 0 and row["bytes_per_s"] > 0 and row["mfu_pct"] > 0
    assert all(c["ratio"] > 0 for c in training["comparisons"])
    assert all(m["gflop_per_s"] > 0 for m in training["matmul_peak"])
    assert "-- profile_by_phase" in done.stdout and "-- profile_by_operator" in done.stdout
    for table in ("profile_step", "profile_by_phase", "profile_by_operator"):
        assert {row["precision"] for row in training[table]} == set(bench.PRECISIONS)
    assert all(row["ms_per_step"] > 0 and row["mfu_pct"] > 0 for row in training["profile_step"])

    quality = report["sections"]["quality"]
    runs = [row for row in quality["rows"] if row["model"] != "nanoGPT"]
    # best = single-stream = all_positions, parallel-stream, last_byte, seed recipe
    assert len(runs) == 4
    for row in runs:
        assert row["steps"] > 0 and 0 < row["val_bpb"] < 20 and 0 < row["last_byte_bpb"] < 20
    assert all(c["ratio"] > 0 for c in quality["comparisons"])

    generation = report["sections"]["generation"]
    designs = bench.generation_designs("all")
    assert {(r["model"], r["context"]) for r in generation["rows"]} == {
        (d, c) for d in designs for c in bench.GENERATION_CONTEXTS}
    for row in generation["rows"]:
        streamed = row["model"] in bench.GENERATION_DESIGNS
        for path in ("uncached", "eager", "compiled") + (("streamed",) if streamed else ()):
            assert row[f"{path}_bytes_per_s"] > 0
        assert (row["streamed_bytes_per_s"] is None) != streamed
    assert {b["model"] for b in generation["batches"]} == set(bench.GENERATION_DESIGNS)
    assert all(b["bytes_per_s"] > 0 for b in generation["batches"])
    assert all(row["seconds"] > 0 for row in generation["latency"] if row["seconds"] is not None)
    assert all(row["bytes_per_s"] > 0 for row in generation["nanogpt_shape"])

    data = report["sections"]["data"]["rows"][0]
    assert data["corpus_mb"] >= 20 and data["mb_per_s"] > 0
    assert data["peak_rss_mb"] >= data["baseline_rss_mb"] > 0
    assert data["content_hash_mb_per_s"] > 0

    # No git history: the default path is timed without the seed's beside it
    assert all(row["ours_bytes_per_s"] > 0 and row["vs_seed"] is None
               for row in generation["versus_seed"])
    assert generation["first_byte"][0]["seconds"] > 0

    # training 2, quality 2, data 2, generation: the cache for every design, compile and
    # batch for the two compiled ones, and 7 against the seed or of the first byte (which
    # are not measured here: no git history, quick mode)
    assert len(report["targets"]) == 6 + len(designs) + 2 * len(bench.GENERATION_DESIGNS) + 7
    for target in report["targets"]:
        if "not measured" in target["target"]:
            assert target["passed"] is None and target["measured"] is None
        else:
            assert isinstance(target["passed"], bool) and target["measured"] > 0


TINY_MAIN_ARGS = ("--sequence_length=16 --data_stride=16 --batch_size=4 --embedding_dim=32 "
                  "--attention_d_model=32 --attention_num_heads=2 --num_attention_layers=1 "
                  "--num_byte_stream_layers=1 --num_agg_stream_layers=1 --agg_cnn_out_dim=32 "
                  "--eval_max_batches=2 --final_validation_max_bytes=2000")


@pytest.mark.slow
def test_the_scale_section_times_every_phase_of_real_runs(tmp_path, capsys):
    """Two tiny prefixes, a tiny model and 2 s of training: every phase is timed from
    main.py's own output, the growth per 10x is tabled and every target is checked."""
    write_text_corpus(str(tmp_path / "corpus"), dummy_corpus_text(target_bytes=200_000))
    out = tmp_path / "scale.json"
    assert bench.main(["--quick", "--only", "scale", "--data", str(tmp_path / "corpus"),
                       "--device", "cpu", "--scale-sizes", "0.02,0.2",
                       "--scale-seconds", "2", "--scale-evaluate-mb", "0.005",
                       "--scale-validate-every", "3", "--scale-main-args", TINY_MAIN_ARGS,
                       "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "== scale ==" in printed and "-- growth" in printed
    scale = json.loads(out.read_text())["sections"]["scale"]
    times, memory = scale["rows"], scale["memory_and_disk"]
    assert [round(row["corpus_mb"], 2) for row in times] == [0.02, 0.2]
    for row, more in zip(times, memory):
        assert all(value > 0 for value in row.values()), row  # every phase was seen
        assert more["steps"] > 3 and more["peak_rss_mb"] > 50 and more["cache_mb"] > 0
        assert more["first_step_s"] > row["startup_s"]  # import torch is left out
    assert 0.9 < memory[1]["cache_mb"] / times[1]["corpus_mb"] < 1.1
    growth = {row["figure"]: row["growth_per_10x"] for row in scale["growth"]}
    assert 9 < growth["cache_mb"] < 11  # the cache is the corpus: 10x per 10x
    once = scale["once"][0]
    assert once["evaluate_s"] > 0 and once["import_torch_s"] > 0 < once["import_torch_dynamo_s"]
    assert once["report_rows"] == bench.SCALES["quick"]["report_rows"]
    assert 0 < once["report_of_rows_mb"] < 2
    targets = json.loads(out.read_text())["targets"]
    assert len(targets) == 7 and all(t["measured"] is not None for t in targets)


def test_a_corpus_prefix_ends_on_a_line_or_character_boundary(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"one\ntwo\n")
    (tmp_path / "b.txt").write_bytes("thr\u00e9\u00e9 four".encode())
    sources = bench.corpus_sources(str(tmp_path))
    assert [os.path.basename(path) for path in sources] == ["a.txt", "b.txt"]
    prefix = tmp_path / "prefix.txt"
    for size, expected in [(6, b"one\n"), (8, b"one\ntwo\n"), (12, b"one\ntwo\nthr"),
                           (13, b"one\ntwo\nthr"), (14, b"one\ntwo\nthr\xc3\xa9"),
                           (100, "one\ntwo\nthr\u00e9\u00e9 four".encode())]:
        assert bench.write_prefix(sources, size, prefix) == len(expected)
        assert prefix.read_bytes() == expected, size
        prefix.read_bytes().decode("utf-8")  # valid UTF-8 whatever the size


def test_the_scale_section_runs_only_when_asked_and_needs_a_corpus(capsys):
    assert "scale" not in bench.parse_args(["--data", __file__]).only  # no ../shared needed
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "scale"])
    assert "needs --data" in capsys.readouterr().err
    assert bench.size_list("0.5,10") == [0.5, 10.0]
    with pytest.raises(Exception, match="sizes in MB"):
        bench.size_list("10,-1")


# ---------------------------------------------------------------------------
# Helpers

def test_median_result_of_numbers_and_of_dict_fields():
    assert bench.median_result([3, 1, 2]) == 2
    assert bench.median_result([4.0, 1.0]) == 2.5
    samples = [{"s": 1.0, "rss": 10, "x": None}, {"s": 3.0, "rss": 30, "x": None},
               {"s": 2.0, "rss": 5, "x": None}]
    assert bench.median_result(samples) == {"s": 2.0, "rss": 10, "x": None}


def test_ratio_is_none_without_a_denominator():
    assert bench.ratio(3.0, 2.0) == 1.5
    assert bench.ratio(3.0, 0) is None
    assert bench.ratio(None, 2.0) is None and bench.ratio(2.0, None) is None


@pytest.mark.parametrize("measured, op, threshold, passed, margin", [
    (2.40, "<=", 2.45, True, 0.05),
    (2.45, "<=", 2.45, True, 0.0),
    (2.50, "<=", 2.45, False, -0.05),
    (12.0, ">=", 10.0, True, 2.0),
    (10.0, ">=", 10.0, True, 0.0),
    (8.0, ">=", 10.0, False, -2.0),
    (300.0, "<", 300.0, False, 0.0),
    (250.0, "<", 300.0, True, 50.0),
    (100.0, ">", 100.0, False, 0.0),
])
def test_check_target_pass_fail_and_margin(measured, op, threshold, passed, margin):
    target = bench.check_target("t", measured, op, threshold, "u")
    assert target["passed"] is passed
    assert target["margin"] == pytest.approx(margin)


def test_check_target_without_a_measurement_fails():
    target = bench.check_target("t", None, ">=", 1.0)
    assert target["passed"] is False and target["margin"] is None


def test_format_table_aligns_text_left_and_numbers_right():
    table = bench.format_table([{"name": "a", "value": 1.5, "n": 1234},
                                {"name": "longer", "value": 12345.0, "n": None}])
    lines = table.splitlines()
    assert lines[0].split() == ["name", "value", "n"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2] == "a        1.500  1,234"
    assert lines[3] == "longer  12,345      -"


@pytest.mark.parametrize("value, text", [
    (None, "-"), (True, "PASS"), (False, "FAIL"), (1234567, "1,234,567"),
    (17067.4, "17,067"), (123.45, "123.5"), (2.4567, "2.457"), ("fp32", "fp32"),
])
def test_format_cell(value, text):
    assert bench.format_cell(value) == text


def test_side_by_side_interleaves_blocks_after_warmup():
    calls = []

    def measure(name):
        def run():
            calls.append(name)
            return len(calls)
        return run

    medians = bench.side_by_side({"a": measure("a"), "b": measure("b")}, rounds=2, block=2,
                                 warmup=1)
    assert calls == ["a", "b", "a", "a", "b", "b", "a", "a", "b", "b"]
    assert medians == {"a": np.median([3, 4, 7, 8]), "b": np.median([5, 6, 9, 10])}


def test_paired_rounds_swap_the_order_and_report_the_median_of_per_round_ratios():
    calls = []

    def measure(name, results):
        def run():
            calls.append(name)
            return results[len([c for c in calls if c == name]) - 1]
        return run

    summary = bench.paired_rounds(measure("a", [2, 4, 30]), measure("b", [1, 4, 10]), rounds=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    # ratios 2, 1, 3: their median (2) is not the ratio of the medians (4 / 4)
    assert summary == {"a": 4, "b": 4, "ratio": 2, "ratio_min": 1, "ratio_max": 3, "rounds": 3}
    alone = bench.paired_rounds(measure("c", [5, 7]), None, rounds=2)
    assert alone == {"a": 6, "b": None, "ratio": None, "ratio_min": None, "ratio_max": None,
                     "rounds": 2}


def test_the_seeds_code_loads_apart_from_ours(tmp_path):
    import model
    seed = bench.seed_code(str(tmp_path))
    if seed is None:
        pytest.skip(f"no git history with {bench.SEED_COMMIT} here")
    assert os.path.dirname(seed["model"].__file__) == str(tmp_path)
    assert seed["predictor"].CONFIG_V3 is seed["config"].CONFIG_V3  # the seed's own config
    assert sys.modules["model"] is model and sys.modules["config"].CONFIG_V3 is CONFIG_V3
    predictor = bench.seed_predictor(seed, 64, True, torch.device("cpu"))
    assert bench.generation_rate(predictor, bench.printable_prompt(20), 2)() > 0


@pytest.mark.parametrize("parallel", [False, True], ids=["single", "parallel"])
def test_the_compiling_call_runs_every_step_it_compiles(tmp_path, parallel):
    """compile_seconds_of's call, at config.py's window, runs decode steps (a prompt that
    filled the window would slide at the first byte, whose refill replaces the step:
    nothing would compile, and the kept-program row would time eager decoding), with and
    without the patch stream for the parallel stream."""
    from predictor import Predictor
    config = bench.model_config(use_parallel_stream_model=parallel,
                                checkpoint_dir=str(tmp_path))
    model = ByteLLM_GrugV3(config).eval()
    dues, decode = [], model.decode_step

    def spy(byte, cache, positions, patch_due=None):
        dues.append(patch_due)
        return decode(byte, cache, positions, patch_due)
    model.decode_step = spy
    bench.compile_seconds_of(Predictor(model, "cpu", config, compile="never"))
    assert set(dues) == ({False, True} if parallel else {None})


def test_a_compiling_worker_that_kept_no_program_is_an_error(tmp_path, monkeypatch):
    """Were the compiling call to run no step, nothing would be compiled and kept, and the
    kept-program row would time eager decoding: the worker fails instead."""
    bench.save_default_model(str(tmp_path))
    monkeypatch.setattr(bench, "compile_seconds_of", lambda predictor: 0.0)  # no step run
    with pytest.raises(RuntimeError, match="did not keep every program"):
        bench.generation_worker("compile", str(tmp_path), "cpu")


def test_without_git_history_the_seeds_rows_are_skipped_and_not_failed(monkeypatch, capsys):
    monkeypatch.setattr(bench, "SEED_COMMIT", "0" * 40)  # in no history
    # the worker's process is timed by the quick run (slow); here its answer stands in
    monkeypatch.setattr(bench, "run_generation_worker", lambda mode, folder, device: 0.5)
    scale = {**bench.SCALES["quick"], "gen_user_new_bytes": 2}
    result, targets = bench.bench_user_generation(torch.device("cpu"), scale)
    assert "the seed's rows are skipped" in capsys.readouterr().err
    assert {(r["window"], r["stream"]) for r in result["versus_seed"]} == {
        (w, s) for w in bench.USER_WINDOWS for s in bench.USER_STREAMS}
    for row in result["versus_seed"]:
        assert row["ours_bytes_per_s"] > 0 and row["seed_bytes_per_s"] is None
        assert row["vs_seed"] is None
    assert result["first_byte"] == [
        {"what": "first decode-step byte of a new process, no program kept", "seconds": 0.5}]
    assert len(targets) == 7  # default path x 4, compiled x 2, first byte
    for target in targets:
        assert target["passed"] is None and target["measured"] is None
        assert "not measured" in target["target"]
    assert any("no git history" in target["target"] for target in targets)


def test_every_design_at_patch_ends_and_the_windowed_stream_are_timed():
    designs = bench.generation_designs("all")
    at_ends = [name for name, d in bench.PARALLEL_DESIGNS.items()
               if d["parallel_fusion"] == "at_boundaries"]
    assert at_ends and all(f"parallel: {name}" in designs for name in at_ends)
    assert any(d.get("attention_window") for d in designs.values())
    for overrides in designs.values():
        bench.model_config(**overrides, sequence_length=max(bench.GENERATION_CONTEXTS))


def test_config_defaults_are_the_seed_recipe_with_the_adopted_changes():
    # One definition of the recipe: config.py's defaults. bench's seed recipe plus every
    # change marked adopted must give them back, and no rejected change may be in them.
    adopted = {}
    for overrides, taken in bench.RECIPE_CHANGES.values():
        assert set(overrides) <= set(CONFIG_V3)
        if taken:
            adopted.update(overrides)
    recipe = {**bench.SEED_RECIPE, **adopted}
    assert set(recipe) <= set(CONFIG_V3)
    assert {key: CONFIG_V3[key] for key in recipe} == recipe
    for overrides, taken in bench.RECIPE_CHANGES.values():
        if not taken:
            assert any(CONFIG_V3[key] != value for key, value in overrides.items())
    # The candidates tried on the defaults: in them if adopted, out of them if not.
    for overrides, taken in bench.CANDIDATE_CHANGES.values():
        assert set(overrides) <= set(CONFIG_V3)
        assert all(CONFIG_V3[key] == value for key, value in overrides.items()) == taken


def test_every_quality_variant_is_a_valid_config_and_long_windows_keep_bytes_per_step():
    variants = bench.quality_variants(ablation=True, parallel_designs=True, candidates=True)
    assert {name for name in variants if name.startswith("best + ")} == {
        f"best + {name}" for name in [*bench.CANDIDATE_CHANGES, "every candidate"]}
    for name, overrides in variants.items():
        config = bench.model_config(**overrides)  # raises ConfigError on a bad variant
        assert config["use_parallel_stream_model"] == (
            name.startswith("parallel") or name.endswith("parallel-stream")), name
    bytes_per_step = CONFIG_V3["batch_size"] * CONFIG_V3["sequence_length"]
    for window in bench.LONG_WINDOWS:
        for stream in ("single-stream", "parallel-stream"):
            config = bench.model_config(**variants[f"window {window}: {stream}"])
            assert config["sequence_length"] == window
            assert config["batch_size"] * window == bytes_per_step


def test_compiling_pays_after_the_bytes_its_compile_time_buys_back():
    # 10 s of compile, 1 ms a byte saved (500 -> 1000 bytes/s): 10,000 bytes.
    assert bench.break_even_bytes(10.0, 500.0, 1000.0) == 10_000
    assert bench.break_even_bytes(10.0, 1000.0, 900.0) is None


def test_a_timing_pauses_the_garbage_collector_and_restores_it():
    import gc
    seen = []
    measure = bench.seconds_of(lambda: seen.append(gc.isenabled()), torch.device("cpu"))
    assert gc.isenabled()
    assert measure() >= 0 and seen == [False] and gc.isenabled()
    gc.disable()
    try:  # paused by someone else: left paused
        measure()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_section_list_accepts_known_names_only():
    assert bench.section_list("quality, data") == ["quality", "data"]
    with pytest.raises(Exception, match="unknown section"):
        bench.section_list("training,speed")


def test_data_is_not_needed_without_the_quality_section():
    assert bench.parse_args(["--only", "training,data"]).data is None


def test_missing_corpus_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--data", str(tmp_path / "nothing.txt")])
    assert "no such file" in capsys.readouterr().err


def test_generated_corpus_has_the_reported_size_and_multibyte_text(tmp_path):
    size = bench.write_generated_corpus(str(tmp_path), 3 * bench.MB, files=3)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 3
    assert size == sum(f.stat().st_size for f in files) >= 3 * bench.MB
    text = files[0].read_bytes().decode("utf-8")  # whole characters only
    assert any(ord(ch) > 127 for ch in text)


def test_peak_rss_is_plausible():
    assert 10 * bench.MB < bench.peak_rss_bytes() < 100_000 * bench.MB


# ---------------------------------------------------------------------------
# The FLOP estimate behind the training section's MFU

def flops_config(**overrides):
    """A tiny model without n-gram tables (lookups, not matrix work)."""
    return make_tiny_config(".", **{"embedding_dim": 24, "attention_d_model": 32,
                                    "attention_num_heads": 2, "ffn_dim_multiply": 2,
                                    "num_attention_layers": 2, "num_byte_stream_layers": 2,
                                    "agg_cnn_out_dim": 16, "ngram_orders": [],
                                    **overrides})


def weights_of(config):
    model = ByteLLM_GrugV3(config)
    return sum(m.weight.numel() for m in model.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d)))


def test_flops_are_six_times_matmul_weights_plus_attention():
    config = flops_config(use_cnn_frontend=True, cnn_out_channels_list=[24, 32],
                          cnn_kernel_sizes=[2, 3], sequence_length=1)
    model = ByteLLM_GrugV3(config)
    weights = sum(m.weight.numel() for m in model.modules()
                  if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d)))
    attention = 6 * config["num_attention_layers"] * 1 * config["attention_d_model"]
    assert bench.estimate_flops_per_byte(config) == 6 * weights + attention

    def flops(**overrides):
        return bench.estimate_flops_per_byte(flops_config(**overrides))
    # Linear in depth; the attention term grows with the window.
    assert flops(num_attention_layers=3) - flops(num_attention_layers=2) == \
        flops(num_attention_layers=2) - flops(num_attention_layers=1)
    assert flops(sequence_length=64) > flops(sequence_length=16)
    # With a window of w keys the attention term stops growing with T: it tends to that of
    # 2w keys a byte.
    local = [flops(sequence_length=T, attention_window=16) for T in (16, 64, 4096)]
    assert local[0] == flops(sequence_length=16)
    assert local[0] < local[1] < local[2] < flops(sequence_length=64) * 2
    per_layer = 6 * 2 * 16 * config["attention_d_model"]  # 2w keys x 6 FLOPs, one layer
    assert abs(local[2] - (6 * weights_of(flops_config(sequence_length=4096))
                           + config["num_attention_layers"] * per_layer)) < 0.01 * local[2]
    # The patch stream costs 1/s per byte: a wider stride makes it cheaper.
    parallel = dict(use_parallel_stream_model=True)
    assert flops(**parallel, agg_cnn_stride=8) < flops(**parallel, agg_cnn_stride=2)
    # Fed at patch ends: the patch stream costs what its padded slots cost.
    at_ends = dict(parallel, parallel_fusion="at_boundaries", sequence_length=64)
    assert flops(**at_ends, agg_cnn_stride=8) < flops(**at_ends, agg_cnn_stride=2)
    spacelike = dict(at_ends, patch_boundaries="spacelike", agg_cnn_stride=16)
    assert flops(**spacelike, max_patches_per_window=16) < flops(**spacelike)  # 16 < 32 slots
    assert flops(**spacelike) == flops(**at_ends, agg_cnn_stride=2)  # 32 slots either way

# ---------------------------------------------------------------------------
# The training section's profile of a step

PROFILE_DATA = np.frombuffer(dummy_corpus_text(target_bytes=64 * 1024).encode("utf-8"),
                             dtype=np.uint8)


@pytest.mark.parametrize("orders", [[2, 3, 4], []])
def test_the_profile_splits_a_step_into_its_phases(tmp_path, monkeypatch, orders):
    """Every phase is timed and lies inside the step: the phases that follow one another
    and "Python and other" add up to the step's wall time with nothing left negative,
    n-gram hashing is a part of forward (none without tables), and each step fetches
    fresh windows through the Trainer's loader, as training does."""
    fetched, getitems = [], ByteSequenceDataset.__getitems__
    monkeypatch.setattr(ByteSequenceDataset, "__getitems__", lambda dataset, indices: (
        fetched.append(tuple(indices)) or getitems(dataset, indices)))
    config = bench.check_config(make_tiny_config(str(tmp_path), ngram_orders=orders))
    scale = bench.SCALES["quick"]
    phases, operators, seconds = bench.training_profile(
        config, PROFILE_DATA, torch.device("cpu"), scale["train_warmup"], scale["profile_steps"])

    ms = {row["phase"]: row["ms_per_step"] for row in phases}
    assert list(ms) == [*bench.PROFILE_PHASES, "Python and other", "step"]
    assert ms["step"] == pytest.approx(1000 * seconds)
    assert all(value >= 0 for value in ms.values())
    assert all(ms[name] > 0 for name in ("data", "forward", "backward", "optimizer"))
    within_step = [row["ms_per_step"] for row in phases if row["part_of"] == "step"]
    assert sum(within_step) == pytest.approx(ms["step"])
    assert all(row["pct_of_step"] == pytest.approx(100 * row["ms_per_step"] / ms["step"])
               for row in phases)
    if orders:
        assert 0 < ms["n-gram hashing"] < ms["forward"]
    else:
        assert ms["n-gram hashing"] == 0

    # Operators only (no labelled range), each a share of the step
    assert len(operators) == bench.PROFILE_OPERATORS
    assert not {row["operator"] for row in operators} & set(bench.PROFILE_PHASES)
    assert sum(row["self_ms_per_step"] for row in operators) < ms["step"]
    assert all(row["calls_per_step"] > 0 and row["self_ms_per_step"] >= 0 for row in operators)

    steps = scale["train_warmup"] + scale["profile_steps"]
    assert len(fetched) == len(set(fetched)) == steps
    assert all(len(batch) == config["batch_size"] for batch in fetched)


# ---------------------------------------------------------------------------
# Validation bits per byte: the same measure for every model

class CountingModel(torch.nn.Module):
    """A stand-in that predicts byte b+1 after byte b, with certainty or with no idea at all
    (every byte alike): on data 0, 1, 2, ... its loss is 0 or 8 bits per byte."""

    def __init__(self, certain):
        super().__init__()
        self.certain = certain

    def forward(self, x):
        if not self.certain:
            return torch.zeros(*x.shape, 256)
        return 100.0 * F.one_hot((x + 1) % 256, 256).float()  # (B, T, 256)


COUNTING = (np.arange(4000) % 256).astype(np.uint8)


@pytest.mark.parametrize("certain, expected", [(False, 8.0), (True, 0.0)])
def test_known_predictions_cost_known_bits(certain, expected):
    config = {"sequence_length": 16, "val_split_ratio": 0.5}
    all_bpb, last_bpb = bench.validation_bits_per_byte(CountingModel(certain), COUNTING, config,
                                                       torch.device("cpu"), max_windows=50)
    assert all_bpb == pytest.approx(expected, abs=1e-5)  # float32 logits
    assert last_bpb == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("objective", ["all_positions", "last_byte"])
def test_evaluation_matches_the_models_own_loss(tmp_path, objective):
    """All positions equals the all_positions model's loss, and the last-byte figure the
    last_byte model's loss, on the same non-overlapping validation windows."""
    config = make_tiny_config(str(tmp_path), training_objective=objective)
    torch.manual_seed(0)
    model = ByteLLM_GrugV3(config).eval()
    data = np.random.default_rng(0).integers(0, 256, size=2000, dtype=np.uint8)
    all_bpb, last_bpb = bench.validation_bits_per_byte(model, data, config,
                                                       torch.device("cpu"), batch_size=7)
    T = config["sequence_length"]
    val = ByteSequenceDataset(data, T, T, "val", config["val_split_ratio"])
    x, y = val.__getitems__(range(len(val)))
    with torch.no_grad():
        own = bits_per_byte(model(x, y).item())
    assert (all_bpb if objective == "all_positions" else last_bpb) == pytest.approx(own, rel=1e-5)


# ---------------------------------------------------------------------------
# The long section: the held-out slice and how a window is credited for its context

class CopyFromPeriodAgo(torch.nn.Module):
    """Predicts byte i+1 as the byte `period` - 1 places before byte i when the window
    holds it (certain and right on periodic text), and uniformly when it does not."""

    def __init__(self, period):
        super().__init__()
        self.period = period

    def forward(self, x):
        B, T = x.shape
        logits = torch.zeros(B, T, 256)
        lag = self.period - 1
        if T > lag:
            seen = x[:, :T - lag]  # the byte at t - lag predicts the one after t
            logits[:, lag:].scatter_(2, seen[:, :, None].long(), 100.0)
        return logits


def periodic_bytes(length, period, seed=0):
    pattern = np.random.default_rng(seed).integers(0, 256, period, dtype=np.uint8)
    return np.resize(pattern, length)


@pytest.mark.parametrize("window, expected", [(64, 0.0), (32, 8.0)])
def test_heldout_scoring_credits_a_window_for_the_context_it_really_sees(window, expected):
    """Period 40: a 64-byte window holds the byte one period back for every scored byte
    (the scoring windows start before the slice), a 32-byte window for none."""
    data = periodic_bytes(5000, 40)
    bpb = bench.heldout_bits_per_byte(CopyFromPeriodAgo(40), data, (3000, 4000), window,
                                      torch.device("cpu"))
    assert bpb == pytest.approx(expected, abs=1e-3)


def test_heldout_slice_starts_in_the_validation_split_and_a_small_corpus_is_refused():
    config = make_tiny_config(".", val_split_ratio=0.1, val_split_max_bytes=None)
    data = np.zeros(200_000, dtype=np.uint8)
    begin, end = bench.heldout_span(data, config, 10_000)
    assert begin == 180_000 + 4096 + 1 and end == begin + 10_000  # the longest window: 4096
    with pytest.raises(bench.UserError, match="give a larger corpus"):
        bench.heldout_span(data, config, 30_000)


def test_every_long_variant_is_a_valid_config_with_the_same_bytes_per_step():
    for name, overrides in bench.long_variants().items():
        config = bench.model_config(**overrides)
        if name != "defaults":
            assert config["batch_size"] * config["sequence_length"] == \
                max(bench.LONG_BYTES_PER_STEP, config["sequence_length"])
        if config["attention_window"]:
            assert config["attention_window"] < config["sequence_length"]


def test_the_long_section_runs_only_when_asked_and_needs_a_corpus(capsys):
    assert "long" not in bench.parse_args(["--only", "training"]).only
    assert "long" not in bench.parse_args(["--data", __file__]).only
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "long"])
    assert "--only long needs --data" in capsys.readouterr().err


def test_long_run_picks_runs_beside_the_defaults_and_names_the_choices(capsys):
    chosen = bench.chosen_long_variants(["parallel-stream, window 256",
                                         "single-stream, window 1024"])
    # the defaults come first whatever the order asked, since the targets read against them
    assert list(chosen) == ["defaults", "single-stream, window 1024",
                            "parallel-stream, window 256"]
    assert chosen["parallel-stream, window 256"] == \
        bench.long_variants()["parallel-stream, window 256"]
    assert bench.chosen_long_variants(None) == bench.long_variants()
    args = bench.parse_args(["--only", "long", "--data", __file__,
                             "--long-run", "single-stream, window 4096"])
    assert args.long_run == ["single-stream, window 4096"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "long", "--data", __file__, "--long-run", "single, 64"])
    err = capsys.readouterr().err
    assert "--long-run 'single, 64': no such run" in err
    assert "'single-stream, window 4096'" in err


def test_quality_run_picks_runs_beside_best_and_reads_only_what_was_trained(capsys):
    args = bench.parse_args(["--only", "quality", "--data", __file__, "--recipe-candidates",
                             "--quality-run", "best + smear"])
    chosen = bench.chosen_variants(bench.quality_variants(False, False, True), args.quality_run,
                                   "best")
    assert list(chosen) == ["best", "best + smear"]
    result = {"val_bpb": 2.2, "last_byte_bpb": 2.1}
    by_variant = {"best": result, "best + smear": dict(result, val_bpb=2.1)}
    found = bench.quality_comparisons(by_variant)
    assert [c["comparison"] for c in found] == ["best vs nanoGPT", "best + smear vs best"]
    assert [t["target"] for t in bench.quality_targets(by_variant, 100)] == [
        "best config val bits/byte in 100 s"]
    # a candidate's name without --recipe-candidates is not a run: said, with the choices
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "quality", "--data", __file__, "--quality-run",
                          "best + smear"])
    err = capsys.readouterr().err
    assert "--quality-run 'best + smear': no such run" in err and "'seed recipe'" in err


@pytest.mark.slow
def test_quick_long_section_prints_its_table(tmp_path, monkeypatch, capsys):
    write_text_corpus(str(tmp_path / "corpus"), dummy_corpus_text(target_bytes=300_000))
    monkeypatch.setattr(bench, "LONG_DESIGNS", {
        "single-stream": ({"use_parallel_stream_model": False}, (32, 64))})
    out = tmp_path / "long.json"
    assert bench.main(["--quick", "--only", "long", "--data", str(tmp_path / "corpus"),
                       "--long-seconds", "1", "--long-repeats", "1",
                       "--long-heldout-mb", "0.002", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["sections"]["long"]["rows"]
    # config.py's defaults are the single stream at 64 bytes: trained once, named twice
    assert [row["run"] for row in rows] == ["defaults = single-stream, window 64",
                                            "single-stream, window 32"]
    assert all(row["steps"] > 0 and 0 < row["heldout_bpb"] < 9 for row in rows)
    assert "best (" in capsys.readouterr().out
