"""Data-parallel training through torchrun: 2 CPU ranks with gloo, as CI runs it. Every
test here starts processes, so the module is in the slow tier (--full); the fast tier's
twins are in-process (test_dataset: two ranks see the windows of one rank with twice the
batch; test_trainer: two micro-batches accumulated equal one batch of twice the size)."""

import csv
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT, write_text_corpus
from tests.test_main import TINY_MODEL, paths
from checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

MAIN = os.path.join(REPO_ROOT, "main.py")
CORPUS = "".join(f"line {i}: the rain in spain stays mainly in the plain.\n" for i in range(400))


def launch(root, *args, ranks=2, timeout=300):
    """main.py under torchrun (ranks > 1) or as a plain process (ranks == 1)."""
    if ranks > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={ranks}", MAIN]
    else:
        command = [sys.executable, MAIN]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([*command, *paths(root), *TINY_MODEL, "--DO_PREDICTION=False",
                             "--use_amp=False", *args], cwd=root, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def latest_state(root):
    return load_checkpoint(f"{root}/ckpt/grug_v3_latest.pth")


def final_validation(root):
    """The bits per byte of the final model over the whole validation split (metrics.csv)."""
    with open(f"{root}/ckpt/metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row["event"] == "final_validation"]
    assert len(rows) == 1
    return float(rows[0]["val_bits_per_byte"])


@pytest.mark.parametrize("recipe", [[], ["--optimizer_type=AdamW", "--scheduler_type=wsd",
                                      "--positional_encoding_type=sinusoidal",
                                      "--qk_norm=False"],
                                    # AdamW: Muon's orthogonalization of the small
                                    # patch-layer matrices magnifies fp32 rounding
                                    # to the tolerance (the default case has Muon)
                                    ["--optimizer_type=AdamW",
                                     "--use_parallel_stream_model=True",
                                     "--parallel_fusion=at_boundaries",
                                     "--patch_boundaries=spacelike", "--agg_cnn_stride=5",
                                     "--attention_window=6"],
                                    ["--sparse_table_updates=True", "--smear_previous_byte=True",
                                     "--embeddings_into_every_layer=True",
                                     "--value_embeddings=True"]],
                         ids=["default-recipe-muon", "adamw-sinusoidal-wsd", "at-ends-window",
                              "sparse-tables-recipe-options"])
def test_two_ranks_of_batch_b_equal_one_process_of_batch_2b(tmp_path, recipe):
    """Pinned to fp32 (launch passes --use_amp=False, and Muon then orthogonalizes in fp32
    too), so the tolerance is fp32's summation-order rounding on every CPU; bf16 rounding
    differs between a batch of 2b and two of b far beyond it."""
    for name in ("ddp", "single"):
        write_text_corpus(f"{tmp_path}/{name}/data", CORPUS)
    steps = ["--max_steps=5", "--gradient_accumulation_steps=2", "--weight_decay=0.1", *recipe]
    launch(f"{tmp_path}/ddp", "--batch_size=3", *steps, ranks=2)
    launch(f"{tmp_path}/single", "--batch_size=6", *steps, ranks=1)
    ddp, single = latest_state(f"{tmp_path}/ddp"), latest_state(f"{tmp_path}/single")
    assert ddp["step"] == single["step"] == 5
    assert ddp["windows_in_epoch"] == single["windows_in_epoch"] == 5 * 2 * 6
    for key, value in single["model_state"].items():
        torch.testing.assert_close(ddp["model_state"][key], value, rtol=1e-4, atol=1e-5,
                                   msg=f"weights differ at {key}")
    # Validation loss is averaged over every rank's share of the same windows.
    assert ddp["best_val_loss"] == pytest.approx(single["best_val_loss"], rel=1e-4)
    # The final model's whole-split figure: each rank scored its share, summed.
    ddp_final, single_final = (final_validation(f"{tmp_path}/{name}") for name in ("ddp", "single"))
    assert ddp_final == pytest.approx(single_final, rel=1e-4)


def test_a_two_rank_run_writes_one_set_of_checkpoints_and_resumes_either_way(tmp_path):
    root = str(tmp_path)
    write_text_corpus(f"{root}/data", CORPUS)
    first = launch(root, "--max_steps=4", "--metrics_every=1", ranks=2)
    assert first.stdout.count("training finished") == 1  # only rank 0 reports
    files = sorted(os.listdir(f"{root}/ckpt"))
    assert files == ["grug_v3_best.pth", "grug_v3_latest.pth", "interim_samples.txt",
                     "metrics.csv", "report.html"]
    with open(f"{root}/ckpt/metrics.csv") as file:
        steps = [row["step"] for row in csv.DictReader(file) if row["train_loss"]]
    assert steps == ["1", "2", "3", "4"]  # one writer, no duplicated rows

    launch(root, "--max_steps=6", "--batch_size=8", "--resume_from_checkpoint=latest",
           ranks=1)  # 1 rank x 8 windows = 2 ranks x 4: same position in the data
    assert latest_state(root)["step"] == 6
    resumed = launch(root, "--max_steps=8", "--resume_from_checkpoint=latest", ranks=2)
    assert "resumed from" in resumed.stdout + resumed.stderr
    state = latest_state(root)
    assert state["step"] == 8 and state["windows_in_epoch"] == 8 * 8


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA GPU")
def test_nccl_path_on_gpus(tmp_path):
    root = str(tmp_path)
    write_text_corpus(f"{root}/data", CORPUS)
    ranks = min(torch.cuda.device_count(), 2)
    result = launch(root, "--max_steps=4", "--device=auto", "--use_amp=True", ranks=ranks)
    assert "device: cuda" in result.stdout
    assert latest_state(root)["step"] == 4
