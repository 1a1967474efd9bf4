"""GrugV3 benchmark: the one place where the project measures itself.

    python3 bench.py                                  # every section on tiny Shakespeare
    python3 bench.py --quick --data corpus.txt        # smoke test, under a minute
    python3 bench.py --only training,generation --json bench_results.json
    python3 bench.py --only generation --generation-rounds 15 --threads 2
    python3 bench.py --data my_texts/ --quality-seconds 300 --threads 2
    python3 bench.py --only scale --data big_corpus/ --json scale.json   # about an hour
    python3 bench.py --only long --data big_corpus/ --json long.json     # hours

Sections (--only):
    training    bytes/s, ms per optimizer step and model FLOP utilisation (MFU) against a
                matmul peak measured in the same run; single/parallel stream, fp32/bf16;
                where config.py's default step spends its time (torch.profiler: by phase
                and by operator)
    quality     validation bits per byte after a fixed wall-clock training budget
    generation  bytes/s with and without the KV cache at contexts 64, 256 and 1024; what
                users get: config.py's default generation (and the compiled steady state)
                against the seed's cached path, paired round by round (--generation-rounds),
                and the first byte of a new process with and without a kept program
    data        DataProcessor MB/s on a generated corpus, and the peak memory it takes
    scale       (only with --only) each phase of real `python3 main.py` runs on prefixes
                of --data of --scale-sizes MB: processing, start-up, steps/s, validations,
                checkpoint save and load, report, --evaluate, disk and peak memory, with
                the growth of each per 10x of corpus
    long        (only with --only) held-out bits/byte of each design and window after
                --long-seconds of training on a large corpus (--data), scored with
                sliding windows of each model's own length

Every comparison is measured side by side in the same run (interleaved, medians of
repeats) and reported as a ratio beside the absolute figures. stdout carries the report
(tables, then a TARGETS summary); progress goes to stderr. MB = 10^6 bytes.

The file reads in parts: what every section shares (the scales, the targets, the
references and designs compared), the timing harness every section measures with, one
part per section (each ends in its bench_<section>(...) -> (result, targets)), then the
report and the command line. Every section runs from a plain copy of these files (no
git history needed: the generation section's rows against the seed's code, which it reads
from git history, are then skipped and their targets reported as not measured).
"""

import argparse
import contextlib
import datetime
import gc
import importlib
import json
import math
import operator
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from checkpoint import FORMAT_VERSION, checkpoint_path, load_checkpoint, save_checkpoint
from config import CONFIG_V3
from dataset import (ByteSequenceDataset, DataProcessor, dummy_corpus_text, scan_sources,
                     split_point)
from evaluate import SlidingPlan, evenly_spread, score_text, score_windows
from main import build_training, check_config, load_model_for_prediction
from model import SMEAR_GATE_INPUTS, ByteLLM_GrugV3, count_parameters, patch_slots
from predictor import AHEAD_OF_TIME_DEVICE_TYPES, PROGRAM_FOLDER, Predictor
from report import write_report
from trainer import METRICS_COLUMNS
from utils import (UserError, atomic_output, autocast_context, bits_per_byte, resolve_device,
                   seed_everything, synchronize)

REPO = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")
SECTIONS = ("training", "quality", "generation", "data", "scale", "long")
# scale runs main.py for minutes a size, long trains for 10 minutes a run: only when asked
DEFAULT_SECTIONS = ("training", "quality", "generation", "data")
MB = 10**6


# =============================================================================
# Shared by the sections: how much work each does, the targets they check, nanoGPT's
# reference figures, and the parallel-stream designs (trained by quality, timed by
# generation).
# =============================================================================


# How much work each section does. Quick mode only checks that everything runs.
SCALES = {
    "full": dict(train_warmup=5, train_rounds=5, train_block=8, matmul_size=2048,
                 matmul_rounds=10, profile_steps=10, quality_seconds=100.0, eval_windows=None,
                 gen_max_new_bytes=256, gen_rounds=3, gen_compile=True,
                 gen_user_new_bytes=300, gen_user_rounds=9,
                 data_bytes=200 * MB, data_rounds=3, long_seconds=600.0, report_rows=10**6),
    "quick": dict(train_warmup=2, train_rounds=2, train_block=2, matmul_size=512,
                  matmul_rounds=3, profile_steps=2, quality_seconds=2.0, eval_windows=16,
                  gen_max_new_bytes=4, gen_rounds=1, gen_compile=False,
                  gen_user_new_bytes=4, gen_user_rounds=1,
                  data_bytes=20 * MB, data_rounds=1, long_seconds=2.0, report_rows=10**4),
}


# nanoGPT's CPU recipe for tiny Shakespeare (block 64, batch 12, 4 layers, 4 heads,
# width 128, no dropout), run on the project's 2-core reference machine.
REFERENCE_SHAPE = {
    "sequence_length": 64, "data_stride": 64, "batch_size": 12,
    "embedding_dim": 128, "attention_d_model": 128, "agg_cnn_out_dim": 128,
    "attention_num_heads": 4, "num_attention_layers": 4,
    # Parallel-stream rows: the same byte stream plus one patch layer beside it.
    "num_byte_stream_layers": 4, "num_agg_stream_layers": 1,
    "transformer_dropout": 0.0, "pe_dropout": 0.0, "output_dropout": 0.0,
    "use_cnn_frontend": False, "training_objective": "all_positions",
}
# Its quality run: 2000 steps of 768 bytes in about 100 s, ending at 1.886 nats.
NANOGPT = {"ms_per_step": 45.0, "bytes_per_s": 17_000, "steps": 2000, "seconds": 100,
           "val_bpb": 2.72,
           "sample_bytes_per_s": 530}  # its sample.py on that shape (the issue's figure)


TARGETS = {  # (comparison, threshold) for each target of the issue
    "quality_bpb": ("<=", 2.25),
    "train_bf16_vs_fp32": (">", 1.0),
    "train_fp32_bytes_per_s": (">=", NANOGPT["bytes_per_s"]),
    "kv_cache_speedup_1024": (">=", 10.0),  # every design timed (issues 11 and 32)
    "compiled_vs_eager_1024": (">=", 5.0),
    "batch_of_8_vs_one": (">=", 4.0),
    # What users get, against the seed's cached path (issue 30), both streams
    "default_vs_seed": (">=", 1.5),  # 300 new bytes at windows 64 and 1024
    "compiled_vs_seed_1024": (">=", 5.0),
    "first_byte_kept_program_s": ("<=", 2.0),  # a later process, after the model is loaded
    "data_mb_per_s": (">=", 100.0),
    "data_peak_mb": ("<", 300.0),
    # The scale section's, at its largest corpus (docs/benchmarks.md, Scale: why these)
    "scale_processing_mb_per_s": (">=", 100.0),
    "scale_content_hash_mb_per_s": (">=", 300.0),
    "scale_startup_s": ("<=", 5.0),  # to the first step, less import torch
    "scale_final_validation_s": ("<=", 18.0),  # 10 % of the default 3-minute run
    "scale_peak_rss_growth_mb": ("<=", 100.0),
    "scale_report_s": ("<=", 5.0),  # report.html of a 10^6-row metrics.csv
    "scale_report_mb": ("<=", 2.0),
}


# The parallel-stream designs tried beside the single stream (--parallel-designs), as
# overrides of config.py's defaults; the defaults' parallel keys are the seed's design
# (none of these measured better by more than noise: docs/benchmarks.md).
PARALLEL_BASE = {"use_parallel_stream_model": True, "agg_cnn_kernel_size": 8}


def parallel_design(fusion, byte_layers, patch_layers, patch_width, patch_bytes,
                    boundaries="fixed"):
    return {"parallel_fusion": fusion, "num_byte_stream_layers": byte_layers,
            "num_agg_stream_layers": patch_layers, "agg_cnn_out_dim": patch_width,
            "agg_cnn_stride": patch_bytes, "patch_boundaries": boundaries}


PARALLEL_DESIGNS = {
    "seed design: 2 byte + 1 patch layer, concat at output":
        parallel_design("concat_output", 2, 1, 160, 4),
    "patches added to the byte input": parallel_design("add_input", 2, 1, 160, 4),
    "patches added before the middle byte layer": parallel_design("add_middle", 2, 1, 160, 4),
    "1 byte layer + 2 patch layers of 256, input": parallel_design("add_input", 1, 2, 256, 4),
    "1 byte layer + 2 patch layers of 256, patches of 8, input":
        parallel_design("add_input", 1, 2, 256, 8),
    # SpaceByte: fed from and back into the bytes that end a patch, between the byte layers
    "at patch ends: 2 byte + 2 patch layers of 256, spacelike patches of at most 16":
        parallel_design("at_boundaries", 2, 2, 256, 16, "spacelike"),
    "at patch ends: 2 byte + 2 patch layers of 256, fixed patches of 6":
        parallel_design("at_boundaries", 2, 2, 256, 6),
}


# =============================================================================
# The timing harness: every section measures through it
# Measures are zero-argument functions; side_by_side runs them in turn, round after
# round, and keeps medians, so drift on a shared machine hits every variant alike.
# Results become comparisons (a / b) and targets (pass/fail with a margin).
# =============================================================================


def log(message):
    print(message, file=sys.stderr, flush=True)


def medians(samples):
    """{name: median_result of its results} of {name: [results]}."""
    return {name: median_result(values) for name, values in samples.items()}


def median_result(samples):
    """The median of numbers, or of each field of dicts (a field that is None stays None)."""
    if isinstance(samples[0], dict):
        return {key: None if samples[0][key] is None else median_result([s[key] for s in samples])
                for key in samples[0]}
    return statistics.median(samples)


def ratio(a, b):
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def comparison(name, measure, a, b):
    """One side-by-side comparison: both figures and their ratio a / b."""
    return {"comparison": name, "measure": measure, "a": a, "b": b, "ratio": ratio(a, b)}


COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def check_target(name, measured, op, threshold, unit=""):
    """Pass/fail of `measured op threshold`; margin > 0 means room to spare."""
    passed = measured is not None and COMPARE[op](measured, threshold)
    margin = None
    if measured is not None:
        margin = measured - threshold if op in (">=", ">") else threshold - measured
    return {"target": name, "measured": measured, "op": op, "threshold": threshold,
            "unit": unit, "passed": bool(passed), "margin": margin}


def side_by_side(measures, rounds, block=1, warmup=0):
    """{name: median result} of zero-argument measures, run in turn: every round runs each
    measure `block` times in a row, so drift on a noisy machine hits them all alike."""
    return medians(side_by_side_samples(measures, rounds, block, warmup))


def side_by_side_samples(measures, rounds, block=1, warmup=0):
    """{name: [every result]} of side_by_side, before taking medians."""
    for measure in measures.values():
        for _ in range(warmup):
            measure()
    samples = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            samples[name].extend(measure() for _ in range(block))
    return samples


def seconds_of(work, device):
    """A measure: the wall-clock seconds of one call of `work()`, device work included,
    with Python's garbage collector paused as timeit pauses it. This process holds every
    model and compiled graph of its section: a full collection of them can take longer
    than a short timing itself, and one landing in a timing says nothing about the code
    being timed."""
    def measure():
        with gc_paused():
            synchronize(device)
            began = time.perf_counter()
            work()
            synchronize(device)
            return time.perf_counter() - began
    return measure


@contextlib.contextmanager
def gc_paused():
    """No garbage collection inside; a collector that was off stays off."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def model_config(**overrides):
    """config.py's defaults with `overrides` applied, checked like main.py checks it."""
    return check_config({**CONFIG_V3, **overrides})


