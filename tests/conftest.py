"""Shared test helpers: a tiny, fast config rooted in a temporary folder."""

import os
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import config as config_module  # noqa: E402

# What the device-parametrized tests run on: the CPU always, and a CUDA GPU where there
# is one. CI has none, so there the "cuda" cases are skipped; on a GPU machine,
# `python3 -m pytest -q tests -k "cuda or gpu"` runs them (README, Tests).
GPU_DEVICES = [pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]
DEVICES = ["cpu", *GPU_DEVICES]


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
