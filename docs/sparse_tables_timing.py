"""The timing behind docs/benchmarks.md, Sparse table updates: the Trainer's own step with
config.py's defaults, n-gram tables under dense AdamW against RowSparseAdamW
(sparse_table_updates), on tiny Shakespeare windows, in one process, in alternating
blocks of steps so that a busy machine slows both alike.

    OMP_NUM_THREADS=1 python3 docs/sparse_tables_timing.py --precision fp32 --buckets 8192
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import CONFIG_V3  # noqa: E402
from dataset import ByteSequenceDataset  # noqa: E402
from model import ByteLLM_GrugV3  # noqa: E402
from trainer import Trainer  # noqa: E402
from utils import seed_everything  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                            "tinyshakespeare.txt")


def trainer_for(data, sparse, args, folder):
    config = dict(CONFIG_V3, sparse_table_updates=sparse, ngram_buckets=args.buckets,
                  use_amp=args.precision == "bf16", amp_dtype="bfloat16", device="cpu",
                  checkpoint_dir=folder)
    seed_everything(0)
    split = dict(sequence_length=config["sequence_length"], stride=config["data_stride"],
                 val_split_ratio=0.1)
    trainer = Trainer(ByteLLM_GrugV3(config), ByteSequenceDataset(data, split="train", **split),
                      ByteSequenceDataset(data, split="val", **split), config,
                      torch.device("cpu"))
    trainer.model.train()
    return trainer


def time_optimizers(trainer, seconds):
    """Wrap each optimizer's step to add its seconds to seconds[its class name]."""
    for optimizer in trainer.optimizers:
        def timed(*args, step=optimizer.step, name=type(optimizer).__name__, **kwargs):
            began = time.perf_counter()
            step(*args, **kwargs)
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - began
        optimizer.step = timed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--buckets", type=int, default=CONFIG_V3["ngram_buckets"])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="steps per block")
    parser.add_argument("--data", default=DEFAULT_DATA)
    args = parser.parse_args()
    data = np.fromfile(args.data, dtype=np.uint8)
    rng = np.random.default_rng(0)
    results = {}
    for name, sparse in (("dense", False), ("sparse", True)):
        trainer = trainer_for(data, sparse, args, f"/tmp/sparse_tables_timing_{name}")
        results[name] = trainer, {}, []
        batch_size = trainer.config["batch_size"]
        for _ in range(3):  # warm-up, untimed
            trainer.train_step([trainer.train_dataset.__getitems__(range(batch_size))])
        time_optimizers(trainer, results[name][1])
    windows = len(results["dense"][0].train_dataset)
    for block in range(args.rounds):
        for name in (("dense", "sparse") if block % 2 == 0 else ("sparse", "dense")):
            trainer, _, steps = results[name]
            batches = [trainer.train_dataset.__getitems__(rng.integers(0, windows, batch_size)
                                                          .tolist()) for _ in range(args.steps)]
            began = time.perf_counter()
            for batch in batches:
                trainer.train_step([batch])
            steps.append((time.perf_counter() - began) / args.steps)
    total = args.rounds * args.steps
    for name, (_, optimizers, steps) in results.items():
        print(f"{args.precision}, {args.buckets} buckets, {name}: {1e3 * np.median(steps):.2f} ms "
              f"a step (median of blocks); optimizers, ms a step: " + ", ".join(
                  f"{key} {1e3 * value / total:.2f}" for key, value in optimizers.items()))
    ratios = np.array(results["sparse"][2]) / np.array(results["dense"][2])
    print(f"sparse / dense step time: median {np.median(ratios):.3f} "
          f"(blocks {', '.join(f'{r:.3f}' for r in ratios)}); torch threads "
          f"{torch.get_num_threads()}")


if __name__ == "__main__":
    main()