# =============================================================================
# Section: training (--only training)
# ms per optimizer step of nanoGPT's shape with config.py's recipe, the Trainer's own
# step, single/parallel stream x fp32/bf16; model FLOP utilisation against a matmul
# peak timed in the same run; config.py's default step under torch.profiler.
# =============================================================================


ARCHITECTURES = {"single-stream": False, "parallel-stream": True}  # -> use_parallel_stream_model
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # -> autocast dtype


def estimate_flops_per_byte(config):
    """Training FLOPs (forward + backward) per byte at the full window T = sequence_length:

        6 * M + 6 * L * T * d    (+ 6 * L_agg * (T/s) * d_agg / s in the parallel model)

    M counts the weights of every matrix multiply one byte goes through (frontend convs,
    projection, qkv/out/FFN of each layer, the patch-to-byte projection, fc_out; embedding
    lookups and norms excluded):
    2 FLOPs per weight forward, 4 backward. The attention term: scores and weighted values
    are 2 matmuls of 2 FLOPs per key and channel, over T/2 keys on average (causal), times 3
    for forward + backward. In the parallel model the aggregator conv and the patch stream
    run once per s bytes over T/s patches, so their terms are divided by s."""
    c = config
    d, ffn, V = c["attention_d_model"], c["ffn_dim_multiply"], c["vocab_size"]
    T = c["sequence_length"]

    def layer_weights(width):
        return (4 + 2 * ffn) * width * width  # qkv 3w², out w², FFN 2·ffn·w²

    # Keys a byte layer's query sees, on average over the window, times 2: T with causal
    # attention (T/2 keys); with attention_window w < T, the first w queries see w/2 on
    # average and the rest w each, which tends to 2w as T grows.
    w = c.get("attention_window") or T
    span = T if T <= w else w * (2 * T - w) / T

    matmul, front = 0, c["embedding_dim"]
    if c["use_cnn_frontend"]:
        for out_channels, kernel in zip(c["cnn_out_channels_list"], c["cnn_kernel_sizes"]):
            matmul += kernel * front * out_channels
            front = out_channels
    if front != d:
        matmul += front * d
    if c["smear_previous_byte"]:  # its gate
        matmul += min(SMEAR_GATE_INPUTS, d)
    if not c["use_parallel_stream_model"]:
        layers = c["num_attention_layers"]
        matmul += layers * layer_weights(d) + d * V
        attention = layers * span * d
    elif c["parallel_fusion"] == "at_boundaries":
        # The patch stream runs on every slot the full forward pads a view's patches to.
        agg, agg_layers = c["agg_cnn_out_dim"], c["num_agg_stream_layers"]
        slots = patch_slots(T, c["agg_cnn_stride"], c["patch_boundaries"],
                            c["max_patches_per_window"])
        matmul += c["num_byte_stream_layers"] * layer_weights(d) + d * V
        matmul += (2 * d * agg + agg_layers * layer_weights(agg)) * slots / T
        attention = c["num_byte_stream_layers"] * span * d + agg_layers * slots * agg * slots / T
    else:
        agg, s, byte_layers = c["agg_cnn_out_dim"], c["agg_cnn_stride"], c["num_byte_stream_layers"]
        agg_layers = c["num_agg_stream_layers"]
        concat = c["parallel_fusion"] == "concat_output"
        # Concatenated states widen the output head; added ones pass a projection first.
        matmul += byte_layers * layer_weights(d) + ((d + agg) * V if concat else agg * d + d * V)
        matmul += (c["agg_cnn_kernel_size"] * front * agg + agg_layers * layer_weights(agg)) / s
        attention = byte_layers * span * d + agg_layers * (T / s) * agg / s
    return 6 * matmul + 6 * attention


