"""Shared test helpers: a tiny, fast config rooted in a temporary folder, and the two
test tiers.

`python3 -m pytest -q tests` runs the fast tier: every test not marked `slow`.
`python3 -m pytest -q --full tests` runs everything. Tests marked `slow` compile the
decoding step, start processes (torchrun, SIGKILL, main.py end to end, bench.py) or
render in a browser; the fast tier keeps at least one in-process test of each behaviour
they cover. `gpu` marks the tests that need CUDA (`-m gpu` selects them). Any `-m`, and
a test named by its id (tests/test_x.py::test_y), turns the default selection off, as
--full does.
"""

import os
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import config as config_module  # noqa: E402

# What the device-parametrized tests run on: the CPU always, and a CUDA GPU where there
# is one. CI has none, so there the "cuda" cases are skipped; on a GPU machine,
# `python3 -m pytest -q -m gpu tests` runs them (README, Tests).
GPU_DEVICES = [pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]
DEVICES = ["cpu", *GPU_DEVICES]
# Issue 31's options from small-model recipes, all three on (test_model, test_trainer).
RECIPE_OPTIONS = dict(smear_previous_byte=True, embeddings_into_every_layer=True,
                      value_embeddings=True)


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="run the slow tier too (tests marked slow); default: the fast tier")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: compiles, subprocesses (torchrun, SIGKILL, main.py, bench.py) or a "
                   "browser; run with --full")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one); -m gpu")


def pytest_collection_modifyitems(config, items):
    """The fast tier by default: leave out the tests marked slow, unless --full, a -m
    expression or a test named by its id (path::name) asks for a selection of its own."""
    named = any("::" in arg for arg in config.args)
    if config.getoption("--full") or config.getoption("markexpr") or named:
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def make_tiny_config(root, **overrides):
    """CONFIG_V3 shrunk to a model that trains in seconds, with every path under `root`."""
    config = dict(config_module.CONFIG_V3)
    config.update(
        data_dir=os.path.join(root, "data"),
        processed_data_dir=os.path.join(root, "processed"),
        checkpoint_dir=os.path.join(root, "checkpoints"),
        profiler_log_dir=os.path.join(root, "profiler"),
        sequence_length=16, data_stride=16, batch_size=4,
        embedding_dim=32, attention_d_model=32, attention_num_heads=2,
        num_attention_layers=1, num_byte_stream_layers=1, num_agg_stream_layers=1,
        agg_cnn_out_dim=32, cnn_out_channels_list=[32],
        max_steps=6, max_train_minutes=None, num_epochs=1,
        print_every=2, metrics_every=1, validate_and_checkpoint_best_every_batches=3,
        checkpoint_every_batches=3, test_every_batches=0, eval_max_batches=2,
        lr_warmup_steps=2, use_amp=False, device="cpu",
        generation_max_new_bytes=20, generation_prompts=["ab"],
    )
    config.update(overrides)
    return config


@pytest.fixture
def tiny_config(tmp_path):
    return make_tiny_config(str(tmp_path))


def write_text_corpus(folder, text, name="corpus.txt"):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w", encoding="utf-8") as file:
        file.write(text)
