"""Building blocks of GrugV3 that are not attention: positional encodings (added to the
inputs, or rotary: applied to queries and keys), norms, the causal convolutional frontend
and the hashed n-gram embeddings. Modules over sequences take and return (B, T, C)."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import MASK32, profiled


def sinusoidal_table(length, d_model):
    """(length, d_model) table of sin/cos encodings, as in "Attention Is All You Need"."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)  # (length, 1)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32)
                         * (-math.log(10000.0) / d_model))  # (ceil(d/2),)
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: d_model // 2])  # odd d_model: one fewer cos
    return table


def dropped(dropout, x):
    """dropout(x), without the call where it is the identity (eval mode or p = 0): a
    decode step would make several calls that do nothing but cost a dispatch each."""
    return dropout(x) if dropout.training and dropout.p > 0 else x


class SinusoidalPositionalEncoding(nn.Module):
    """Adds fixed sin/cos encodings. Works for any length: positions past the stored
    table are computed on the fly (the stored table is left as it is)."""

    rotates_attention = False

    def __init__(self, d_model, dropout, max_len):
        super().__init__()
        self.d_model = d_model
        self.dropout = nn.Dropout(dropout)
        # Not persistent: it is a function of the config, so checkpoints need not carry it.
        self.register_buffer("table", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, x, offset=0):
        # x: (B, T, d_model), holding positions offset .. offset+T-1
        end = offset + x.size(1)
        table = self.table
        if end > table.size(0):
            table = sinusoidal_table(end, self.d_model).to(table.device)
        return self.dropout(x + table[offset:end].to(x.dtype))

    def at(self, x, positions):
        """x (B, 1, d_model): one step of B streams, each at its own position (B,)."""
        return self.dropout(x + self.table[positions][:, None].to(x.dtype))

    def cover(self, length):
        """Make the stored table reach `length` positions (for at(), which reads only it)."""
        if length > self.table.size(0):
            self.table = sinusoidal_table(length, self.d_model).to(self.table.device)


class LearnablePositionalEncoding(nn.Module):
    """Adds a learned vector per position; positions past max_len are an error."""

    rotates_attention = False

    def __init__(self, d_model, dropout, max_len):
        super().__init__()
        self.max_len = max_len
        self.table = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, offset=0):
        end = offset + x.size(1)
        if end > self.max_len:
            raise ValueError(
                f"learnable positional encoding has {self.max_len} positions "
                f"(`max_positional_encoding_len`), but positions up to {end - 1} were asked "
                f"for; feed at most {self.max_len} bytes or use a larger table")
        return self.dropout(x + self.table[offset:end].to(x.dtype))

    def at(self, x, positions):
        return self.dropout(x + self.table[positions][:, None].to(x.dtype))

    def cover(self, length):
        self.forward(self.table[None, :1], offset=length - 1)  # the clear error past max_len