def matmul_peak(device, size, rounds):
    """{precision: FLOP/s} of a square matmul, the median of `rounds` timings."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)

    def multiply(dtype):
        with autocast_context(device, dtype):
            a @ b
    seconds = side_by_side({name: seconds_of(lambda d=dtype: multiply(d), device)
                            for name, dtype in PRECISIONS.items()}, rounds, warmup=2)
    return {name: 2 * size**3 / s for name, s in seconds.items()}


def training_rate(config, seconds, peak_flops):
    """(bytes/s, FLOPs per byte, MFU %) of training steps of `config` of `seconds` each,
    against a matmul peak of `peak_flops` FLOP/s."""
    rate = config["batch_size"] * config["sequence_length"] / seconds
    flops = estimate_flops_per_byte(config)
    return rate, flops, 100 * flops * rate / peak_flops


# The ranges a training step is labelled with (utils.profiled) -> the range each is part
# of: n-gram hashing runs inside forward; the others follow one another within the step.
PROFILE_PHASES = {"data": "step", "forward": "step", "n-gram hashing": "forward",
                  "backward": "step", "optimizer": "step"}
PROFILE_OPERATORS = 12  # rows of the by-operator table


def training_profile(config, data, device, warmup, steps):
    """Where the time of a training step of `config` goes: (phases, operators, seconds
    per step) of `steps` Trainer steps under torch.profiler, after `warmup` steps
    without it. Each step fetches fresh micro-batches through the Trainer's loader, as
    Trainer.train does.

    phases: ms per step of each range of PROFILE_PHASES, and "Python and other": the rest
    of the step's wall time (the learning rate, the loss's .item(), the profiler's own
    bookkeeping). operators: the PROFILE_OPERATORS operators of the most self time (their
    own, not their callees'), the labelled ranges left out. On a GPU the times are the
    host's: the wait for queued kernels lands where the host waits (loss.item())."""
    trainer = build_training(config, data, device)
    batches = trainer.batch_loader()

    def run(count):
        for _ in range(count):
            trainer.train_step(trainer.next_micro_batches(batches))
    run(warmup)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        seconds = seconds_of(lambda: run(steps), device)() / steps
    events = profiler.key_averages()
    step_ms = 1000 * seconds

    def phase_row(name, part_of, ms):
        return {"phase": name, "part_of": part_of, "ms_per_step": ms,
                "pct_of_step": 100 * ms / step_ms}

    def operator_row(event):
        ms = event.self_cpu_time_total / 1000 / steps  # the profiler counts microseconds
        return {"operator": event.key, "calls_per_step": event.count / steps,
                "self_ms_per_step": ms, "pct_of_step": 100 * ms / step_ms}

    ranges = {e.key: e.cpu_time_total / 1000 / steps for e in events if e.key in PROFILE_PHASES}
    phases = [phase_row(name, within, ranges.get(name, 0.0))  # no n-gram tables: no hashing
              for name, within in PROFILE_PHASES.items()]
    rest = step_ms - sum(p["ms_per_step"] for p in phases if p["part_of"] == "step")
    phases += [phase_row("Python and other", "step", rest), phase_row("step", None, step_ms)]
    busiest = sorted((e for e in events if not e.is_user_annotation),
                     key=lambda e: e.self_cpu_time_total, reverse=True)
    return phases, [operator_row(e) for e in busiest[:PROFILE_OPERATORS]], seconds


# config.py's default model itself (not the reference shape), dense and sparse updates of
# its n-gram tables: the step users run, against the arithmetic bound (MFU).
DEFAULT_MODEL_VARIANTS = {"dense tables": {}, "sparse_table_updates": {"sparse_table_updates": True}}


def bench_training(device, scale):
    """ms per optimizer step of the reference shape with config.py's recipe (the
    Trainer's own step: forward, backward, clipping, Muon + AdamW), single/parallel
    stream x fp32/bf16 autocast, and of config.py's default model with dense and sparse
    table updates, all interleaved; then the default model's step under torch.profiler
    (default_model_profile). Text windows: which n-gram rows a step touches depends on
    the text (sparse updates)."""
    data = np.frombuffer(dummy_corpus_text(target_bytes=256 * 1024).encode("utf-8"),
                         dtype=np.uint8)
    steps, configs = {}, {}

    def add(key, overrides):
        config = check_config({**CONFIG_V3, **overrides})
        trainer = build_training(config, data, device)
        batch = trainer.train_dataset.__getitems__(range(config["batch_size"]))
        steps[key] = seconds_of(lambda t=trainer, b=batch: t.train_step([b]), device)
        configs[key] = (config, count_parameters(trainer.raw_model))

    for arch, parallel in ARCHITECTURES.items():
        for precision, dtype in PRECISIONS.items():
            add((arch, precision), {**REFERENCE_SHAPE, "use_parallel_stream_model": parallel,
                                    "use_amp": dtype is not None, "amp_dtype": "bfloat16"})
    for name, overrides in DEFAULT_MODEL_VARIANTS.items():
        for precision, dtype in PRECISIONS.items():
            add((f"defaults, {name}", precision), {**overrides, "use_amp": dtype is not None,
                                                   "amp_dtype": "bfloat16"})
    log(f"training: timing {len(steps)} variants")
    seconds = side_by_side(steps, scale["train_rounds"], scale["train_block"],
                           scale["train_warmup"])
    peak = matmul_peak(device, scale["matmul_size"], scale["matmul_rounds"])

    rows = []
    for (arch, precision), s in seconds.items():
        config, params = configs[arch, precision]
        rate, flops, mfu = training_rate(config, s, peak[precision])
        rows.append({"model": arch, "precision": precision, "params": params,
                     "ms_per_step": 1000 * s, "bytes_per_s": rate, "flops_per_byte": flops,
                     "mfu_pct": mfu, "vs_nanogpt": ratio(rate, NANOGPT["bytes_per_s"])})
    rows.append({"model": "nanoGPT (reference)", "precision": "fp32", "params": None,
                 "ms_per_step": NANOGPT["ms_per_step"], "bytes_per_s": NANOGPT["bytes_per_s"],
                 "flops_per_byte": None, "mfu_pct": None, "vs_nanogpt": 1.0})
    rate = {(r["model"], r["precision"]): r["bytes_per_s"] for r in rows}
    comparisons = [comparison(f"bf16 vs fp32, {arch}", "bytes_per_s", rate[arch, "bf16"],
                              rate[arch, "fp32"]) for arch in ARCHITECTURES]
    comparisons += [comparison(f"sparse vs dense table updates, defaults, {p}", "bytes_per_s",
                               rate["defaults, sparse_table_updates", p],
                               rate["defaults, dense tables", p]) for p in PRECISIONS]
    comparisons += [comparison(f"parallel vs single-stream, {p}", "bytes_per_s",
                               rate["parallel-stream", p], rate["single-stream", p])
                    for p in PRECISIONS]
    comparisons.append(comparison("single-stream fp32 vs nanoGPT", "bytes_per_s",
                                  rate["single-stream", "fp32"], NANOGPT["bytes_per_s"]))
    targets = [check_target("training bf16 / fp32 speed, single-stream",
                            ratio(rate["single-stream", "bf16"], rate["single-stream", "fp32"]),
                            *TARGETS["train_bf16_vs_fp32"], "x"),
               check_target("training fp32 bytes/s, reference shape",
                            rate["single-stream", "fp32"], *TARGETS["train_fp32_bytes_per_s"],
                            "bytes/s")]
    matmul = [{"precision": p, "size": scale["matmul_size"], "gflop_per_s": f / 1e9}
              for p, f in peak.items()]
    profile = default_model_profile(data, device, scale, peak, seconds)
    return {"rows": rows, "comparisons": comparisons, "matmul_peak": matmul, **profile}, targets


def default_model_profile(data, device, scale, peak, seconds):
    """The training section's profile tables: config.py's default model in each precision
    under torch.profiler (training_profile), by phase and by operator, and its step's time
    under the profiler against `seconds`, the same step timed without it."""
    tables = {"profile_step": [], "profile_by_phase": [], "profile_by_operator": []}
    for precision, dtype in PRECISIONS.items():
        log(f"training: profiling config.py's defaults, {precision}")
        config = model_config(use_amp=dtype is not None, amp_dtype="bfloat16")
        phases, operators, s = training_profile(config, data, device, scale["train_warmup"],
                                                scale["profile_steps"])
        rate, _, mfu = training_rate(config, s, peak[precision])
        tables["profile_step"].append({
            "precision": precision, "steps": scale["profile_steps"], "ms_per_step": 1000 * s,
            "unprofiled_ms_per_step": 1000 * seconds["defaults, dense tables", precision],
            "bytes_per_s": rate, "mfu_pct": mfu})
        tables["profile_by_phase"] += [{"precision": precision, **p} for p in phases]
        tables["profile_by_operator"] += [{"precision": precision, **o} for o in operators]
    return tables


# =============================================================================
# Section: quality (--only quality)
# Validation bits per byte after a fixed wall-clock training budget: config.py's
# recipe and its variants, the seed recipe and (--quality-ablation) each change to
# it alone, (--recipe-candidates) the defaults with each candidate change, and
# (--parallel-designs) the parallel-stream designs and longer windows.
# =============================================================================


# The recipe config.py's defaults held before the modern one (issue 10), as overrides of
# the defaults: where the ablation of the quality section starts. On a CPU with fast bf16
# it trained in bf16 (amp "auto" still picks that there).
SEED_RECIPE = {
    "optimizer_type": "AdamW", "learning_rate": 3e-3, "lr_scheduler_eta_min": 1e-4,
    "scheduler_type": "CosineAnnealingLR", "lr_warmup_steps": 50,
    "positional_encoding_type": "sinusoidal", "norm_type": "layernorm", "qk_norm": False,
    "ffn_activation": "gelu", "zero_init_output_projections": False, "logit_softcap": 0.0,
    "embedding_dim": 160, "attention_d_model": 160, "attention_num_heads": 4,
    "num_attention_layers": 2, "batch_size": 16, "sequence_length": 64, "data_stride": 1,
    "ngram_orders": [], "smear_previous_byte": False, "embeddings_into_every_layer": False,
    "value_embeddings": False,
}
# Each change tried on the seed recipe, alone: (overrides, adopted into config.py). The
# seed recipe with every adopted change is config.py's defaults (tests/test_bench.py).
RECIPE_CHANGES = {
    "Muon for the layer matrices": ({"optimizer_type": "Muon"}, True),
    "rotary positions": ({"positional_encoding_type": "rotary"}, True),
    "QK-norm": ({"qk_norm": True}, True),
    "windows every 64 bytes, not every byte": ({"data_stride": 64}, True),
    "hashed 2- to 6-byte embeddings": ({"ngram_orders": [2, 3, 4, 5, 6]}, True),
    "wsd schedule": ({"scheduler_type": "wsd"}, False),
    "zero-init output projections": ({"zero_init_output_projections": True}, False),
    "RMSNorm": ({"norm_type": "rmsnorm"}, False),
    "ReLU²": ({"ffn_activation": "relu2"}, False),
    "SwiGLU": ({"ffn_activation": "swiglu"}, False),
    "logit soft-cap 15": ({"logit_softcap": 15.0}, False),
}


# Issue 31's candidate changes, most from published small-model recipes (modded-nanogpt),
# tried on config.py's defaults (--recipe-candidates), each alone and all together:
# (overrides, adopted into config.py).
CANDIDATE_CHANGES = {
    "smear": ({"smear_previous_byte": True}, False),
    "embeddings into every layer": ({"embeddings_into_every_layer": True}, False),
    "value embeddings": ({"value_embeddings": True}, False),
    "smear, every-layer and value embeddings": ({"smear_previous_byte": True,
                                                  "embeddings_into_every_layer": True,
                                                  "value_embeddings": True}, False),
    # issue 31, item 2: larger n-gram tables (BLT: what pays at scale), whose optimizer
    # step sparse updates keep from growing with them
    "32,768 buckets, sparse table updates": ({"ngram_buckets": 32768,
                                              "sparse_table_updates": True}, False),
}


# Longer windows with the bytes per step held equal (64 x 16): single vs parallel stream.
LONG_WINDOWS = {256: 4, 1024: 1}  # window -> batch_size
PARALLEL_GAIN_BPB = 0.03  # the parallel stream must beat the single stream by this much


def prepare_corpus(path, workdir):
    """The corpus at `path` (a .txt file or a folder of them) as a uint8 array, processed
    by DataProcessor into a cache under `workdir`; the user's files are only read."""
    data_dir = path
    if os.path.isfile(path):
        data_dir = os.path.join(workdir, "corpus")
        os.makedirs(data_dir)
        link = os.path.join(data_dir, "corpus.txt")  # DataProcessor reads *.txt files
        try:
            os.symlink(os.path.abspath(path), link)
        except OSError:  # no symlinks here (Windows without the privilege)
            shutil.copyfile(path, link)
    config = model_config(data_dir=data_dir, generate_dummy_data_if_empty=False,
                          processed_data_dir=os.path.join(workdir, "processed"))
    with contextlib.redirect_stdout(sys.stderr):
        return DataProcessor(config).prepare()


def validation_bits_per_byte(model, data, config, device, max_windows=None, batch_size=64):
    """(all-positions, last-byte) bits per byte, the same way for every model: the
    evaluator over non-overlapping windows of sequence_length of the validation split,
    all of them or `max_windows` evenly spread."""
    length = config["sequence_length"]
    val = ByteSequenceDataset(data, length, length, "val", config["val_split_ratio"],
                              config.get("val_split_max_bytes"))
    starts = val.window_starts(evenly_spread(len(val), max_windows))
    totals = score_windows(model, data, starts, length, device, batch_size=batch_size)
    return totals.bits_per_byte, bits_per_byte(totals.last_byte_nats)


def quality_run(config, data, device, eval_windows):
    """Train `config` with the Trainer until its time budget ends, then evaluate."""
    trainer = build_training(config, data, device)
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer's log is progress, not report
        summary = trainer.train()
    val_bpb, last_byte_bpb = validation_bits_per_byte(trainer.raw_model, data, config, device,
                                                      eval_windows)
    bytes_per_step = config["batch_size"] * config["sequence_length"]
    return {"params": count_parameters(trainer.raw_model), "steps": summary["steps"],
            "train_s": summary["elapsed_seconds"],
            "bytes_per_s": summary["steps"] * bytes_per_step / summary["elapsed_seconds"],
            "val_bpb": val_bpb, "last_byte_bpb": last_byte_bpb}


def quality_config(name, seconds, device, workdir, **overrides):
    """config.py's defaults (the recipe: one definition) with `overrides`, trained for
    `seconds` with nothing else on the way (no checkpoints, samples or validations)."""
    return model_config(**overrides, max_train_minutes=seconds / 60, max_steps=None,
                        num_epochs=1000, checkpoint_dir=os.path.join(workdir, name),
                        test_every_batches=0, print_every=200, metrics_every=200,
                        validate_and_checkpoint_best_every_batches=10**9,
                        checkpoint_every_batches=10**9, eval_max_batches=1, device=str(device))


def distinct_runs(variants, seconds, device, workdir):
    """{label: (names, config)} of `variants` ({name: overrides}), each trained for
    `seconds` (quality_config): variants with the same configuration are one run, labelled
    with their names joined by " = ", in the order they first appear."""
    runs = {}  # configuration (as JSON) -> (names, config)
    for name, overrides in variants.items():
        config = quality_config(name, seconds, device, workdir, **overrides)
        key = json.dumps({k: v for k, v in config.items() if k != "checkpoint_dir"},
                         sort_keys=True)
        runs.setdefault(key, ([], config))[0].append(name)
    return {" = ".join(names): (names, config) for names, config in runs.values()}


def chosen_variants(variants, names, first):
    """`variants` with only the one named `first` and those in `names` (all of them when
    None), in their order; `first` stays first, since the section's targets and most of
    its comparisons are read against it."""
    if not names:
        return variants
    return {name: overrides for name, overrides in variants.items()
            if name == first or name in names}


def quality_variants(ablation, parallel_designs=False, candidates=False):
    """{name: overrides of config.py's defaults} of the quality section's runs."""
    variants = {
        "best": {},
        "single-stream": {"use_parallel_stream_model": False},
        "parallel-stream": {"use_parallel_stream_model": True},
        "all_positions": {"training_objective": "all_positions"},
        "last_byte": {"training_objective": "last_byte"},
        "seed recipe": SEED_RECIPE,
    }
    if ablation:
        variants.update({f"seed + {name}": {**SEED_RECIPE, **overrides}
                         for name, (overrides, _) in RECIPE_CHANGES.items()})
    if candidates:
        variants.update({f"best + {name}": overrides
                         for name, (overrides, _) in CANDIDATE_CHANGES.items()})
        variants["best + every candidate"] = {key: value for overrides, _ in
                                              CANDIDATE_CHANGES.values()
                                              for key, value in overrides.items()}
    if parallel_designs:
        variants.update({f"parallel: {name}": {**PARALLEL_BASE, **overrides}
                         for name, overrides in PARALLEL_DESIGNS.items()})
        for window, batch_size in LONG_WINDOWS.items():
            shape = {"sequence_length": window, "data_stride": window, "batch_size": batch_size}
            variants[f"window {window}: single-stream"] = {
                **shape, "use_parallel_stream_model": False}
            variants[f"window {window}: parallel-stream"] = {
                **shape, "use_parallel_stream_model": True}
    return variants


def bench_quality(device, scale, data_path, seconds, repeats, ablation=False,
                  parallel_designs=False, candidates=False, chosen=None):
    """Validation bits/byte after `seconds` of training: config.py's recipe, its single-
    and parallel-stream versions, its all_positions and last_byte versions, and the seed
    recipe; with `ablation`, the seed recipe with each change alone; with `candidates`,
    the defaults with each of CANDIDATE_CHANGES alone and with all of them; with
    `parallel_designs`, each of PARALLEL_DESIGNS, and both streams at LONG_WINDOWS. Runs
    with the same configuration are trained once; `repeats` runs of each, interleaved,
    give medians. `chosen`: only the runs of those names beside "best" (chosen_variants)."""
    variants = chosen_variants(quality_variants(ablation, parallel_designs, candidates), chosen,
                               "best")
    with tempfile.TemporaryDirectory(prefix="grug_bench_") as workdir:
        data = prepare_corpus(data_path, workdir)
        runs = distinct_runs(variants, seconds, device, workdir)
        log(f"quality: {len(runs)} distinct runs x {repeats} of {seconds:g} s")
        measures = {label: lambda c=config: quality_run(c, data, device, scale["eval_windows"])
                    for label, (names, config) in runs.items()}
        samples = side_by_side_samples(measures, repeats)

    rows, by_variant = [], {}
    for (names, config), (label, results) in zip(runs.values(), samples.items()):
        result = median_result(results)
        model = "parallel-stream" if config["use_parallel_stream_model"] else "single-stream"
        rows.append({"runs": label, "model": model, "window": config["sequence_length"],
                     "objective": config["training_objective"], **result,
                     "each_run_bpb": " ".join(f"{r['val_bpb']:.3f}" for r in results),
                     "vs_nanogpt": ratio(result["val_bpb"], NANOGPT["val_bpb"])})
        by_variant.update({name: result for name in names})
    rows.append({"runs": "nanoGPT (reference)", "model": "nanoGPT", "window": 64,
                 "objective": "all_positions",
                 "params": None, "steps": NANOGPT["steps"], "train_s": NANOGPT["seconds"],
                 "bytes_per_s": NANOGPT["steps"] * REFERENCE_SHAPE["batch_size"]
                 * REFERENCE_SHAPE["sequence_length"] / NANOGPT["seconds"],
                 "val_bpb": NANOGPT["val_bpb"], "last_byte_bpb": None, "each_run_bpb": None,
                 "vs_nanogpt": 1.0})
    return ({"seconds": seconds, "rows": rows, "comparisons": quality_comparisons(by_variant)},
            quality_targets(by_variant, seconds))


def quality_comparisons(by_variant):
    """The comparisons of the runs in `by_variant` (those of runs not trained: none)."""
    def versus(name, a, b, measure="val_bpb"):
        if a not in by_variant or b not in by_variant:
            return None
        return comparison(name, measure, by_variant[a][measure], by_variant[b][measure])

    objectives = "last_byte vs all_positions objective"
    found = [comparison("best vs nanoGPT", "val_bpb", by_variant["best"]["val_bpb"],
                        NANOGPT["val_bpb"]),
             versus("best vs the seed recipe", "best", "seed recipe"),
             versus("parallel vs single-stream", "parallel-stream", "single-stream"),
             versus(objectives, "last_byte", "all_positions"),
             versus(objectives, "last_byte", "all_positions", "last_byte_bpb")]
    found += [versus(f"{name} alone vs the seed recipe", name, "seed recipe")
              for name in by_variant if name.startswith("seed + ")]
    found += [versus(f"{name} vs best", name, "best")
              for name in by_variant if name.startswith("best + ")]
    found += [versus(f"{name} vs single-stream", name, "single-stream")
              for name in by_variant if name.startswith("parallel: ")]
    found += [versus(f"window {window}: parallel vs single-stream",
                     f"window {window}: parallel-stream", f"window {window}: single-stream")
              for window in LONG_WINDOWS]
    return [c for c in found if c is not None]


def quality_targets(by_variant, seconds):
    """The targets of the runs in `by_variant` (the parallel stream's: only where both
    streams were trained)."""
    op, threshold = TARGETS["quality_bpb"]
    targets = [check_target(f"best config val bits/byte in {seconds:g} s",
                            by_variant["best"]["val_bpb"], op, threshold, "bits/byte")]
    if "single-stream" in by_variant and "parallel-stream" in by_variant:
        single = by_variant["single-stream"]["val_bpb"]
        targets.append(check_target(
            f"parallel-stream val bits/byte in {seconds:g} s (single-stream "
            f"{single:.3f} - {PARALLEL_GAIN_BPB})", by_variant["parallel-stream"]["val_bpb"],
            "<=", single - PARALLEL_GAIN_BPB, "bits/byte"))
    return targets


# =============================================================================
# Section: generation (--only generation)
# Bytes/s of the Predictor without the KV cache, with it eagerly, streamed and
# compiled, at growing contexts; 8 prompts at once, time to first byte, compile time
# and when compiling pays, and nanoGPT's sample.py shape; then what users get, against
# the seed's cached path.
# =============================================================================


GENERATION_CONTEXTS = (64, 256, 1024)
GENERATION_DESIGNS = {  # -> overrides of config.py's defaults
    "single-stream": {"use_parallel_stream_model": False},
    "parallel-stream": {"use_parallel_stream_model": True},
}
# Every other parallel design is also timed without the cache, eagerly and compiled
# (issue 11's 10x; issue 32's for the designs at patch ends); the one config.py's parallel
# keys already give is "parallel-stream" above.
PARALLEL_GENERATION_DESIGNS = {
    f"parallel: {name}": {**PARALLEL_BASE, **overrides}
    for name, overrides in PARALLEL_DESIGNS.items()
    if any(CONFIG_V3[key] != value for key, value in {**PARALLEL_BASE, **overrides}.items()
           if key != "use_parallel_stream_model")}
# Issue 32's window of attention, timed like the parallel designs (its KV cache's 10x)
WINDOWED_GENERATION_DESIGNS = {
    "single-stream, attention window 256": {"use_parallel_stream_model": False,
                                            "attention_window": 256}}


GENERATION_SETTINGS = dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=0)


