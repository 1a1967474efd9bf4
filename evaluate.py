"""Bits per byte of a model over a byte array: the one measure shared by the trainer's
validation, bench.py's quality section and `main.py --evaluate`.

A window is sequence_length + 1 bytes of the array starting at `start`: the model reads
the first sequence_length and is scored on predicting each next byte. The model only
needs `model(x) -> logits (B, T, 256)`.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from utils import autocast_context, bits_per_byte


class Totals:
    """Summed cross-entropy (nats) of the scored bytes, and of the windows' last bytes."""

    def __init__(self, nats=0.0, count=0, last_nats=0.0, windows=0):
        self.nats, self.count, self.last_nats, self.windows = nats, count, last_nats, windows

    def __add__(self, other):
        return Totals(self.nats + other.nats, self.count + other.count,
                      self.last_nats + other.last_nats, self.windows + other.windows)

    def summed_over_ranks(self, device):
        """The totals of every rank of a torchrun job (itself when there is one process)."""
        if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            return self
        summed = torch.tensor([self.nats, self.count, self.last_nats, self.windows],
                              dtype=torch.float64, device=device)
        torch.distributed.all_reduce(summed)
        nats, count, last_nats, windows = summed.tolist()
        return Totals(nats, int(count), last_nats, int(windows))

    @property
    def nats_per_byte(self):
        return self.nats / self.count if self.count else math.nan

    @property
    def bits_per_byte(self):
        return bits_per_byte(self.nats_per_byte)

    @property
    def perplexity(self):
        return math.exp(self.nats_per_byte)

    @property
    def last_byte_nats(self):
        """Mean cross-entropy of the last byte of each window (the last_byte objective)."""
        return self.last_nats / self.windows if self.windows else math.nan


def evenly_spread(available, wanted=None):
    """`wanted` indices (all when None) spread evenly over 0 .. available-1, ends included."""
    count = available if wanted is None else min(available, wanted)
    return np.linspace(0, available - 1, num=count).round().astype(np.int64)


@torch.no_grad()
def score_windows(model, data, starts, context_length, device, amp_dtype=None,
                  batch_size=64, score_from=None):
    """Totals of the windows of `data` (1-D uint8) starting at `starts`. Window i is
    scored from target position score_from[i] on (default 0: every position)."""
    starts = np.asarray(starts, dtype=np.int64)
    score_from = (np.zeros_like(starts) if score_from is None
                  else np.asarray(score_from, dtype=np.int64))
    offsets = np.arange(context_length + 1)
    positions = torch.arange(context_length, device=device)
    was_training = model.training
    model.eval()
    totals = Totals()
    for first in range(0, len(starts), batch_size):
        batch = slice(first, first + batch_size)
        windows = torch.from_numpy(data[starts[batch, None] + offsets].astype(np.int64))
        x, y = windows[:, :-1].to(device), windows[:, 1:].to(device)  # (B, T)
        with autocast_context(device, amp_dtype):
            logits = model(x)
        nats = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # (B, T)
        scored = positions >= torch.from_numpy(score_from[batch]).to(device)[:, None]
        totals += Totals(nats[scored].sum().item(), int(scored.sum()),
                         nats[:, -1].sum().item(), len(x))
    model.train(was_training)
    return totals