class RotaryPositions(nn.Module):
    """Rotary position embedding (RoPE, Su et al. 2021): nothing is added to the inputs;
    attention rotates each head's queries and keys by angles that grow with the position,
    so their dot product depends on the distance between positions only. Like the
    sinusoidal table, it works for any length. Here forward() is only the dropout the
    other encodings apply after adding; `rotation(length, offset)` gives the turns."""

    rotates_attention = True

    def __init__(self, d_model, dropout, max_len, head_dim, base=10_000.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (hs/2,)
        self.register_buffer("table", self._angles(0, max_len), persistent=False)
        self._turns = self._turns_of = None  # rotation_at's turns, and the table they are of

    def _angles(self, start, end):
        positions = torch.arange(start, end, dtype=torch.float32, device=self.inv_freq.device)
        return torch.outer(positions, self.inv_freq)  # (end - start, hs/2)

    def forward(self, x, offset=0):
        return dropped(self.dropout, x)

    def at(self, x, positions):
        return dropped(self.dropout, x)

    def cover(self, length):
        if length > self.table.size(0):
            self.table = self._angles(0, length)

    def rotation(self, length, offset=0):
        """The turns (turns_of) of positions offset .. offset+length-1, (length, hs/2)."""
        end = offset + length
        angles = (self.table[offset:end] if end <= self.table.size(0)
                  else self._angles(offset, end))
        return turns_of(angles)

    def rotation_at(self, positions):
        """The turns (turns_of), (B, 1, 1, hs/2): B streams, one position (B,) each.
        Eagerly read from the turns of every stored position, made once (the same values
        as turns_of of those rows: a test), not three operations per decode step."""
        if torch.compiler.is_compiling():
            return turns_of(self.table[positions][:, None, None])
        if self._turns_of is not self.table:  # new, covered further, or moved
            self._turns, self._turns_of = turns_of(self.table), self.table
        return self._turns[positions].view(positions.size(0), 1, 1, -1)


def turns_of(angles):
    """What apply_rotation turns by, made once for every layer of a forward or a decode
    step: eagerly the unit complex numbers of `angles`; compiled (torch.compile cannot
    generate complex code) their (cos, sin)."""
    if torch.compiler.is_compiling():
        return angles.cos(), angles.sin()
    return torch.complex(angles.cos(), angles.sin())


def apply_rotation(x, turns):
    """Rotate (B, nh, T, hs) queries or keys: each channel pair (2i, 2i+1) turns by its
    position's angle i (`turns`: turns_of). Eagerly it is one complex multiply (faster
    on a CPU than the same rotation written out: docs/benchmarks.md, Figures behind
    design choices); compiled it is written out with cos and sin."""
    pairs = (x if x.dtype == torch.float32 else x.float()).unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():  # (B, nh, T, hs/2, 2)
        cos, sin = turns
        real, imaginary = pairs.unbind(-1)
        turned = torch.stack([real * cos - imaginary * sin, real * sin + imaginary * cos], -1)
        return turned.flatten(-2).to(x.dtype)
    turned = torch.view_as_real(torch.view_as_complex(pairs) * turns).flatten(-2)
    return turned if x.dtype == torch.float32 else turned.to(x.dtype)


POSITIONAL_ENCODINGS = {
    "sinusoidal": SinusoidalPositionalEncoding,
    "learnable": LearnablePositionalEncoding,
    "rotary": RotaryPositions,
}

NORMS = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}  # of the CNN frontend


class CausalConv1d(nn.Module):
    """Conv1d over (B, T, C) padded on the left only: output t sees inputs t-k+1 .. t,
    and the length is unchanged for any kernel size."""

    def __init__(self, in_channels, out_channels, kernel_size):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size)
        self.context = kernel_size - 1  # inputs before t that output t needs

    def forward(self, x, past=None):
        """`past` (B, k-1, C_in): the inputs just before x (None = start of the sequence,
        zeros). Returns the output (B, T, C_out) and the last k-1 inputs, the next past."""
        if past is None:
            past = x.new_zeros(x.size(0), self.context, x.size(2))
        x = torch.cat([past, x], dim=1)  # (B, k-1+T, C_in)
        y = self.conv(x.transpose(1, 2)).transpose(1, 2)  # (B, T, C_out)
        return y, x[:, x.size(1) - self.context:]


class ConvBlock(nn.Module):
    """Causal convolution -> activation -> optional LayerNorm over channels -> dropout."""

    def __init__(self, in_channels, out_channels, kernel_size, activation, dropout,
                 use_layernorm):
        super().__init__()
        self.conv = CausalConv1d(in_channels, out_channels, kernel_size)
        self.activation = ACTIVATIONS[activation]()
        self.norm = nn.LayerNorm(out_channels) if use_layernorm else nn.Identity()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, past=None):
        y, past = self.conv(x, past)
        return self.dropout(self.norm(self.activation(y))), past


class CNNFrontend(nn.Module):
    """A stack of causal ConvBlocks over the byte embeddings: (B, T, C_in) -> (B, T, C_out)."""

    def __init__(self, in_channels, out_channels_list, kernel_sizes, activation="gelu",
                 dropout=0.0, use_layernorm=True):
        super().__init__()
        widths = [in_channels] + list(out_channels_list)
        # The model checks its config first (model.structure_problems); strict=True keeps a
        # mismatched pair of lists built in code from being silently truncated.
        self.blocks = nn.ModuleList(
            ConvBlock(c_in, c_out, k, activation, dropout, use_layernorm)
            for c_in, c_out, k in zip(widths[:-1], widths[1:], kernel_sizes, strict=True))
        self.out_channels = widths[-1]

    def forward(self, x, pasts=None):
        """`pasts`: None for a whole sequence from position 0; in incremental generation
        one (B, k-1, C_in) tensor per convolution (zeros at the start), updated in place."""
        for i, block in enumerate(self.blocks):
            x, past = block(x, None if pasts is None else pasts[i])
            if pasts is not None:
                pasts[i].copy_(past)
        return x