def printable_prompt(length, seed=0):
    rng = random.Random(seed)  # local: the global RNG is not touched
    return bytes(rng.randrange(32, 127) for _ in range(length))


def generation_speed(predictor, prompts, new_bytes, streamed=False, repeats=1):
    """Total bytes per second of one generate_batch (generate with streaming, if
    `streamed`) of `new_bytes` per prompt, best of `repeats`, after a warm-up (which
    compiles, where the predictor compiles). The prompt pass is counted: a user waits
    for it too."""
    device = predictor.device

    def run(count):
        if streamed:
            predictor.generate(prompts[0], max_new_bytes=count, on_text=lambda piece: None,
                               **GENERATION_SETTINGS)
        else:
            predictor.generate_batch(prompts, max_new_bytes=count, **GENERATION_SETTINGS)
    run(2)
    seconds = []
    for _ in range(repeats):
        seconds.append(seconds_of(lambda: run(new_bytes), device)())
    return len(prompts) * new_bytes / min(seconds)


def first_call_seconds(predictor, prompt, new_bytes):
    """Seconds of a first generate_batch call (for a compiled predictor: the compile)."""
    return seconds_of(lambda: predictor.generate_batch([prompt], max_new_bytes=new_bytes,
                                                       **GENERATION_SETTINGS),
                      predictor.device)()


