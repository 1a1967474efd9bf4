"""Bits per byte of a model over a byte array: the one measure shared by the trainer's
validation, bench.py's quality section and `main.py --evaluate`.

A window is context_length + 1 bytes of the array starting at `start`: the model reads
the first context_length and is scored on predicting each next byte. The model only
needs `model(x) -> logits (B, T, 256)`.

- score_windows: given windows (the trainer's validation sample, bench's windows),
- SlidingPlan + score_text: every byte of a span exactly once, streamed from a
  memory-mapped array in bounded memory, optionally attributed to the files it came from.
- bounded_plan: the same for at most N bytes of a span, in evenly spread pieces
  (SpreadPlan), so that scoring costs what N bytes cost whatever the span (the trainer's
  final validation).
"""

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils import autocast_context, bits_per_byte

# Positions per forward pass of score_text: without gradients a batch costs little
# memory (its logits: 8 MB), and few large batches run much faster than many small ones.
POSITIONS_PER_BATCH = 8192


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

    def figures(self):
        """Bytes scored, bits, nats and perplexity per byte (None when nothing was scored)."""
        if not self.count:
            return {"bytes": 0, "bits_per_byte": None, "nats_per_byte": None, "perplexity": None}
        return {"bytes": self.count, "bits_per_byte": self.bits_per_byte,
                "nats_per_byte": self.nats_per_byte, "perplexity": self.perplexity}


def evenly_spread(available, wanted=None):
    """`wanted` indices (all when None) spread evenly over 0 .. available-1, ends included."""
    count = available if wanted is None else min(available, wanted)
    return np.linspace(0, available - 1, num=count).round().astype(np.int64)


def evaluation_problems(c):
    """Cross-key rule: a stride longer than the window would leave bytes unscored."""
    stride, length = c.get("evaluation_stride"), c.get("sequence_length")
    if stride is not None and length is not None and stride > length:
        return [f"`evaluation_stride` ({stride}) is longer than `sequence_length` ({length}):"
                f" bytes between windows would never be scored"]
    return []


def _nats_of_windows(model, data, starts, context_length, device, amp_dtype, batch_size):
    """Yield (first window of the batch, nats (B, T)): the cross-entropy of every target
    of the windows at `starts`, batch by batch, with the model in eval mode."""
    offsets = np.arange(context_length + 1)
    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(starts), batch_size):
            batch = starts[first:first + batch_size]
            windows = torch.from_numpy(data[batch[:, None] + offsets].astype(np.int64))
            x, y = windows[:, :-1].to(device), windows[:, 1:].to(device)  # (B, T)
            with autocast_context(device, amp_dtype):
                logits = model(x)
            yield first, F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")
    finally:
        model.train(was_training)


@torch.no_grad()
def score_windows(model, data, starts, context_length, device, amp_dtype=None,
                  batch_size=64, score_from=None):
    """Totals of the windows of `data` (1-D uint8) starting at `starts`. Window i is
    scored from target position score_from[i] on (default 0: every position)."""
    starts = np.asarray(starts, dtype=np.int64)
    score_from = torch.from_numpy(np.zeros_like(starts) if score_from is None
                                  else np.asarray(score_from, dtype=np.int64)).to(device)
    positions = torch.arange(context_length, device=device)
    totals = Totals()
    for first, nats in _nats_of_windows(model, data, starts, context_length, device,
                                        amp_dtype, batch_size):
        scored = positions >= score_from[first:first + len(nats), None]
        totals += Totals(nats[scored].sum().item(), int(scored.sum()),
                         nats[:, -1].sum().item(), len(nats))
    return totals


# ---------------------------------------------------------------------------
# Every byte of a text, once