# ---------------------------------------------------------------------------
# Hashed n-gram embeddings

NO_BYTE = 256  # stands for the bytes before the start of a view: it has none before it


FNV_BASIS, FNV_PRIME = 0x811C9DC5, 0x01000193


def fnv_step(hashed, salted_byte):
    """One FNV-1a step: the hash so far with one more byte (byte value + 1, so that
    byte 0 changes the hash too)."""
    return ((hashed ^ salted_byte) * FNV_PRIME) & MASK32


def finish_hash(hashed):
    """A multiply-xorshift finish of FNV hashes (any shape): the low bits that pick a
    bucket depend on every byte."""
    for multiplier in (0x7FEB352D, 0x5BD1E995):
        hashed = hashed ^ (hashed >> 15)
        hashed = (hashed * multiplier) & MASK32
    return hashed ^ (hashed >> 16)


def ngram_hashes(joined, orders, length):
    """{n: (B, length) int64 hash in [0, 2^32) of the n bytes ending at each of the last
    `length` positions of `joined` (B, max(orders)-1+length), for each order n.

    FNV-1a over the bytes from the newest back, so the hash of n bytes extends the hash
    of n-1, then one finish_hash of all orders stacked (a prompt's pass and a window's
    refill run this for a few dozen bytes, where each operation costs more to dispatch
    than to compute). Every product stays below 2^63, so int64 never overflows."""
    context, end = joined.size(1) - length, joined.size(1)
    salted = joined + 1
    hashed = torch.full_like(joined[:, context:], FNV_BASIS)
    chain = []
    for back in range(max(orders)):
        hashed = fnv_step(hashed, salted[:, context - back:end - back])  # byte t-back of each t
        chain.append(hashed)
    finished = finish_hash(torch.stack([chain[n - 1] for n in orders]))
    return dict(zip(orders, finished.unbind(0)))


def newest_ngram_hashes(tail, orders):
    """(B, len(orders)) hashes of the n bytes ending at the last byte of `tail`
    (B, max(orders)), each order n in a column: ngram_hashes(tail, orders, 1) in fewer
    tensor operations, for the decode step, where each one is a dispatch that costs more
    than its arithmetic (docs/benchmarks.md, Eager decode step). An update of the last
    step's hashes cannot replace this: FNV-1a here starts from the newest byte, so every
    order's hash changes from its first step on. The chain runs once for all orders and
    one finish mixes all of them. `tail` may also be one stream's bytes as a list of
    ints: then the hashes are a list of ints (the same arithmetic, no tensors)."""
    on_host = isinstance(tail, list)
    salted = [byte + 1 for byte in tail] if on_host else (tail + 1).unbind(1)  # oldest first
    hashed, chain = FNV_BASIS, []
    for back in range(max(orders)):
        hashed = fnv_step(hashed, salted[-1 - back])
        chain.append(hashed)
    if on_host:
        return [finish_hash(chain[n - 1]) for n in orders]
    return finish_hash(torch.stack([chain[n - 1] for n in orders], dim=1))