def compile_seconds_of(predictor):
    """Seconds of a compiled predictor's first call, one that runs every program a long
    call needs: the parallel stream has one step with the patch stream and one without,
    so its prompt is followed by enough bytes to complete a patch (else that program
    would compile inside a timed round). The prompt fills at most half the window: a
    window that slides at the first byte is refilled with that byte, and no step runs."""
    model = predictor.model
    return first_call_seconds(predictor, printable_prompt(min(64, model.context_length // 2)),
                              model.agg_stride + 1 if model.parallel else 2)


def generation_models(device, designs, programs):
    """{name: (model, config)}: the default model at a 1024-byte window with each of
    `designs` (untrained weights: speed does not depend on them), keeping compiled
    programs under `programs` (a fresh folder: a program kept by an earlier run would
    leave the compile time untimed)."""
    models = {}
    for name, overrides in designs.items():
        config = model_config(**overrides, sequence_length=max(GENERATION_CONTEXTS),
                              checkpoint_dir=programs)
        seed_everything(config["seed"])
        models[name] = ByteLLM_GrugV3(config).to(device).eval(), config
    return models


def generation_designs(choice):
    """The designs the generation section times: config.py's two streams ("main"), or
    those, every other parallel design and the windowed single stream ("all")."""
    if choice != "all":
        return dict(GENERATION_DESIGNS)
    return {**GENERATION_DESIGNS, **PARALLEL_GENERATION_DESIGNS, **WINDOWED_GENERATION_DESIGNS}


def bench_generation(device, scale, designs):
    """Bytes/s of the Predictor at contexts growing to 64, 256 and 1024 bytes: without the
    KV cache, with it eagerly (also streamed: one byte read back and printed per step, as
    an interactive user reads it), and compiled; then 8 prompts at once, time to first
    byte of a 1,000-byte prompt, compile time, and nanoGPT's sample.py shape. `designs`
    (generation_designs) are the models timed; those of GENERATION_DESIGNS get every
    figure. Then what users get (bench_user_generation)."""
    import torch._dynamo  # here, not at the top: loading it takes seconds
    # torch.compile (a GPU's step) keeps recompile_limit graphs of the step per process;
    # the predictors timed side by side need more (each model, batch size and patch_due)
    with (tempfile.TemporaryDirectory(prefix="grug_bench_programs_") as programs,
          torch._dynamo.config.patch(recompile_limit=64)):
        result, targets = timed_generation(device, scale, designs, programs)
    users, found = bench_user_generation(device, scale)
    return {**result, **users}, targets + found


def timed_generation(device, scale, designs, programs):
    new_bytes = {c: min(c // 4, scale["gen_max_new_bytes"]) for c in GENERATION_CONTEXTS}
    compiled = "always" if scale["gen_compile"] else "never"
    measures, compile_seconds = {}, {}
    for name, (model, config) in generation_models(device, designs, programs).items():
        paths = {"uncached": Predictor(model, device, config, use_kv_cache=False),
                 "eager": Predictor(model, device, config, compile="never"),
                 "compiled": Predictor(model, device, config, compile=compiled)}
        if name in GENERATION_DESIGNS:  # the others share their streaming code
            paths["streamed"] = paths["eager"]
            compile_seconds[name] = compile_seconds_of(paths["compiled"])
        for context in GENERATION_CONTEXTS:
            prompt = [printable_prompt(context - new_bytes[context])]
            for path, predictor in paths.items():
                measures[name, context, path] = (
                    lambda p=predictor, q=prompt, n=new_bytes[context], s=path == "streamed":
                    generation_speed(p, q, n, streamed=s))
        if name in GENERATION_DESIGNS:
            batch = [printable_prompt(1024 - new_bytes[1024], seed) for seed in range(8)]
            measures[name, "batch of 8"] = (lambda p=paths["compiled"], q=batch:
                                            generation_speed(p, q, new_bytes[1024]))
    log(f"generation: timing {len(measures)} settings")
    speed = side_by_side(measures, scale["gen_rounds"])
    rows = [generation_row(name, context, new_bytes[context], speed)
            for name in designs for context in GENERATION_CONTEXTS]
    extra = generation_extras(device, scale, compile_seconds, speed, programs)
    return {"rows": rows, **extra}, generation_targets(rows, extra["batches"])


def cached_bytes_per_s(eager, compiled):
    """What the cached path gives a user: the faster of eager and compiled (if timed)."""
    return max(eager, compiled or 0)


def generation_row(name, context, new_bytes, speed):
    eager, compiled = speed[name, context, "eager"], speed.get((name, context, "compiled"))
    uncached, cached = speed[name, context, "uncached"], cached_bytes_per_s(eager, compiled)
    return {"model": name, "context": context, "new_bytes": new_bytes,
            "uncached_bytes_per_s": uncached,
            "streamed_bytes_per_s": speed.get((name, context, "streamed")),
            "eager_bytes_per_s": eager,
            "compiled_bytes_per_s": compiled, "compiled_vs_eager": ratio(compiled, eager),
            "cached_vs_uncached": ratio(cached, uncached), "ms_per_byte": 1000 / cached}


def generation_extras(device, scale, compile_seconds, speed, programs):
    """Batches, time to first byte, compile time, and nanoGPT's sample.py shape."""
    batches = [{"model": name, "prompts": 8, "bytes_per_s": speed[name, "batch of 8"],
                "one_prompt_bytes_per_s": speed[name, 1024, "compiled"],
                "batch_vs_one": ratio(speed[name, "batch of 8"], speed[name, 1024, "compiled"])}
               for name in GENERATION_DESIGNS]
    model, config = generation_models(device, GENERATION_DESIGNS, programs)["single-stream"]
    eager = Predictor(model, device, config, compile="never")
    first_call_seconds(eager, printable_prompt(1000), 1)  # warm-up
    latency = [{"what": "time to first byte, 1,000-byte prompt (eager)",
                "seconds": first_call_seconds(eager, printable_prompt(1000), 1), "bytes": None}]
    if scale["gen_compile"]:  # without compiling, these would time eager first calls
        latency += [{"what": f"compile time of the decode step, {name}", "seconds": seconds,
                     "bytes": None} for name, seconds in compile_seconds.items()]
        latency += [{"what": f"bytes after which compiling pays, {name} (1024 context)",
                     "seconds": None, "bytes": break_even_bytes(
                         seconds, speed[name, 1024, "eager"], speed[name, 1024, "compiled"])}
                    for name, seconds in compile_seconds.items()]
    nano = check_config({**CONFIG_V3, **REFERENCE_SHAPE, "checkpoint_dir": programs})
    seed_everything(nano["seed"])
    small = ByteLLM_GrugV3(nano).to(device).eval()
    prompt = [printable_prompt(64 - new) for new in [min(16, scale["gen_max_new_bytes"])]]
    shape = {f"ours, {path}": generation_speed(
        Predictor(small, device, nano, compile=mode), prompt, len(prompt[0]) // 3 or 1)
        for path, mode in (("eager", "never"),
                           ("compiled", "always" if scale["gen_compile"] else "never"))}
    shape["nanoGPT sample.py (reference)"] = NANOGPT["sample_bytes_per_s"]
    return {"batches": batches, "latency": latency,
            "nanogpt_shape": [{"path": k, "bytes_per_s": v} for k, v in shape.items()]}


def break_even_bytes(compile_seconds, eager_bytes_per_s, compiled_bytes_per_s):
    """Bytes a call must generate for compiling first to finish sooner than eager
    decoding (predictor.COMPILE_PAYS_AFTER_BYTES comes from this); None if it never does."""
    saved_per_byte = 1 / eager_bytes_per_s - 1 / compiled_bytes_per_s
    return round(compile_seconds / saved_per_byte) if saved_per_byte > 0 else None


def generation_targets(rows, batches):
    op, threshold = TARGETS["kv_cache_speedup_1024"]
    targets = [check_target(f"KV cache speed-up at 1024, {row['model']}",
                            row["cached_vs_uncached"], op, threshold, "x")
               for row in rows if row["context"] == 1024]
    op, threshold = TARGETS["compiled_vs_eager_1024"]
    targets += [check_target(f"compiled vs eager decoding at 1024, {row['model']}",
                             row["compiled_vs_eager"], op, threshold, "x")
                for row in rows if row["context"] == 1024 and row["model"] in GENERATION_DESIGNS]
    op, threshold = TARGETS["batch_of_8_vs_one"]
    targets += [check_target(f"8 prompts vs one, total bytes/s, {batch['model']}",
                             batch["batch_vs_one"], op, threshold, "x") for batch in batches]
    return targets


# -----------------------------------------------------------------------------
# What users get (issue 30): config.py's default model as `python3 main.py` generates
# with it, against the seed's cached path in the same process, round by round.
# -----------------------------------------------------------------------------


SEED_COMMIT = "6c4571e"  # the seed's code: its cached path is issue 30's reference
SEED_MODULES = ("model_components", "model", "utils", "config", "predictor")  # imports first
USER_WINDOWS = {64: 20, 1024: 1000}  # window -> prompt bytes
USER_STREAMS = {"single": False, "parallel": True}  # -> use_parallel_stream_model
FIRST_BYTE_KEPT = "first decode-step byte of a later process, program kept"


def seed_code(folder):
    """{name: module} of the seed's SEED_MODULES, written from git history into `folder`;
    None where this copy has no history (a plain copy of the files)."""
    for name in SEED_MODULES:
        try:
            shown = subprocess.run(["git", "-C", REPO, "show", f"{SEED_COMMIT}:{name}.py"],
                                   capture_output=True)
        except OSError:  # no git installed
            shown = None
        if shown is None or shown.returncode != 0:
            log(f"generation: no git history with {SEED_COMMIT} here: the seed's rows "
                "are skipped")
            return None
        Path(folder, f"{name}.py").write_bytes(shown.stdout)
    return modules_from(folder, SEED_MODULES)


def modules_from(folder, names):
    """`names` imported from `folder`, apart from this process's own modules of the same
    names: while they import, sys.modules holds none of ours (so `from model import ...`
    in the seed's utils finds the seed's model), and ours are put back after."""
    ours = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    sys.path.insert(0, folder)
    try:
        importlib.invalidate_caches()
        return {name: importlib.import_module(name) for name in names}
    finally:
        sys.path.remove(folder)
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(ours)


def seed_predictor(seed, window, parallel, device):
    """The seed's Predictor of the seed's default model at `window`."""
    config = dict(seed["config"].CONFIG_V3, sequence_length=window,
                  use_parallel_stream_model=parallel)
    torch.manual_seed(0)
    model = seed["model"].ByteLLM_GrugV3(config).to(device).eval()
    return seed["predictor"].Predictor(model, device, config)


def default_predictor(window, parallel, device, folder, compile="auto"):
    """Our Predictor of config.py's default model at `window`, as main.py builds it, with
    checkpoint_dir `folder` (fresh: no program kept there, so "auto" decodes eagerly)."""
    config = model_config(sequence_length=window, use_parallel_stream_model=parallel,
                          checkpoint_dir=folder, generation_compile=compile)
    seed_everything(config["seed"])
    return Predictor(ByteLLM_GrugV3(config).to(device).eval(), device, config)


def generation_rate(predictor, prompt, new_bytes):
    """A measure: bytes/s of one generate() of `new_bytes` with the config's settings."""
    seconds = seconds_of(lambda: predictor.generate(prompt, max_new_bytes=new_bytes),
                         predictor.device)
    return lambda: new_bytes / seconds()


def paired_rounds(measure_a, measure_b, rounds):
    """paired_summary of `rounds` rounds of one result of each measure (b: None to time
    a alone), the order swapped every round so that neither always runs second."""
    samples = {"a": [], "b": []}
    measures = {"a": measure_a, "b": measure_b}
    for number in range(rounds):
        for name in ("a", "b") if number % 2 == 0 else ("b", "a"):
            if measures[name] is not None:
                samples[name].append(measures[name]())
    return paired_summary(samples["a"], samples["b"] or None)


def paired_summary(a, b):
    """The median of each and the median (and range) of the per-round ratios a / b. A
    round's two timings share that moment's load on the machine, so their ratio is
    steadier than a ratio of medians taken over different moments (b None: a alone)."""
    ratios = [x / y for x, y in zip(a, b)] if b else []
    return {"a": statistics.median(a), "b": statistics.median(b) if b else None,
            "ratio": statistics.median(ratios) if ratios else None,
            "ratio_min": min(ratios, default=None), "ratio_max": max(ratios, default=None),
            "rounds": len(a)}


def bench_user_generation(device, scale):
    """What users get: the default path (config.py's generation, "auto" with no program
    kept: eager) at windows 64 and 1024 and the compiled steady state at 1024, both
    streams, each paired round by round with the seed's cached path; then the first byte
    of a new process with and without a kept program."""
    with tempfile.TemporaryDirectory(prefix="grug_bench_users_") as folder:
        for part in ("seed", "default", "compiled", "worker"):
            os.makedirs(os.path.join(folder, part))
        seed = seed_code(os.path.join(folder, "seed"))
        rows = versus_seed_rows(device, scale, seed, folder)
        first_byte = first_byte_rows(device, scale, os.path.join(folder, "worker"))
    why = "no git history" if seed is None else "quick mode"
    return ({"versus_seed": rows, "first_byte": first_byte},
            user_targets(rows, first_byte, why))


def user_paths(window, scale, folder):
    """{path: (checkpoint_dir, generation_compile, prompt bytes, new bytes)} at `window`."""
    paths = {"default path": (os.path.join(folder, "default"), "auto", USER_WINDOWS[window],
                              scale["gen_user_new_bytes"])}
    if window == max(USER_WINDOWS) and scale["gen_compile"]:  # compiling takes a while
        # the generation rows' shape at 1024: prompt and new bytes fill the window, no slide
        new_bytes = min(window // 4, scale["gen_max_new_bytes"])
        paths["compiled steady state"] = (os.path.join(folder, "compiled"), "always",
                                          window - new_bytes, new_bytes)
    return paths


def versus_seed_rows(device, scale, seed, folder):
    rows = []
    for window in USER_WINDOWS:
        for stream, parallel in USER_STREAMS.items():
            reference = None if seed is None else seed_predictor(seed, window, parallel, device)
            for path, (programs, compile, prompt_bytes, new_bytes) in user_paths(
                    window, scale, folder).items():
                prompt = printable_prompt(prompt_bytes)
                ours = generation_rate(default_predictor(window, parallel, device, programs,
                                                         compile), prompt, new_bytes)
                # each with its own config's settings: what `python3 main.py` gives its user
                theirs = None if seed is None else generation_rate(reference, prompt, new_bytes)
                for measure in filter(None, (ours, theirs)):
                    measure()  # a warm-up (for the compiled path: the compile)
                log(f"generation: {path}, window {window}, {stream} stream")
                summary = paired_rounds(ours, theirs, scale["gen_user_rounds"])
                rows.append({"path": path, "window": window, "stream": stream,
                             "prompt_bytes": prompt_bytes, "new_bytes": new_bytes,
                             "rounds": summary["rounds"], "ours_bytes_per_s": summary["a"],
                             "seed_bytes_per_s": summary["b"], "vs_seed": summary["ratio"],
                             "vs_seed_min": summary["ratio_min"],
                             "vs_seed_max": summary["ratio_max"]})
    return rows


def save_default_model(folder):
    """config.py's default model (random weights, its seed) saved as main.py's training
    saves its best checkpoint in checkpoint_dir `folder`."""
    config = model_config(checkpoint_dir=folder)
    seed_everything(config["seed"])
    save_checkpoint({"format_version": FORMAT_VERSION, "config": config, "step": 0,
                     "model_state": ByteLLM_GrugV3(config).state_dict()},
                    checkpoint_path(config, "best"))


def generation_worker(mode, checkpoint_dir, device):
    """The hidden --generation-worker mode, a fresh process as `python3 main.py` after
    training: loads the model saved in checkpoint_dir as main.py does, then "first-byte"
    times config.py's generation (compile "auto": it decodes through a program kept on
    disk) from the model loaded to the first byte of a decode step, and "compile"
    compiles the step ("always"), keeping its programs under checkpoint_dir (an error
    where it did not keep every program of one prompt). Prints {"seconds"} as JSON."""
    device = resolve_device(device)
    config = model_config(checkpoint_dir=checkpoint_dir,
                          generation_compile="always" if mode == "compile" else "auto")
    with contextlib.redirect_stdout(sys.stderr):
        model = load_model_for_prediction(config, device)
    if mode == "compile":
        predictor = Predictor(model, device, config)
        seconds = compile_seconds_of(predictor)
        if device.type in AHEAD_OF_TIME_DEVICE_TYPES and not predictor._programs_kept_for(1):
            raise RuntimeError("the compiling call did not keep every program of one prompt "
                               f"in {os.path.join(checkpoint_dir, PROGRAM_FOLDER)}: the "
                               "kept-program row would time uncompiled decoding")
    else:
        # Two bytes: the first comes from the prompt's pass, the second from the first
        # decode step, which loads the kept program; a user waits for both.
        began = time.perf_counter()
        Predictor(model, device, config).generate(printable_prompt(USER_WINDOWS[64]),
                                                  max_new_bytes=2)
        synchronize(device)
        seconds = time.perf_counter() - began
    print(json.dumps({"seconds": seconds}))


def run_generation_worker(mode, checkpoint_dir, device):
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--generation-worker",
                           mode, checkpoint_dir, str(device)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"generation worker ({mode}) failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def first_byte_rows(device, scale, folder):
    """Seconds from the default model loaded to its first byte in a new process: with no
    program kept, and (not in quick mode: compiling takes a while) after a process that
    compiled the step and kept its programs."""
    save_default_model(folder)
    rows = [{"what": "first decode-step byte of a new process, no program kept",
             "seconds": run_generation_worker("first-byte", folder, device)}]
    if scale["gen_compile"]:
        rows += [{"what": "compile in a new process (generation_compile=\"always\")",
                  "seconds": run_generation_worker("compile", folder, device)},
                 {"what": FIRST_BYTE_KEPT,
                  "seconds": run_generation_worker("first-byte", folder, device)}]
    return rows


def user_target(name, key, measured, unit, why):
    """check_target of TARGETS[key]; a figure not measured (`why`) neither passes nor fails."""
    target = check_target(name, measured, *TARGETS[key], unit)
    if measured is None:
        target.update(target=f"{name} (not measured: {why})", passed=None)
    return target


def user_targets(rows, first_byte, why):
    found = {(row["path"], row["window"], row["stream"]): row["vs_seed"] for row in rows}
    wanted = [("default path", window, "default_vs_seed") for window in USER_WINDOWS]
    wanted.append(("compiled steady state", max(USER_WINDOWS), "compiled_vs_seed_1024"))
    targets = [user_target(f"{path} vs the seed's cached path, window {window}, {stream} stream",
                           key, found.get((path, window, stream)), "x", why)
               for path, window, key in wanted for stream in USER_STREAMS]
    kept = [row["seconds"] for row in first_byte if row["what"] == FIRST_BYTE_KEPT]
    targets.append(user_target("first decode-step byte of a later process with the program "
                               "kept, from the model loaded", "first_byte_kept_program_s",
                               kept[0] if kept else None, "s", "quick mode"))
    return targets


# =============================================================================
# Section: data (--only data)
# DataProcessor MB/s on a generated corpus, in a child process of its own so that its
# peak memory can be set beside that of a process that only imported the same modules.
# =============================================================================


DATA_FILES = 8  # files of the generated corpus of the data section


def peak_rss_bytes():
    """Peak resident memory of this process. On Linux VmHWM: ru_maxrss would also count
    the parent's peak, which Linux carries over through fork and exec."""
    with contextlib.suppress(OSError):
        with open("/proc/self/status", encoding="utf-8") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # "VmHWM:  123456 kB"
    import resource  # Unix only
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes, else KiB


def write_generated_corpus(folder, total_bytes, files=DATA_FILES):
    """About `total_bytes` of generated text (with multi-byte UTF-8) in `files` files.
    Returns the exact size. Whole copies of one block are written, so no file ends
    inside a character."""
    block = dummy_corpus_text(target_bytes=MB).encode("utf-8")
    copies = math.ceil(total_bytes / files / len(block))
    for i in range(files):
        with open(os.path.join(folder, f"part{i:02d}.txt"), "wb") as file:
            for _ in range(copies):
                file.write(block)
    return files * copies * len(block)


def data_worker(mode, corpus_dir, processed_dir):
    """The hidden --data-worker mode, run in a fresh process: with the same imports as a
    normal run, "baseline" does nothing and "process" builds the DataProcessor cache.
    Prints {"seconds", "peak_rss_bytes"} as JSON on stdout."""
    seconds = None
    if mode == "process":
        config = model_config(data_dir=corpus_dir, processed_data_dir=processed_dir,
                              force_reprocess_data=True, generate_dummy_data_if_empty=False)
        began = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            DataProcessor(config).prepare()
        seconds = time.perf_counter() - began
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak_rss_bytes()}))


def run_data_worker(mode, corpus_dir, processed_dir):
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--data-worker", mode,
                           corpus_dir, processed_dir], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"data worker ({mode}) failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_data(scale):
    """DataProcessor throughput on a generated corpus, and the peak RSS of the process
    that ran it beside that of a process that only imported the same modules."""
    with tempfile.TemporaryDirectory(prefix="grug_bench_data_") as workdir:
        corpus_dir = os.path.join(workdir, "corpus")
        processed_dir = os.path.join(workdir, "processed")
        os.makedirs(corpus_dir)
        size = write_generated_corpus(corpus_dir, scale["data_bytes"])
        log(f"data: processing {size / MB:.0f} MB in a child process")
        result = side_by_side({mode: lambda m=mode: run_data_worker(m, corpus_dir, processed_dir)
                               for mode in ("baseline", "process")}, scale["data_rounds"])
        # What data_change_detection="content" adds to every start: hashing each file.
        hashing = side_by_side({"scan": seconds_of(lambda: scan_sources(Path(corpus_dir), True),
                                                   torch.device("cpu"))}, scale["data_rounds"])
    peak, baseline = result["process"]["peak_rss_bytes"], result["baseline"]["peak_rss_bytes"]
    row = {"corpus_mb": size / MB, "files": DATA_FILES,
           "seconds": result["process"]["seconds"],
           "mb_per_s": size / MB / result["process"]["seconds"],
           "peak_rss_mb": peak / MB, "baseline_rss_mb": baseline / MB,
           "increase_mb": (peak - baseline) / MB,
           "content_hash_mb_per_s": size / MB / hashing["scan"]}
    targets = [check_target("DataProcessor throughput", row["mb_per_s"],
                            *TARGETS["data_mb_per_s"], "MB/s"),
               check_target(f"DataProcessor peak RSS ({row['corpus_mb']:.0f} MB corpus)",
                            row["peak_rss_mb"], *TARGETS["data_peak_mb"], "MB")]
    return {"rows": [row]}, targets


# =============================================================================
# Section: long (--only long; not run by default)
# Long context on a large real corpus: each design and window trained for the same
# wall-clock budget, then scored on one fixed held-out slice with sliding windows of the
# model's own length, so a longer window is credited for the context it really sees.
# =============================================================================


LONG_HELDOUT_BYTES = MB  # the held-out slice every model is scored on
LONG_STRIDE_FRACTION = 4  # scoring windows overlap: stride = window / 4
LONG_BYTES_PER_STEP = 1024  # batch_size x window of every run, so each step sees as much text
LONG_GAIN_BPB = 0.10  # the best model must beat config.py's defaults by this much

# design -> (overrides of config.py's defaults, windows it is trained at); the batch comes
# from long_variants. Local attention only where the window is longer than its reach.
LONG_DESIGNS = {
    "single-stream": ({"use_parallel_stream_model": False}, (64, 256, 1024, 4096)),
    "single-stream, attention_window 256": (
        {"use_parallel_stream_model": False, "attention_window": 256}, (1024, 4096)),
    "parallel-stream": ({"use_parallel_stream_model": True}, (64, 256, 1024)),
    # The patch stream takes at most a window / 4 patches (English words with their space
    # average about 6 bytes): without a cap it runs on the window / 2 slots a view of
    # spacelike patches may need.
    "SpaceByte (spacelike patches <= 16, 2 patch layers of 256)": (
        {"use_parallel_stream_model": True, "max_patches_per_window": "window / 4",
         **parallel_design("at_boundaries", 2, 2, 256, 16, "spacelike")}, (256, 1024)),
    "SpaceByte, attention_window 256": (
        {"use_parallel_stream_model": True, "attention_window": 256,
         "max_patches_per_window": "window / 4",
         **parallel_design("at_boundaries", 2, 2, 256, 16, "spacelike")}, (1024, 4096)),
}


def long_variants(designs=None):
    """{name: overrides} of the long section's runs: config.py's defaults as they are,
    then every design at each of its windows, LONG_BYTES_PER_STEP bytes a step (one
    window a step where a window is longer)."""
    variants = {"defaults": {}}
    for design, (overrides, windows) in (designs or LONG_DESIGNS).items():
        for window in windows:
            variants[f"{design}, window {window}"] = {
                **overrides, "sequence_length": window, "data_stride": window,
                "batch_size": max(1, LONG_BYTES_PER_STEP // window)}
            if overrides.get("max_patches_per_window") == "window / 4":
                variants[f"{design}, window {window}"]["max_patches_per_window"] = window // 4
    return variants


def chosen_long_variants(names):
    """long_variants() with only config.py's defaults and the runs `names` (all of them
    when None)."""
    return chosen_variants(long_variants(), names, "defaults")


def longest_window():
    return max(window for _, windows in LONG_DESIGNS.values() for window in windows)


def heldout_span(data, config, size):
    """[begin, end) of the held-out slice: the start of the validation split, which no
    run trains on, far enough in that the longest window has its context inside it."""
    begin = split_point(len(data), config["val_split_ratio"], config["val_split_max_bytes"])
    begin += longest_window() + 1
    end = min(len(data), begin + size)
    if end - begin < size:
        skipped = longest_window() + 1
        raise UserError(f"--data: the validation split holds {max(0, end - begin):,} bytes "
                        f"past its first {skipped:,}; the long section needs {size:,} "
                        f"(give a larger corpus)")
    return begin, end


def heldout_bits_per_byte(model, data, span, window, device):
    """Bits per byte of the bytes in `span`, each predicted by sliding windows of `window`
    bytes at a stride of window / LONG_STRIDE_FRACTION that may start before the span."""
    begin, end = span
    plan = SlidingPlan(begin - window, end, window,
                       max(1, window // LONG_STRIDE_FRACTION))
    total, _ = score_text(model, data, plan, device, parts=[[begin, end]])
    return total.bits_per_byte


def long_run(config, data, span, device):
    trainer = build_training(config, data, device)
    with contextlib.redirect_stdout(sys.stderr):
        summary = trainer.train()
    window = config["sequence_length"]
    bytes_per_step = config["batch_size"] * window
    return {"params": count_parameters(trainer.raw_model), "steps": summary["steps"],
            "bytes_per_s": summary["steps"] * bytes_per_step / summary["elapsed_seconds"],
            "heldout_bpb": heldout_bits_per_byte(trainer.raw_model, data, span, window,
                                                 device)}


def bench_long(device, scale, data_path, seconds, repeats, heldout_bytes=LONG_HELDOUT_BYTES,
               variants=None):
    """Held-out bits/byte of config.py's defaults and of each LONG_DESIGNS design at each
    of its windows after `seconds` of training; `repeats` interleaved runs, medians."""
    variants = variants or long_variants()
    with tempfile.TemporaryDirectory(prefix="grug_bench_long_") as workdir:
        data = prepare_corpus(data_path, workdir)
        configs = {label: config for label, (_, config)
                   in distinct_runs(variants, seconds, device, workdir).items()}
        span = heldout_span(data, next(iter(configs.values())), heldout_bytes)
        log(f"long: {len(configs)} runs x {repeats} of {seconds:g} s; held-out slice "
            f"[{span[0]:,}, {span[1]:,}) of a {len(data) / MB:,.0f} MB corpus")
        samples = side_by_side_samples(
            {name: lambda c=config: long_run(c, data, span, device)
             for name, config in configs.items()}, repeats)
    rows = []
    for name, results in samples.items():
        config = configs[name]
        rows.append({"run": name,
                     "model": "parallel" if config["use_parallel_stream_model"] else "single",
                     "window": config["sequence_length"], **median_result(results),
                     "flops_per_byte": estimate_flops_per_byte(config),
                     "each_run_bpb": " ".join(f"{r['heldout_bpb']:.3f}" for r in results)})
    return ({"seconds": seconds, "heldout": {"begin": span[0], "end": span[1]}, "rows": rows},
            long_targets(rows))


def long_targets(rows):
    """The first row is config.py's defaults (its name may list the runs equal to it)."""
    defaults = rows[0]["heldout_bpb"]
    best = min(rows, key=lambda row: row["heldout_bpb"])
    targets = [check_target(f"best ({best['run']}) held-out bits/byte: defaults "
                            f"{defaults:.3f} - {LONG_GAIN_BPB}", best["heldout_bpb"], "<=",
                            defaults - LONG_GAIN_BPB, "bits/byte")]
    single = [row for row in rows if row["model"] == "single"]
    parallel = [row for row in rows if row["model"] == "parallel"]
    if single and parallel:
        best_single = min(row["heldout_bpb"] for row in single)
        best_parallel = min(parallel, key=lambda row: row["heldout_bpb"])
        targets.append(check_target(
            f"best parallel ({best_parallel['run']}) held-out bits/byte: best single "
            f"{best_single:.3f} - {PARALLEL_GAIN_BPB}", best_parallel["heldout_bpb"], "<=",
            best_single - PARALLEL_GAIN_BPB, "bits/byte"))
    return targets


# =============================================================================
# Section: scale (--only scale; not run by default)
# What each phase of a real run costs as the corpus grows.
# =============================================================================


# Runs main.py as `python3 main.py ARGS` does, then prints the process's peak resident
# memory (VmHWM, as peak_rss_bytes reads it) as its last line. It imports nothing else
# first, so the run's start-up is main.py's own.
RUN_MAIN = """
import atexit, os, runpy, sys
def peak():
    try:
        with open("/proc/self/status", encoding="utf-8") as status:
            line = next(l for l in status if l.startswith("VmHWM:"))
        print("bench: peak_rss_bytes", int(line.split()[1]) * 1024, flush=True)
    except (OSError, StopIteration):
        pass
atexit.register(peak)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""
# `import torch`, then torch._dynamo, which torch itself imports at the first optimizer
# step (or building a model on the meta device): both are PyTorch's own start-up.
IMPORT_TORCH = ("import time; t = time.perf_counter(); import torch; u = time.perf_counter(); "
                "import torch._dynamo; print(u - t, time.perf_counter() - u)")
# The run's lines each phase starts or ends at (print_every=1 logs every step).
LINES = {"rebuilding": r"^data: rebuilding cache", "wrote": r"^data: wrote ",
         "step": r"^step (\d+)[ /]",
         "validation": r"^step (\d+): validation loss", "trained": r"^training finished",
         "stopped": r"^stopped by", "final": r"^final model on", "report": r"^report: ",
         "evaluated": r": every byte but the first scored once",
         "peak": r"^bench: peak_rss_bytes (\d+)", "training": r"^training [\d,]+ steps at most"}


def write_prefix(sources, size, path):
    """The first `size` bytes of the sorted .txt files `sources` joined, cut back to the
    last line break (else to a whole UTF-8 character) so the text stays valid. Returns
    the bytes written: fewer than `size` when the corpus is smaller."""
    written = 0
    with open(path, "wb") as out:
        for source in sources:
            with open(source, "rb") as file:
                while written < size:
                    block = file.read(min(8 * MB, size - written))
                    if not block:
                        break
                    if written + len(block) == size:  # the last block: end on a boundary
                        block = block[:block.rfind(b"\n") + 1 or character_boundary(block)]
                        size = written + len(block)
                    out.write(block)
                    written += len(block)
    return written


def character_boundary(block):
    """The length of `block` without its last UTF-8 character, which may be cut off."""
    cut = len(block)
    while cut and block[cut - 1] & 0xC0 == 0x80:  # continuation bytes
        cut -= 1
    return cut - 1 if cut and block[cut - 1] >= 0xC0 else cut


def corpus_sources(data):
    if os.path.isfile(data):
        return [data]
    return sorted(str(path) for path in Path(data).rglob("*") if path.is_file()
                  and path.suffix.lower() == ".txt")


def main_run(workdir, args, stop_at=None):
    """`python3 main.py ARGS` in workdir: [(seconds since its start, line)] of its output
    (stdout and stderr) as it arrives. At the first line matching `stop_at` it is sent
    SIGINT (main.py stops as after Ctrl-C) and the rest of its output read."""
    began = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", RUN_MAIN, os.path.join(REPO, "main.py"),
                                *args], cwd=workdir, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in process.stdout:
        lines.append((time.perf_counter() - began, line.rstrip("\n")))
        if stop_at and re.search(LINES[stop_at], line):
            process.send_signal(signal.SIGINT)
            stop_at = None
    if process.wait() not in (0, 130):
        raise RuntimeError("main.py " + " ".join(args) + " failed:\n"
                           + "\n".join(line for _, line in lines[-30:]))
    return lines


def found(lines, name):
    """[(seconds, regex match)] of the output lines matching LINES[name]."""
    return [(t, match) for t, line in lines for match in [re.search(LINES[name], line)] if match]


def first_time(lines, name):
    hits = found(lines, name)
    return hits[0][0] if hits else None


def phase_seconds(lines):
    """The phases of one training run, from its output lines' arrival times."""
    steps = {int(match[1]): t for t, match in found(lines, "step")}
    validations = [t - steps[int(match[1])] for t, match in found(lines, "validation")
                   if int(match[1]) in steps]  # from its step's line: the validation (+ save)
    gaps = [b - a for a, b in zip(sorted(steps.values()), sorted(steps.values())[1:])]
    end = first_time(lines, "trained") or first_time(lines, "stopped")
    final, report = first_time(lines, "final"), first_time(lines, "report")
    peak = found(lines, "peak")
    return {"first_step_s": steps.get(min(steps)) if steps else None,
            "steps": max(steps) if steps else 0,
            "steps_per_s": 1 / statistics.median(gaps) if gaps else None,
            "interim_validation_s": statistics.median(validations) if validations else None,
            "final_validation_s": final - end if final and end else None,
            "report_s": report - final if report and final else None,
            "peak_rss_mb": int(peak[-1][1][1]) / MB if peak else None}


def disk_mb(folder):
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file()) / MB


def checkpoint_seconds(folder):
    """(save, load) seconds of the run's latest checkpoint, with checkpoint.py's own
    functions in this process."""
    path = next(iter(sorted(Path(folder).glob("*_latest.pth"))), None)
    if path is None:
        return None, None
    began = time.perf_counter()
    state = load_checkpoint(str(path))
    loaded = time.perf_counter() - began
    began = time.perf_counter()
    save_checkpoint(state, str(path.with_name("bench_copy.pth")))
    saved = time.perf_counter() - began
    os.remove(path.with_name("bench_copy.pth"))
    return saved, loaded


def scale_size(workdir, sources, size, options):
    """Every phase of main.py on the first `size` bytes of the corpus: a first run that
    builds the processed cache (stopped once training starts), then a full run on the
    cache. Returns its rows of times and of memory and disk."""
    folder = os.path.join(workdir, f"prefix_{size / MB:g}MB")
    os.makedirs(folder)
    corpus = os.path.join(folder, "corpus.txt")
    written = write_prefix(sources, size, corpus)
    base = [f"--data_dir={corpus}", f"--processed_data_dir={folder}/processed",
            "--DO_PREDICTION=False", "--print_every=1", f"--device={options['device']}",
            f"--validate_and_checkpoint_best_every_batches={options['validate_every']}",
            f"--max_train_minutes={options['seconds'] / 60!r}", *options["main_args"]]
    log(f"scale: {written / MB:.1f} MB: first run (processing)")
    first = main_run(folder, [*base, f"--checkpoint_dir={folder}/first"], stop_at="training")
    began, wrote = first_time(first, "rebuilding"), first_time(first, "wrote")
    processing = wrote - began if began and wrote else None
    log(f"scale: {written / MB:.1f} MB: run on the cache ({options['seconds']:g} s of training)")
    run = main_run(folder, [*base, f"--checkpoint_dir={folder}/run"])
    phases = phase_seconds(run)
    save, load = checkpoint_seconds(f"{folder}/run")
    began = time.perf_counter()
    scan_sources(Path(corpus), hash_contents=True)
    hashing = time.perf_counter() - began
    first_peak = found(first, "peak")
    startup = phases["first_step_s"] and phases["first_step_s"] - options["import_torch_s"]
    times = {"corpus_mb": written / MB,
             "processing_mb_per_s": written / MB / processing if processing else None,
             "content_hash_mb_per_s": written / MB / hashing, "startup_s": startup,
             "steps_per_s": phases["steps_per_s"],
             "interim_validation_s": phases["interim_validation_s"],
             "final_validation_s": phases["final_validation_s"],
             "checkpoint_save_s": save, "checkpoint_load_s": load, "report_s": phases["report_s"]}
    sizes = {"corpus_mb": written / MB,
             "processing_peak_rss_mb": int(first_peak[-1][1][1]) / MB if first_peak else None,
             "peak_rss_mb": phases["peak_rss_mb"], "checkpoint_dir_mb": disk_mb(f"{folder}/run"),
             "cache_mb": disk_mb(f"{folder}/processed"), "first_step_s": phases["first_step_s"],
             "steps": phases["steps"]}
    return times, sizes


def growth_per_decade(rows):
    """For each phase: how much its figure grows per 10x of corpus, between the smallest
    and the largest size ((last / first) ** (1 / decades))."""
    if len(rows) < 2:
        return []
    first, last = rows[0], rows[-1]
    decades = math.log10(last["corpus_mb"] / first["corpus_mb"])
    growth = []
    for key in first:
        a, b = first[key], last[key]
        numbers = all(isinstance(v, (int, float)) and v > 0 for v in (a, b))
        if key not in ("corpus_mb", "steps") and numbers and decades > 0:
            growth.append({"figure": key, "smallest": a, "largest": b,
                           "growth_per_10x": (b / a) ** (1 / decades)})
    return growth


def write_metrics_rows(path, rows):
    """A metrics.csv of a `rows`-step run, with trainer.py's header: a training row a step,
    a validation every 1,000 steps, a resume half way and the final validation."""
    lines = [",".join(METRICS_COLUMNS)]
    for step in range(1, rows + 1):
        loss = 1.0 + 4.0 / (1 + step / 1000)
        lines.append(f"{step},1,{loss:.6g},,,0.003,25000,{step * 0.1:.6g},,,")
        if step % 1000 == 0:
            lines.append(f"{step},1,,{loss:.6g},{bits_per_byte(loss):.6g},0.003,,"
                         f"{step * 0.1 + 0.05:.6g},,,")
        if step == rows // 2:
            lines.append(f"{step},,,,,,,,resume,,")
    lines.append(f"{rows},,,1.5,2.16404,,,{rows * 0.1:.6g},final_validation,200000,30000000")
    with open(path, "w", encoding="utf-8", newline="") as file:
        file.write("\r\n".join(lines) + "\r\n")  # csv.writer's line ends, as the trainer's


def report_of_rows(workdir, rows):
    """(seconds, bytes) of report.html written from a `rows`-row metrics.csv."""
    folder = os.path.join(workdir, "report")
    os.makedirs(folder)
    write_metrics_rows(os.path.join(folder, "metrics.csv"), rows)
    began = time.perf_counter()
    path = write_report({**CONFIG_V3, "checkpoint_dir": folder})
    return time.perf_counter() - began, os.path.getsize(path)


def evaluate_run(workdir, sources, size, run_folder, options):
    """(bytes, seconds) of `main.py --evaluate` on the corpus's first `size` bytes, with
    the run's checkpoint: from the end of its processing to its result line."""
    text = os.path.join(workdir, "evaluate.txt")
    written = write_prefix(sources, size, text)
    lines = main_run(workdir, [f"--evaluate={text}", f"--checkpoint_dir={run_folder}/run",
                               f"--processed_data_dir={run_folder}/processed",
                               f"--device={options['device']}", *options["main_args"]])
    began, done = first_time(lines, "wrote"), first_time(lines, "evaluated")
    return written, (done - began if began and done else None)


def bench_scale(data, sizes_mb, seconds, evaluate_mb, validate_every, main_args, device,
                report_rows):
    """Each phase of main.py at each corpus size (prefixes of `data`), its growth per 10x,
    and the issue's targets at the largest size."""
    sources = corpus_sources(data)
    if not sources:
        raise UserError(f"--data {data}: no .txt files")
    total = sum(os.path.getsize(source) for source in sources)
    sizes = sorted({min(round(mb * MB), total) for mb in sizes_mb})
    imports = [[float(seconds) for seconds in subprocess.run(
        [sys.executable, "-c", IMPORT_TORCH], capture_output=True, text=True,
        check=True).stdout.split()] for _ in range(3)]
    import_torch, import_dynamo = (statistics.median(column) for column in zip(*imports))
    options = {"seconds": seconds, "validate_every": validate_every, "device": device,
               "main_args": main_args, "import_torch_s": import_torch}
    with tempfile.TemporaryDirectory(prefix="grug_bench_scale_") as workdir:
        rows, memory = zip(*[scale_size(workdir, sources, size, options) for size in sizes])
        largest = os.path.join(workdir, f"prefix_{sizes[-1] / MB:g}MB")
        evaluated, evaluate_s = evaluate_run(workdir, sources, round(evaluate_mb * MB),
                                             largest, options)
        report_s, report_bytes = report_of_rows(workdir, report_rows)
    extras = [{"import_torch_s": import_torch, "import_torch_dynamo_s": import_dynamo,
               "evaluate_mb": evaluated / MB,
               "evaluate_s": evaluate_s,
               "evaluate_kb_per_s": evaluated / 1e3 / evaluate_s if evaluate_s else None,
               "report_rows": report_rows, "report_of_rows_s": report_s,
               "report_of_rows_mb": report_bytes / MB}]
    top, bottom = {**rows[-1], **memory[-1]}, {**rows[0], **memory[0]}
    at = f" ({top['corpus_mb']:.4g} MB)"
    growth = (top["peak_rss_mb"] - bottom["peak_rss_mb"]
              if top["peak_rss_mb"] and bottom["peak_rss_mb"] else None)
    targets = [
        check_target("first processing" + at, top["processing_mb_per_s"],
                     *TARGETS["scale_processing_mb_per_s"], "MB/s"),
        check_target("content hash" + at, top["content_hash_mb_per_s"],
                     *TARGETS["scale_content_hash_mb_per_s"], "MB/s"),
        check_target("start-up on the cache to the first step, less import torch" + at,
                     top["startup_s"], *TARGETS["scale_startup_s"], "s"),
        check_target("final validation, 10% of a 3-minute run" + at, top["final_validation_s"],
                     *TARGETS["scale_final_validation_s"], "s"),
        check_target(f"training peak RSS growth, {bottom['corpus_mb']:.4g} to "
                     f"{top['corpus_mb']:.4g} MB", growth, *TARGETS["scale_peak_rss_growth_mb"],
                     "MB"),
        check_target(f"report.html of {report_rows:,} metrics rows: time", report_s,
                     *TARGETS["scale_report_s"], "s"),
        check_target(f"report.html of {report_rows:,} metrics rows: size", report_bytes / MB,
                     *TARGETS["scale_report_mb"], "MB")]
    together = [{**row, **more} for row, more in zip(rows, memory)]
    return {"rows": list(rows), "memory_and_disk": list(memory),
            "growth": growth_per_decade(together), "once": extras}, targets


# =============================================================================
# Report
# =============================================================================


def format_cell(value):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "PASS" if value else "FAIL"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value)


def format_table(rows, title=None):
    """Dicts with the same keys -> an aligned plain-text table (numbers right-aligned)."""
    headers = list(rows[0])
    cells = [[format_cell(row[h]) for h in headers] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[h], (int, float)) or row[h] is None for row in rows)
               for h in headers]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    lines = ([title] if title else []) + [line(headers), line(["-" * w for w in widths])]
    return "\n".join(lines + [line(r) for r in cells])


def cpu_model():
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device):
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "device": str(device), "cpu": cpu_model(),
            "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = os.getloadavg()[0]  # > cores: other work shared the CPU
    return info


def print_section(name, result):
    print(f"\n== {name} == ({result['section_seconds']:.0f} s)")
    for key, value in result.items():
        if isinstance(value, list) and value:
            print(format_table(value, title=None if key == "rows" else f"-- {key}"))


def print_targets(targets, quick):
    print("\n== TARGETS ==" + (" (quick mode: figures are not meaningful)" if quick else ""))
    print(format_table([{"target": t["target"], "measured": t["measured"],
                         "need": f"{t['op']} {t['threshold']:g} {t['unit']}".strip(),
                         "result": t["passed"], "margin": t["margin"]} for t in targets]))


# =============================================================================
# Command line
# =============================================================================


def section_list(text):
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {','.join(SECTIONS)}")
    return names


def size_list(text):
    try:
        sizes = [float(size) for size in text.split(",") if size.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give sizes in MB, such as 10,100,1000")
    return sizes


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="MB = 10^6 bytes. Progress goes to stderr.")
    parser.add_argument("--data", help="corpus: a .txt file or a folder of them (default: "
                        "../shared/data/tinyshakespeare.txt beside the repo, if present)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: every section shrunk to finish in under a minute")
    parser.add_argument("--only", type=section_list, default=list(DEFAULT_SECTIONS),
                        help=f"comma-separated sections to run, of {','.join(SECTIONS)} "
                             f"(default: {','.join(DEFAULT_SECTIONS)})")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    parser.add_argument("--quality-seconds", type=float,
                        help="training budget of each quality run (default: 100; quick: 2)")
    parser.add_argument("--quality-repeats", type=int, default=1,
                        help="train each quality run this many times; report medians")
    parser.add_argument("--quality-ablation", action="store_true",
                        help="quality section: also train the seed recipe with each change "
                             "of RECIPE_CHANGES alone (about 2 minutes per change and repeat)")
    parser.add_argument("--recipe-candidates", action="store_true",
                        help="quality section: also train config.py's defaults with each of "
                             "CANDIDATE_CHANGES alone and with all of them (2 minutes a run)")
    parser.add_argument("--quality-run", action="append", metavar="NAME",
                        help="quality section: train only this run beside 'best' (repeat the "
                             "flag for more; names as quality_variants gives them, e.g. "
                             "'best + smear'); default: every run")
    parser.add_argument("--parallel-designs", action="store_true",
                        help="quality section: also train each of PARALLEL_DESIGNS, and both "
                             "streams at windows of 256 and 1024 bytes (2 minutes per run)")
    parser.add_argument("--generation-designs", choices=("all", "main"), default="all",
                        help="generation section: time every parallel design and the "
                             "windowed single stream (all) or only config.py's single and "
                             "parallel stream (main: about a third of the time)")
    parser.add_argument("--generation-rounds", type=int,
                        help="generation section: paired rounds of each comparison with the "
                             "seed's cached path (default: 9; quick: 1)")
    parser.add_argument("--long-seconds", type=float,
                        help="long section: training budget of each run (default: 600; "
                             "quick: 2)")
    parser.add_argument("--long-repeats", type=int, default=2,
                        help="long section: train each run this many times; report medians")
    parser.add_argument("--long-run", action="append", metavar="NAME",
                        help="long section: train only this run beside config.py's defaults "
                             "(repeat the flag for more; names as the section prints them, "
                             "e.g. 'single-stream, window 1024'); default: every run")
    parser.add_argument("--long-heldout-mb", type=float, default=LONG_HELDOUT_BYTES / MB,
                        help="long section: size of the held-out slice every model is "
                             "scored on (default: 1)")
    parser.add_argument("--scale-sizes", type=size_list, default=[10.0, 100.0, 1000.0],
                        help="scale section: corpus prefixes, MB (default: 10,100,1000; "
                             "sizes past the corpus's end are its whole)")
    parser.add_argument("--scale-seconds", type=float, default=60.0,
                        help="scale section: training budget of each run (default: 60)")
    parser.add_argument("--scale-evaluate-mb", type=float, default=10.0,
                        help="scale section: MB of the corpus that --evaluate scores once "
                             "(default: 10; tens of KB/s on a CPU)")
    parser.add_argument("--scale-validate-every", type=int, default=100,
                        help="scale section: steps between interim validations (default: 100)")
    parser.add_argument("--scale-main-args", default="",
                        help="scale section: more main.py --key=value settings for every run, "
                             "as one string (default: config.py's defaults)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH")
    parser.add_argument("--data-worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--generation-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if "long" in args.only and not args.data:
        parser.error("--only long needs --data: a real corpus of 100 MB or more "
                     "(docs/benchmarks.md: the reference corpus)")
    if "quality" in args.only and not args.data and not (args.data_worker or
                                                         args.generation_worker):
        if not os.path.exists(DEFAULT_DATA):
            parser.error(f"--data is required (no default corpus at {DEFAULT_DATA})")
        args.data = os.path.normpath(DEFAULT_DATA)
    for flag, chosen, runs in [
            ("--long-run", args.long_run, long_variants()),
            ("--quality-run", args.quality_run,
             quality_variants(args.quality_ablation, args.parallel_designs,
                              args.recipe_candidates))]:
        unknown = sorted(set(chosen or ()) - set(runs))
        if unknown:
            parser.error(f"{flag} {unknown[0]!r}: no such run; with these flags the runs are: "
                         + "; ".join(repr(name) for name in runs))
    if "scale" in args.only and not args.data:
        parser.error("the scale section needs --data (a .txt file or a folder of them)")
    if args.data and not os.path.exists(args.data):
        parser.error(f"--data {args.data}: no such file or folder")
    return args


def main(argv):
    args = parse_args(argv)
    if args.data_worker:
        data_worker(*args.data_worker)
        return 0
    if args.generation_worker:
        generation_worker(*args.generation_worker)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = SCALES["quick" if args.quick else "full"]
    if args.generation_rounds:
        scale = {**scale, "gen_user_rounds": args.generation_rounds}
    device = resolve_device(args.device)
    quality_seconds = args.quality_seconds or scale["quality_seconds"]
    report = {"machine": machine_info(device),
              "settings": {"quick": args.quick, "sections": args.only, "data": args.data,
                           "quality_seconds": quality_seconds,
                           "quality_repeats": args.quality_repeats,
                           "quality_ablation": args.quality_ablation,
                           "parallel_designs": args.parallel_designs,
                           "recipe_candidates": args.recipe_candidates,
                           "quality_runs": args.quality_run or "all",
                           "generation_designs": args.generation_designs, "scale": scale,
                           "scale_sizes_mb": args.scale_sizes,
                           "scale_seconds": args.scale_seconds,
                           "scale_evaluate_mb": args.scale_evaluate_mb,
                           "scale_validate_every": args.scale_validate_every,
                           "scale_main_args": args.scale_main_args,
                           "long_seconds": args.long_seconds,
                           "long_repeats": args.long_repeats,
                           "long_runs": args.long_run or "all"},
              "sections": {}, "targets": []}
    print("GrugV3 benchmark | " + " | ".join(f"{k}: {v}" for k, v in report["machine"].items()))
    sections = {
        "training": lambda: bench_training(device, scale),
        "quality": lambda: bench_quality(device, scale, args.data, quality_seconds,
                                         args.quality_repeats, args.quality_ablation,
                                         args.parallel_designs, args.recipe_candidates,
                                         args.quality_run),
        "generation": lambda: bench_generation(device, scale,
                                               generation_designs(args.generation_designs)),
        "data": lambda: bench_data(scale),
        "long": lambda: bench_long(device, scale, args.data,
                                   args.long_seconds or scale["long_seconds"],
                                   args.long_repeats, int(args.long_heldout_mb * MB),
                                   chosen_long_variants(args.long_run)),
        "scale": lambda: bench_scale(args.data, args.scale_sizes, args.scale_seconds,
                                     args.scale_evaluate_mb, args.scale_validate_every,
                                     shlex.split(args.scale_main_args), args.device,
                                     scale["report_rows"]),
    }
    for name in SECTIONS:
        if name in args.only:
            log(f"--- {name} ---")
            began = time.perf_counter()
            result, targets = sections[name]()
            result["section_seconds"] = time.perf_counter() - began
            report["sections"][name] = result
            report["targets"] += targets
            print_section(name, result)
    if report["targets"]:
        print_targets(report["targets"], args.quick)
    if args.json:
        with atomic_output(args.json) as file:
            file.write(json.dumps(report, indent=1).encode("utf-8"))
        print(f"\nfigures written to {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