class SlidingPlan:
    """The windows that score every byte of data[begin:end] but the first exactly once.

    The first window is scored on all its targets. Each later one starts `stride` bytes
    further on and is scored only on the targets no earlier window reached (its last
    `stride`), so every byte after the first window is predicted from at least
    context_length - stride + 1 bytes of context; the last window is aligned to `end`.
    A span shorter than one window is scored as one shorter window.

    Cost: each window is a forward pass over context_length positions that scores about
    `stride` bytes, so a text costs context_length / stride times the work of reading it
    once: stride = context_length (no overlap) is the cheapest, stride 1 gives every byte
    the full context at context_length times the cost."""

    def __init__(self, begin, end, context_length, stride):
        self.begin = begin
        self.context_length = max(0, min(context_length, end - begin - 1))
        self.stride = max(1, min(stride, self.context_length))
        self.last_start = end - 1 - self.context_length  # the window aligned to the end
        self.count = (0 if self.context_length == 0 else
                      -(-(self.last_start - begin) // self.stride) + 1)

    def __len__(self):
        return self.count

    def windows(self, first, stop):
        """(starts, score_from) of windows first .. stop-1: where each starts in the array,
        and the first of its targets (0 .. context_length-1) that it scores."""
        k = np.arange(first, min(stop, self.count), dtype=np.int64)
        starts = np.minimum(self.begin + k * self.stride, self.last_start)
        previous = np.minimum(self.begin + (k - 1) * self.stride, self.last_start)
        # Window k-1 scored positions up to previous + context_length; go on from there.
        score_from = np.where(k == 0, 0, previous + self.context_length - starts)
        return starts, score_from

    def share(self, rank, world_size):
        """The windows (first, stop) one rank of `world_size` scores: contiguous shares."""
        return self.count * rank // world_size, self.count * (rank + 1) // world_size

    def bytes_scored(self, first, stop):
        """How many bytes windows first .. stop-1 score: each window goes on from the last
        target of the one before it, so this is the distance between their last targets."""
        stop = min(stop, self.count)
        if stop <= first:
            return 0
        last = self.windows(stop - 1, stop)[0][0] + self.context_length
        before = self.begin if first == 0 else \
            self.windows(first - 1, first)[0][0] + self.context_length
        return int(last - before)


class SpreadPlan:
    """`pieces` evenly spread runs of `length` scored bytes in data[begin:end], each scored
    as a SlidingPlan scores its own span (one byte longer: its first byte is context only):
    a bounded sample of a long text, planned like the whole of it.

    Why spread pieces and not the first bytes: a split is a run of files in the corpus's
    order, so its first bytes are the start of one file (one book, one source folder),
    while spread pieces sample every part of it. Why runs of windows and not single
    windows: inside a piece every byte after its first window gets the context it gets
    when the whole text is scored, so the two figures measure the same thing."""

    def __init__(self, begin, end, context_length, stride, pieces, length):
        room = end - begin - length - 1  # the last piece's first byte, from begin
        firsts = [begin + (room * i // (pieces - 1) if pieces > 1 else 0) for i in range(pieces)]
        # Integer steps of at least `length`: the pieces' scored bytes never overlap.
        self.plans = [SlidingPlan(s, s + length + 1, context_length, stride) for s in firsts]
        self.context_length, self.stride = self.plans[0].context_length, self.plans[0].stride
        self.offsets = np.cumsum([0] + [len(plan) for plan in self.plans])
        self.count = int(self.offsets[-1])

    __len__, share = SlidingPlan.__len__, SlidingPlan.share

    def _pieces(self, first, stop):
        """(plan, its first, its stop) of each piece holding windows first .. stop-1."""
        for plan, offset in zip(self.plans, self.offsets.tolist()):
            if offset < stop and first < offset + len(plan):
                yield plan, max(first - offset, 0), min(stop - offset, len(plan))

    def windows(self, first, stop):
        pieces = [plan.windows(a, b) for plan, a, b in self._pieces(first, stop)]
        if not pieces:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return tuple(np.concatenate(arrays) for arrays in zip(*pieces))

    def bytes_scored(self, first, stop):
        return sum(plan.bytes_scored(a, b) for plan, a, b in self._pieces(first, stop))


SAMPLE_PIECES = 64  # pieces of a bounded sample: enough to reach every part of a split


def bounded_plan(begin, end, context_length, stride, max_bytes=None, name="text"):
    """(plan, what it scores in words) for scoring data[begin:end] on at most `max_bytes`
    bytes: the whole span (every byte but its first) when that is within the bound or
    the bound is None, else a SpreadPlan of SAMPLE_PIECES pieces (fewer where pieces
    would be shorter than one window)."""
    whole = end - begin
    if max_bytes is None or max_bytes >= whole - 1:
        whole_span = SlidingPlan(begin, end, context_length, stride)
        return whole_span, f"the whole {name} of {whole:,} bytes"
    pieces = max(1, min(SAMPLE_PIECES, max_bytes // max(context_length, 1)))
    length = max_bytes // pieces
    plan = SpreadPlan(begin, end, context_length, stride, pieces, length)
    spread = f"{pieces} evenly spread pieces of {length:,} bytes" if pieces > 1 else \
        f"its first {length:,} bytes"
    return plan, f"{pieces * length:,} bytes of the {whole:,}-byte {name} ({spread})"


@torch.no_grad()
def score_text(model, data, plan, device, amp_dtype=None, batch_size=None, parts=None,
               windows=None, progress=False):
    """(total, [Totals of each part]) over every byte `plan` scores, or only its `windows`
    (first, stop), a rank's share (plan.share). `parts` are sorted, disjoint [start, end) spans of
    `data` (the files of a corpus): each scored byte counts for the part that holds it,
    and a byte in none (a file separator) is not scored; a window's context may still
    cross from one part into the next, as in training. None: one part, the whole array."""
    parts = np.asarray([[0, len(data)]] if parts is None else parts, dtype=np.int64)
    part_starts, part_ends = (torch.from_numpy(parts[:, i].copy()).to(device) for i in (0, 1))
    nats_sums = torch.zeros(len(parts), dtype=torch.float64, device=device)
    counts = torch.zeros(len(parts), dtype=torch.int64, device=device)
    targets = torch.arange(plan.context_length, device=device)
    batch_size = batch_size or max(1, POSITIONS_PER_BATCH // max(1, plan.context_length))
    first, stop = windows or (0, len(plan))
    chunk = batch_size * 64  # windows planned at a time: memory does not grow with the text
    with tqdm(total=plan.bytes_scored(first, stop), unit="B", unit_scale=True, leave=False,
              desc="evaluating", disable=not (progress and sys.stderr.isatty())) as bar:
        for begin in range(first, stop, chunk):
            starts, score_from = plan.windows(begin, min(begin + chunk, stop))
            score_from = torch.from_numpy(score_from).to(device)
            for offset, nats in _nats_of_windows(model, data, starts, plan.context_length,
                                                 device, amp_dtype, batch_size):
                window_starts = torch.from_numpy(starts[offset:offset + len(nats)]).to(device)
                positions = window_starts[:, None] + 1 + targets  # (B, T) targets' places
                part = torch.searchsorted(part_starts, positions, right=True) - 1
                inside = (part >= 0) & (positions < part_ends[part.clamp(min=0)])
                keep = inside & (targets >= score_from[offset:offset + len(nats), None])
                nats_sums.index_add_(0, part[keep], nats[keep].double())
                counts += torch.bincount(part[keep], minlength=len(parts))
                bar.update(plan.bytes_scored(begin + offset, begin + offset + len(nats)))
    per_part = [Totals(n, c) for n, c in zip(nats_sums.tolist(), counts.tolist())]
    total = sum(per_part, Totals())
    total.windows = stop - first
    return total, per_part


def breakdown_table(total, files):
    """The printed figures: a row per (name, Totals) of `files` when there are several,
    then the total."""
    rows = (list(files) if len(files) > 1 else []) + [("total", total)]
    width = max(len("file"), *(len(name) for name, _ in rows))
    header = (f"{'file':<{width}}  {'bytes':>12}  {'bits/byte':>9}  {'nats/byte':>9}  "
              f"{'perplexity':>10}")
    lines = [header]
    for name, part in rows:
        if name == "total" and len(rows) > 1:
            lines.append("-" * len(header))
        lines.append(f"{name:<{width}}  {part.count:>12,}  {part.bits_per_byte:>9.4f}  "
                     f"{part.nats_per_byte:>9.4f}  {part.perplexity:>10.3f}")
    return "\n".join(lines)