class HashedNgramEmbedding(nn.Module):
    """For each order n, a table of `buckets` vectors indexed by a hash of the n bytes
    ending at each position (the byte and the n-1 before it), summed (BLT's hash n-gram
    embeddings). Added to the byte embedding, they tell the first layer which n-gram it
    reads, which attention would otherwise spend its first layers assembling. A lookup
    costs no matrix work; at the default size they gained more than any other change
    (docs/benchmarks.md, Quality in 100 seconds)."""

    def __init__(self, orders, buckets, width):
        super().__init__()
        self.orders, self.buckets = tuple(orders), buckets
        self.context = max(orders) - 1  # earlier bytes the newest n-gram reaches back to
        self.embeddings = nn.ModuleList(nn.Embedding(buckets, width) for _ in self.orders)
        # The tables start at zero: the model starts as the byte-embedding model and each
        # row grows as its n-gram is seen (unit-scale rows, like the byte embedding's,
        # drown the byte out and learned less in the trial runs: docs/benchmarks.md,
        # Quality in 100 seconds).
        for table in self.embeddings:
            nn.init.zeros_(table.weight)

    def forward(self, joined):
        """joined (B, context + T): the `context` bytes before T new ones (NO_BYTE where
        there are none), then the new ones -> (B, T, width), one vector per new byte."""
        with profiled("n-gram hashing"):
            hashes = ngram_hashes(joined, self.orders, joined.size(1) - self.context)
        return sum(table(hashes[n] % self.buckets)
                   for n, table in zip(self.orders, self.embeddings))

    def newest(self, tail):
        """forward's vector of the last byte alone, (B, width), from tail (B, context + 1):
        the decode step's path (newest_ngram_hashes), summed in forward's order, so the
        result is the same to the bit."""
        if tail.device.type == "cpu" and not torch.compiler.is_compiling():
            # The bytes are in host memory: hashing them as Python ints costs less than
            # the chain's tensor operations, each a dispatch (docs/benchmarks.md, Eager
            # decode step). Compiled code cannot read values, so it keeps the tensor chain.
            hashes = [[h % self.buckets for h in newest_ngram_hashes(row, self.orders)]
                      for row in tail.tolist()]
            if len(hashes) == 1:  # one stream: its rows as slices, no index tensor or lookup
                vectors = [table.weight[h:h + 1] for h, table in zip(hashes[0], self.embeddings)]
                return self._summed(vectors)
            rows = torch.tensor(hashes).unbind(1)
        else:
            rows = (newest_ngram_hashes(tail, self.orders) % self.buckets).unbind(1)
        return self._summed([F.embedding(row, table.weight)
                             for row, table in zip(rows, self.embeddings)])

    @staticmethod
    def _summed(vectors):
        """The vectors summed in forward's order."""
        total = vectors[0]  # forward's sum starts from 0, which adds nothing
        for vector in vectors[1:]:
            total = total + vector
        return total


# ---------------------------------------------------------------------------
# Patch boundaries of the boundary-fed patch stream (SpaceByte)

START_MARKS = (1, 0, 0)  # the patch marks of a view's start: as if after a spacelike end


def spacelike(x):
    """Bytes x (any shape) -> bool: an ASCII byte that is not a letter or a digit (space,
    punctuation, newline, a control byte). Every byte of 128 and above counts as a
    letter: it is part of a multi-byte character, and most scripts' letters are those."""
    letter_or_digit = (((x >= 48) & (x <= 57)) | ((x >= 65) & (x <= 90))
                       | ((x >= 97) & (x <= 122)))
    return (x < 128) & ~letter_or_digit


def spacelike_patch_ends(x, longest, marks):
    """Which bytes of x (B, T) end a patch: a spacelike byte after a byte that is not (the
    first space or punctuation after a word), and otherwise every `longest`-th byte since
    the last such end, so no patch is longer than `longest` bytes. `marks` (B, 3) long is
    what the bytes before x left, [previous byte spacelike (0/1), bytes since the last
    spacelike end, patches ended]; (1, 0, 0) starts a view. Returns (ends (B, T) bool,
    marks after x) without writing `marks`. Data-parallel: the last natural end before
    each byte comes from a running maximum, not a loop over bytes."""
    T = x.size(1)
    space = spacelike(x)
    before = torch.cat([marks[:, :1].bool(), space[:, :-1]], dim=1)
    natural = space & ~before
    at = torch.arange(T, device=x.device)
    start = -1 - marks[:, 1:2]  # where the last natural end before x sits, in x's places
    last = torch.cummax(torch.where(natural, at, start), dim=1).values  # (B, T): at or before t
    since = at - torch.cat([start, last[:, :-1]], dim=1)  # bytes from that end to t
    ends = natural | (since % longest == 0)
    after = torch.stack([space[:, -1].long(), T - 1 - last[:, -1],
                         marks[:, 2] + ends.sum(dim=1)], dim=1)
    return ends, after
