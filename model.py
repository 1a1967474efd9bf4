"""ByteLLM_GrugV3: a byte-level causal transformer, optionally with a causal CNN frontend
and a second "aggregated" stream that attends over strided patches of bytes.

    single stream:   bytes -> embedding -> [CNN frontend] -> projection -> positions
                     -> causal encoder layers -> final_norm -> fc_out -> logits (B, T, 256)
    parallel stream: the byte stream as above, beside it an aggregator conv (stride s)
                     -> patch positions -> causal encoder layers over patches; byte t
                     reads the state of the last patch complete at t.

`forward_incremental` + `GenerationCache` give the same logits as the full forward, one
chunk of bytes at a time, with keys/values and convolution inputs cached.
"""

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import LEGACY_ARCHITECTURE, RULES, keys_with  # noqa: F401 (main.py imports it here)
from model_components import (NO_BYTE, NORMS, POSITIONAL_ENCODINGS, START_MARKS, CNNFrontend,
                              HashedNgramEmbedding, apply_rotation, dropped, spacelike_patch_ends)
from utils import config_problems

# The config keys the model reads, and those that change the parameters' shapes or the
# math of forward (checkpoints only fit a model built with the same values): KEY_ROLES.
MODEL_KEYS = keys_with("model")
ARCHITECTURE_KEYS = keys_with("architecture")
SMEAR_GATE_INPUTS = 12  # smear's gate reads the first dimensions of a byte's input (modded-nanogpt)


# ---------------------------------------------------------------------------
# Generation cache: preallocated, written in place

class KVCache:
    """Keys and values of one attention layer: (B, nh, capacity, hs) tensors allocated
    once and written in place, so a new byte never copies the past."""

    def __init__(self, batch_size, heads, capacity, head_dim, dtype, device):
        self.k = torch.zeros(batch_size, heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0  # positions written by append (every stream alike)

    @property
    def capacity(self):
        return self.k.size(2)

    def append(self, k, v):
        """Write (B, nh, n, hs) at the next n positions of every stream; return the keys
        and values written so far."""
        end = self.length + k.size(2)
        if end > self.capacity:
            raise ValueError(f"the generation cache holds {self.capacity} positions; "
                             f"{end} were asked for")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def write_at(self, k, v, places):
        """Write (B, nh, 1, hs) at each stream's own position (places: StepPlaces); return
        the whole cache. Index assignment, not scatter_: torch.compile writes it in place,
        where a scatter_ into the cache became a copy of the whole cache and a copy back,
        every step."""
        if k.dtype != self.k.dtype:  # a .to() to the same dtype still costs a call
            k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if places.rows is None:  # one stream, eagerly: a copy at its position costs less
            self.k.index_copy_(2, places.positions, k)
            self.v.index_copy_(2, places.positions, v)
            return self.k, self.v
        k, v = k[:, :, 0], v[:, :, 0]  # (B, nh, hs)
        self.k[places.rows, :, places.positions] = k
        self.v[places.rows, :, places.positions] = v
        return self.k, self.v


class StepPlaces:
    """Where a decode step's byte sits in each of B streams of one cache: positions (B,),
    and what every layer of that stream reads from them, made once per step rather than
    in each layer (a decode step's tensor operations each cost more to dispatch than to
    compute: docs/benchmarks.md, Eager decode step): `rows` (B,) to write the new keys
    and values at (None for one stream decoded eagerly: KVCache.write_at copies to its
    position), and `visible` (B, 1, 1, capacity): which slots, up to a stream's own
    position (the last `window` of them with attention_window), its attention reads.
    Compiled, True there; eagerly 0 there and -inf past it, the additive mask SDPA would
    otherwise make of a bool one in every layer."""

    def __init__(self, positions, capacity, window=None):
        eager, batch = not torch.compiler.is_compiling(), positions.size(0)
        self.positions = positions
        self.rows = None if eager and batch == 1 else torch.arange(batch,
                                                                   device=positions.device)
        slots = torch.arange(capacity, device=positions.device)
        visible = slots <= positions[:, None]
        if window is not None:  # local attention: the last `window` positions only
            visible = visible & (slots > positions[:, None] - window)
        if eager:
            visible = torch.where(visible, 0.0, float("-inf"))
        self.visible = visible.view(batch, 1, 1, capacity)


class GenerationCache:
    """What incremental generation carries between calls, for `batch_size` streams and
    `capacity` positions each. forward_incremental feeds every stream the same bytes
    count (`length`); decode_step feeds each stream one byte at its own position.
    `row(b)` is stream b alone, sharing this cache's storage (to feed one prompt)."""

    PASTS = ("ngram_past", "agg_past", "agg_state", "patch_marks", "smear_past")

    def __init__(self, model, batch_size, capacity, dtype, device):
        self.batch_size, self.capacity, self.length = batch_size, capacity, 0
        heads = model.config["attention_num_heads"]

        def kv_caches(stream, width, slots):
            return [KVCache(batch_size, heads, slots, width // heads, dtype, device)
                    for _ in stream]
        self.byte_kv = kv_caches(model.byte_layers, model.config["attention_d_model"], capacity)
        # the last k-1 inputs of each frontend convolution (zeros before byte 0)
        self.conv_pasts = [torch.zeros(batch_size, block.conv.context, block.conv.conv.in_channels,
                                       dtype=dtype, device=device)
                           for block in (model.cnn_frontend.blocks if model.cnn_frontend else [])]
        # the bytes before the next one that the longest n-gram reaches back to
        self.ngram_past = None
        if model.ngram_embedding is not None:
            self.ngram_past = torch.full((batch_size, model.ngram_embedding.context), NO_BYTE,
                                         dtype=torch.long, device=device)
        # smear: the previous byte's layer input (zeros before byte 0)
        self.smear_past = (torch.zeros(batch_size, model.config["attention_d_model"], dtype=dtype,
                                       device=device) if model.smear_gate is not None else None)
        self.agg_kv, self.agg_past, self.agg_state, self.patch_marks = [], None, None, None
        if model.parallel and model.fusion == "at_boundaries":
            slots = model.patch_slots(capacity) + 1  # + 1: a step writes its next patch's slot
            self.agg_kv = kv_caches(model.agg_stream_encoder, model.config["agg_cnn_out_dim"],
                                    slots)
            self.patch_marks = torch.tensor([START_MARKS] * batch_size, device=device)
        elif model.parallel:
            agg_dim = model.config["agg_cnn_out_dim"]
            self.agg_kv = kv_caches(model.agg_stream_encoder, agg_dim,
                                    capacity // model.agg_stride + 1)
            # the aggregator's last k-1 inputs, and the state of the newest complete patch
            self.agg_past = torch.zeros(batch_size, model.agg_kernel - 1,
                                        model.aggregator_cnn.in_channels, dtype=dtype,
                                        device=device)
            self.no_patch_state = model.no_patch_state.detach().to(dtype)
            self.agg_state = self.no_patch_state.expand(batch_size, 1, agg_dim).clone()

    def reset_row(self, b):
        """Stream b back to position 0 (its keys and values need no clearing: positions
        past a stream's own are never read)."""
        for past in self.conv_pasts + [t for t in (self.agg_past, self.smear_past)
                                       if t is not None]:
            past[b].zero_()
        if self.agg_state is not None:
            self.agg_state[b].copy_(self.no_patch_state)
        if self.ngram_past is not None:
            self.ngram_past[b].fill_(NO_BYTE)
        if self.patch_marks is not None:
            self.patch_marks[b] = torch.tensor(START_MARKS)

    def tensors(self):
        """Every tensor decode_step reads or writes, in the order with_tensors takes them."""
        keys_and_values = [t for kv in self.byte_kv + self.agg_kv for t in (kv.k, kv.v)]
        pasts = [getattr(self, name) for name in self.PASTS if getattr(self, name) is not None]
        return keys_and_values + self.conv_pasts + pasts

    def with_tensors(self, tensors):
        """This cache made of `tensors`, listed as tensors() lists them (row() is made of
        views; the predictor exports decode_step with the cache's tensors as inputs)."""
        tensors, expected = list(tensors), len(self.tensors())
        if len(tensors) != expected:
            raise ValueError(f"this cache is made of {expected} tensors, "
                             f"{len(tensors)} were given")
        view, given = copy.copy(self), iter(tensors)

        def kv_views(caches):
            views = [copy.copy(kv) for kv in caches]
            for kv in views:
                kv.k, kv.v = next(given), next(given)
            return views
        view.byte_kv, view.agg_kv = kv_views(self.byte_kv), kv_views(self.agg_kv)
        view.conv_pasts = [next(given) for _ in self.conv_pasts]
        for name in self.PASTS:
            if getattr(self, name) is not None:
                setattr(view, name, next(given))
        return view

    def row(self, b):
        """Stream b alone, at position 0, in views of this cache's row b."""
        view = self.with_tensors([t[b:b + 1] for t in self.tensors()])
        view.batch_size, view.length = 1, 0
        for kv in view.byte_kv + view.agg_kv:
            kv.length = 0
        return view


# ---------------------------------------------------------------------------
# Transformer layer (with the defaults, the math of nn.TransformerEncoderLayer), plus a
# KV cache and the modern options: RMSNorm, QK-norm, rotary positions, ReLU² and SwiGLU.
# (On a CPU, torch 2.13's RMSNorm is not fused and runs slower than LayerNorm, forward
# and backward: docs/benchmarks.md. QK-norm therefore uses the layers' norm type,
# LayerNorm by default.)

class CausalSelfAttention(nn.Module):

    def __init__(self, d_model, num_heads, dropout, qk_norm=False, norm_type="layernorm",
                 window=None):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.window = window  # a query sees at most this many keys: its own and those before
        self.qkv = nn.Linear(d_model, 3 * d_model)  # q, k, v stacked like in_proj_weight
        self.out_proj = nn.Linear(d_model, d_model)
        head_dim = d_model // num_heads
        # QK-norm: normalised queries and keys per head keep attention logits in range
        # whatever the learning rate does to the weights; the gains learn the sharpness.
        self.q_norm = NORMS[norm_type](head_dim) if qk_norm else None
        self.k_norm = NORMS[norm_type](head_dim) if qk_norm else None

    def forward(self, x, kv_cache=None, rotation=None, places=None, values=None):
        """x (B, T, C) -> (B, T, C). `rotation`: the turns of rotary positions (turns_of).
        With `places` (StepPlaces): one byte per stream (T = 1), each at its own position.
        `values` (B, T, C): added to the values (value embeddings), so the cache holds them."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, C // self.num_heads).permute(
            2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
        if values is not None:
            v = v + values.view(B, T, self.num_heads, -1).transpose(1, 2).to(v.dtype)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotation is not None:
            q, k = apply_rotation(q, rotation), apply_rotation(k, rotation)
        if places is not None:  # a stream sees its own positions (the last `window` of them)
            k, v = kv_cache.write_at(k, v, places)  # (B, nh, capacity, hs)
            y = one_query_attention(q, k, v, places.visible)
        elif kv_cache is None and self.window is not None and T > self.window:
            y = self._attend_locally(q, k, v)
        else:
            mask, is_causal = None, True
            past = 0
            if kv_cache is not None:
                past = kv_cache.length
                k, v = kv_cache.append(k, v)  # (B, nh, past+T, hs)
            if past > 0 or (self.window is not None and past + T > self.window):
                # is_causal aligns its mask top-left, wrong once keys precede the queries:
                # query i sits at position past+i and sees keys 0 .. past+i (the last
                # `window` of them with a window).
                is_causal = False
                mask = band_mask(T, past, self.window, x.device)
            y = self._attend(q, k, v, mask, is_causal)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, nh*hs)
        return self.out_proj(y)

    def _attend_locally(self, q, k, v):
        """Causal attention within the window, in O(T * window): the queries in blocks of
        `window`, each block attending to its own keys and the previous block's (all that
        its window can reach), under one (window, 2 * window) mask per block."""
        B, nh, T, hs = q.shape
        w = self.window
        blocks = -(-T // w)
        q = F.pad(q, (0, 0, 0, blocks * w - T))  # whole blocks; the padded queries are dropped
        # One block of zero keys in front: block b reads slots b*w .. b*w + 2w of these,
        # which hold the keys of positions (b-1)*w .. (b+1)*w - 1.
        k, v = (F.pad(t, (0, 0, w, blocks * w - T)) for t in (k, v))
        k, v = (t.unfold(2, 2 * w, w).permute(0, 2, 1, 4, 3).reshape(B * blocks, nh, 2 * w, hs)
                for t in (k, v))  # (B*blocks, nh, 2w, hs)
        q = q.view(B, nh, blocks, w, hs).transpose(1, 2).reshape(B * blocks, nh, w, hs)
        r = torch.arange(w, device=q.device)[:, None]  # query row within its block
        c = torch.arange(2 * w, device=q.device)  # key slot: position (b-1)*w + c
        mask = (c > r) & (c <= r + w)  # keys from position - window + 1 to position
        first = mask & (c >= w)  # block 0: the slots before position 0 are padding
        mask = torch.stack([first] + [mask] * (blocks - 1)).repeat(B, 1, 1)[:, None]
        y = self._attend(q, k, v, mask, False)  # (B*blocks, nh, w, hs)
        return y.view(B, blocks, nh, w, hs).transpose(1, 2).reshape(B, nh, blocks * w, hs)[:, :, :T]

    def _attend(self, q, k, v, mask, is_causal):
        dropout = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # PyTorch's CPU attention backward in bf16 is several times slower than in fp32
            # (torch 2.13), which cancels bf16's gain in the matmuls: attend in fp32.
            with torch.autocast("cpu", enabled=False):
                return F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                      attn_mask=mask, is_causal=is_causal,
                                                      dropout_p=dropout)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              dropout_p=dropout)


def band_mask(queries, past, window, device):
    """(queries, past + queries) bool: query i, at position past + i, sees the keys at
    positions past + i - window + 1 .. past + i (all from 0 when window is None)."""
    mask = torch.ones(queries, past + queries, dtype=torch.bool, device=device).tril(past)
    if window is not None:
        mask &= ~torch.ones_like(mask).tril(past - window)
    return mask


def one_query_attention(q, k, v, visible):
    """Attention of one query per stream, q (B, nh, 1, hs), over the whole cache, k and v
    (B, nh, capacity, hs), where `visible` (B, 1, 1, capacity) is True (eagerly it may
    also be an additive mask, 0 where visible: StepPlaces). Compiled, it is written out
    instead of SDPA: torch.compile fuses these few operations into its own loops, where
    the call to the CPU flash-attention kernel it kept for SDPA cannot be fused and cost
    a large share of the compiled decode step (docs/benchmarks.md, Figures behind design
    choices). Eagerly, SDPA is one call where they are five. Scores and softmax in fp32."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # In fp32 on a CPU, as _attend: under autocast each step would cast the whole cache
        # (fp32 on a CPU) to bf16, for products of one row that the CPU's bf16 kernels run
        # slower than its fp32 ones (docs/benchmarks.md, Eager decode step).
        with torch.autocast("cpu", enabled=False):
            return one_query_attention(q.float(), k.float(), v.float(), visible)
    if not torch.compiler.is_compiling() and q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    scores = (q @ k.transpose(-1, -2)).float() * (1.0 / math.sqrt(q.size(-1)))
    if visible.dtype == torch.bool:
        scores = scores.masked_fill(~visible, float("-inf"))
    else:  # the additive mask (eagerly, in a precision SDPA is not called for here)
        scores = scores + visible
    return scores.softmax(dim=-1).to(v.dtype) @ v  # (B, nh, 1, hs)


class FeedForward(nn.Module):
    """linear1 -> activation -> linear2. "swiglu" splits linear1's output into a value
    and a SiLU gate; its width is 2/3 of the others', so the parameter count matches."""

    def __init__(self, d_model, multiplier, dropout, activation="gelu"):
        super().__init__()
        self.activation = activation
        hidden = multiplier * d_model
        if activation == "swiglu":
            hidden = max(1, round(2 * hidden / 3))
        self.linear1 = nn.Linear(d_model, 2 * hidden if activation == "swiglu" else hidden)
        self.linear2 = nn.Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        h = self.linear1(x)
        if self.activation == "swiglu":
            value, gate = h.chunk(2, dim=-1)
            h = value * F.silu(gate)
        elif self.activation == "relu2":
            h = F.relu(h)
            h = h * h  # faster than .square() forward and backward on a CPU (docs/benchmarks.md)
        else:
            h = F.gelu(h)
        return dropped(self.dropout, self.linear2(dropped(self.dropout, h)))


class EncoderLayer(nn.Module):
    """Causal self-attention + feed-forward, pre-norm or post-norm."""

    def __init__(self, d_model, num_heads, ffn_mult, dropout, norm_first, norm_type="layernorm",
                 qk_norm=False, ffn_activation="gelu", window=None):
        super().__init__()
        self.norm_first = norm_first
        self.attn = CausalSelfAttention(d_model, num_heads, dropout, qk_norm, norm_type, window)
        self.ffn = FeedForward(d_model, ffn_mult, dropout, ffn_activation)
        self.norm1 = NORMS[norm_type](d_model)
        self.norm2 = NORMS[norm_type](d_model)
        self.attn_dropout = nn.Dropout(dropout)

    def forward(self, x, kv_cache=None, rotation=None, places=None, values=None):
        if self.norm_first:
            x = x + dropped(self.attn_dropout,
                            self.attn(self.norm1(x), kv_cache, rotation, places, values))
            return x + self.ffn(self.norm2(x))
        x = self.norm1(x + dropped(self.attn_dropout,
                                   self.attn(x, kv_cache, rotation, places, values)))
        return self.norm2(x + self.ffn(x))


def encoder_stack(num_layers, d_model, config, window=None):
    return nn.ModuleList(
        EncoderLayer(d_model, config["attention_num_heads"], config["ffn_dim_multiply"],
                     config["transformer_dropout"], config["transformer_norm_first"],
                     config["norm_type"], config["qk_norm"], config["ffn_activation"], window)
        for _ in range(num_layers))


# ---------------------------------------------------------------------------
# Config checks

def model_config_problems(c):
    """Every problem in the model keys of config `c` that would make a broken model."""
    return config_problems(c, RULES, MODEL_KEYS, cross_checks=(structure_problems,))


def structure_warnings(c):
    """Model settings that are valid but cannot do what they are for."""
    warnings = []
    longer = [n for n in c["ngram_orders"] if n > c["sequence_length"]]
    if longer:
        warnings.append(f"`ngram_orders` {longer} are longer than the window (sequence_length "
                        f"{c['sequence_length']}): no training window holds such an n-gram, "
                        f"so those tables only learn padding; drop them or widen the window")
    if c["ngram_orders"] and c["ngram_buckets"] == 1:
        warnings.append("`ngram_buckets` = 1 puts every n-gram in the same row: the n-gram "
                        "tables cannot tell n-grams apart; use thousands of buckets, or "
                        "ngram_orders=[] to turn them off")
    return warnings


def structure_problems(c):
    """Rules that tie model keys together. `c` holds only keys whose own values are valid,
    so a rule whose keys are missing is skipped."""
    def has(*keys):
        return all(c.get(k) is not None for k in keys)

    problems = []
    if has("vocab_size") and c["vocab_size"] != 256:
        problems.append(f"`vocab_size` must be 256 (one entry per byte), got {c['vocab_size']!r}")
    widths = ["attention_d_model"] + (["agg_cnn_out_dim"] if c.get("use_parallel_stream_model")
                                      else [])
    for key in widths:
        if has("attention_num_heads", key) and c[key] % c["attention_num_heads"]:
            problems.append(f"`attention_num_heads` ({c['attention_num_heads']}) must divide "
                            f"`{key}` ({c[key]})")
        elif has("attention_num_heads", key, "positional_encoding_type") \
                and c["positional_encoding_type"] == "rotary" \
                and (c[key] // c["attention_num_heads"]) % 2:
            problems.append(f"rotary positions turn pairs of channels: the head width "
                            f"`{key}` / `attention_num_heads` ({c[key]} / "
                            f"{c['attention_num_heads']}) must be even")
    if has("ngram_orders") and len(set(c["ngram_orders"])) != len(c["ngram_orders"]):
        problems.append(f"`ngram_orders` lists an order twice: {c['ngram_orders']!r}")
    if has("cnn_out_channels_list", "cnn_kernel_sizes"):
        channels, kernels = c["cnn_out_channels_list"], c["cnn_kernel_sizes"]
        if len(channels) != len(kernels):
            problems.append(f"`cnn_kernel_sizes` has {len(kernels)} entries but "
                            f"`cnn_out_channels_list` has {len(channels)}: give one kernel "
                            f"size per convolution")
        if c.get("use_cnn_frontend") and not channels:
            problems.append("`use_cnn_frontend` is True but `cnn_out_channels_list` is empty")
    if has("positional_encoding_type", "sequence_length", "max_positional_encoding_len") \
            and c["positional_encoding_type"] == "learnable" \
            and c["sequence_length"] > c["max_positional_encoding_len"]:
        problems.append(f"learnable positions: `sequence_length` ({c['sequence_length']}) "
                        f"exceeds `max_positional_encoding_len` "
                        f"({c['max_positional_encoding_len']})")
    if has("sequence_length", "agg_cnn_stride") and c.get("use_parallel_stream_model") \
            and c["sequence_length"] < c["agg_cnn_stride"]:
        problems.append(f"`sequence_length` ({c['sequence_length']}) must be at least "
                        f"`agg_cnn_stride` ({c['agg_cnn_stride']})")
    if has("patch_boundaries", "parallel_fusion") and c["patch_boundaries"] == "spacelike" \
            and c["parallel_fusion"] != "at_boundaries":
        problems.append("`patch_boundaries` \"spacelike\" needs `parallel_fusion` "
                        "\"at_boundaries\" (the other fusions pool fixed patches)")
    return problems


# ---------------------------------------------------------------------------
# The model

def patch_slots(length, stride, boundaries, max_patches=None):
    """The most patches a view of `length` bytes can end ("at_boundaries"): the full
    forward pads every view's patches to this, so that its shapes, and so its rounding,
    depend on the length alone and never on the bytes (the causality tests compare bits).
    `stride`: the patch length (fixed) or the longest patch (spacelike)."""
    if boundaries == "fixed":
        most = length // stride
    elif stride == 1:
        most = length
    elif stride == 2:
        # Two ends in a row only as a length-forced end then a spacelike one, after which
        # the next byte ends none: no three ends in a row ("aa.aa.").
        most = length - length // 3
    else:
        # Ends two bytes apart at the closest ("a.a."), or a forced end then a spacelike
        # one, at least `stride` bytes after the end before ("aaa.").
        most = (length + 1) // 2
    return most if max_patches is None else min(most, max_patches)


def positional_encoding(config, width):
    """The configured positional encoding for a stream of `width` channels."""
    encoding = POSITIONAL_ENCODINGS[config["positional_encoding_type"]]
    arguments = (width, config["pe_dropout"], config["max_positional_encoding_len"])
    if encoding.rotates_attention:
        return encoding(*arguments, head_dim=width // config["attention_num_heads"])
    return encoding(*arguments)


def placed(encoding, x, start, positions=None):
    """x (B, T, C) with its positions encoded, and the turns of rotary positions that
    attention needs (turns_of; None for encodings that add to x). positions None: x holds
    positions start .. start+T-1; positions (B,): one input per stream (T = 1), each at
    its own position, read from the stored tables only (what a compiled decode step can
    trace)."""
    if positions is None:
        rotation = (encoding.rotation(x.size(1), start) if encoding.rotates_attention
                    else None)
        return encoding(x, offset=start), rotation
    rotation = encoding.rotation_at(positions) if encoding.rotates_attention else None
    return encoding.at(x, positions), rotation


class ByteLLM_GrugV3(nn.Module):

    def __init__(self, config):
        super().__init__()
        problems = model_config_problems(config)
        if problems:
            raise ValueError("bad model configuration:\n" + "\n".join(f"  - {p}" for p in problems))
        c = config
        self.config = dict(config)
        self.context_length = c["sequence_length"]  # the window the model was trained on
        self.training_objective = c["training_objective"]
        self.parallel = c["use_parallel_stream_model"]
        self.fusion = self.inject_before = None  # the parallel stream's (below)
        self.softcap = c["logit_softcap"]
        d_model = c["attention_d_model"]

        self.embedding = nn.Embedding(c["vocab_size"], c["embedding_dim"])
        self.ngram_embedding = (HashedNgramEmbedding(c["ngram_orders"], c["ngram_buckets"],
                                                     c["embedding_dim"])
                                if c["ngram_orders"] else None)
        self.cnn_frontend = None
        front_width = c["embedding_dim"]
        if c["use_cnn_frontend"]:
            self.cnn_frontend = CNNFrontend(c["embedding_dim"], c["cnn_out_channels_list"],
                                            c["cnn_kernel_sizes"], c["cnn_activation"],
                                            c["cnn_dropout"], c["cnn_use_layernorm"])
            front_width = self.cnn_frontend.out_channels
        self.projection = (nn.Linear(front_width, d_model) if front_width != d_model
                           else nn.Identity())
        self.pos_encoding = positional_encoding(c, d_model)
        out_width = d_model
        if self.parallel:
            self.byte_stream_encoder = encoder_stack(c["num_byte_stream_layers"], d_model, c,
                                                     c["attention_window"])
            agg_dim = c["agg_cnn_out_dim"]
            self.agg_kernel, self.agg_stride = c["agg_cnn_kernel_size"], c["agg_cnn_stride"]
            self.agg_pos_encoding = positional_encoding(c, agg_dim)
            self.agg_stream_encoder = encoder_stack(c["num_agg_stream_layers"], agg_dim, c)
            self.fusion, self.inject_before = c["parallel_fusion"], None
            self.boundaries = c["patch_boundaries"]
            self.max_patches = c["max_patches_per_window"]
            if self.fusion == "at_boundaries":  # SpaceByte: no aggregator, no lag
                self.bytes_to_patch = nn.Linear(d_model, agg_dim)
                self.patch_to_bytes = nn.Linear(agg_dim, d_model)
                self.inject_before = c["num_byte_stream_layers"] // 2
            else:
                self.aggregator_cnn = nn.Conv1d(front_width, agg_dim, self.agg_kernel,
                                                stride=self.agg_stride)
                self.no_patch_state = nn.Parameter(torch.randn(agg_dim) * 0.02)  # before patch 0
            if self.fusion == "concat_output":
                out_width += agg_dim
            elif self.fusion in ("add_input", "add_middle"):
                # the patch state enters the byte stream, before the first or middle layer
                self.patch_to_bytes = nn.Linear(agg_dim, d_model)
                self.inject_before = (0 if self.fusion == "add_input"
                                      else c["num_byte_stream_layers"] // 2)
        else:
            self.transformer_encoder = encoder_stack(c["num_attention_layers"], d_model, c,
                                                     c["attention_window"])
        # Options of published small-model recipes (modded-nanogpt), on the byte layers;
        # each starts as the model without it (docs/benchmarks.md, Recipe candidates).
        layers = len(self.byte_layers)
        self.smear_gate = self.smear_scale = self.embedding_scales = self.value_embeddings = None
        if c["smear_previous_byte"]:
            self.smear_gate = nn.Linear(min(SMEAR_GATE_INPUTS, d_model), 1, bias=False)
            self.smear_scale = nn.Parameter(torch.zeros(()))
        if c["embeddings_into_every_layer"]:
            self.embedding_scales = nn.Parameter(torch.zeros(layers))
        if c["value_embeddings"]:
            self.value_embeddings = nn.ModuleList(nn.Embedding(c["vocab_size"], d_model)
                                                  for _ in range(layers))
        self.final_norm = NORMS[c["norm_type"]](out_width)
        self.output_dropout = nn.Dropout(c["output_dropout"])
        self.fc_out = nn.Linear(out_width, c["vocab_size"])
        self._init_weights(c["zero_init_output_projections"])

    @property
    def byte_layers(self):
        return self.byte_stream_encoder if self.parallel else self.transformer_encoder

    @property
    def streams(self):
        return [self.byte_layers] + ([self.agg_stream_encoder] if self.parallel else [])

    def hidden_matrices(self):
        """The 2-D weights inside the transformer layers (what Muon optimizes); the
        embedding, output head, norms, biases and convolutions are not among them."""
        return [layer_module.weight for stream in self.streams for layer in stream
                for layer_module in (layer.attn.qkv, layer.attn.out_proj,
                                     layer.ffn.linear1, layer.ffn.linear2)]

    def sparse_tables(self):
        """The embedding modules a step looks up only a few rows of (the n-gram tables;
        what RowSparseAdamW optimizes with sparse_table_updates). The byte embedding is
        not among them: a step uses most of its 256 rows."""
        return list(self.ngram_embedding.embeddings) if self.ngram_embedding is not None else []

    def _init_weights(self, zero_output_projections):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # Unit scale, like the sin/cos table: at 0.02 the positions drown out the bytes and
        # learning stalls for the first hundred steps.
        nn.init.normal_(self.embedding.weight, mean=0.0, std=1.0)
        for table in self.value_embeddings or []:  # zero: the values start as without them
            nn.init.zeros_(table.weight)
        # Residual projections shrink with depth (GPT-2): the sum of L layers' updates to the
        # residual stream starts equally small whatever L is. Or they start at zero, so
        # every layer starts as the identity (modded-nanogpt).
        for stream in self.streams:
            std = 0.02 / math.sqrt(2 * len(stream))
            for layer in stream:
                for weight in (layer.attn.out_proj.weight, layer.ffn.linear2.weight):
                    if zero_output_projections:
                        nn.init.zeros_(weight)
                    else:
                        nn.init.normal_(weight, mean=0.0, std=std)

    # --- the shared body of forward and forward_incremental -----------------

    def _embed(self, x, cache=None):
        """x (B, T) bytes -> (B, T, E): the byte embedding, plus the hashed n-gram
        embeddings of the n bytes ending at each byte. Without a cache x starts a view,
        with nothing before it; with one, the cache holds the bytes before x and is
        moved on past x."""
        h = self.embedding(x)
        if self.ngram_embedding is None:
            return h
        past = (x.new_full((x.size(0), self.ngram_embedding.context), NO_BYTE) if cache is None
                else cache.ngram_past)
        joined = torch.cat([past, x], dim=1)
        if cache is not None:
            cache.ngram_past.copy_(joined[:, x.size(1):])
        if x.size(1) == 1:  # a decode step: the shorter path of one byte, same vectors
            return h + self.ngram_embedding.newest(joined)[:, None]
        return h + self.ngram_embedding(joined)

    def _hidden_states(self, x, cache=None, positions=None, patch_due=None):
        """x (B, T) bytes -> (B, T, out_width) states before final_norm: the one wiring of
        the streams, for three callers that differ only in where the bytes sit and what
        is cached. cache None: a whole sequence from position 0 (forward). A cache: the
        T bytes after the cache.length it holds (forward_incremental). positions (B,):
        one byte per stream (T = 1), each at its own position (decode_step; patch_due as
        there)."""
        start = 0 if cache is None else cache.length
        h = self._embed(x, cache)  # (B, T, E)
        if self.cnn_frontend is not None:
            h = self.cnn_frontend(h, None if cache is None else cache.conv_pasts)
        z = self.projection(h)  # (B, T, d_model)
        if self.smear_gate is not None:
            z = self._smeared(z, cache)
        inputs = z  # what embeddings_into_every_layer adds again
        z, rotation = placed(self.pos_encoding, z, start, positions)
        patches = None  # (B, T, D_agg): for each byte, the state of its last complete patch
        if self.parallel and self.fusion != "at_boundaries":
            patches = (self._patch_state_per_byte(h, cache) if positions is None
                       else self._patch_state_at(h, cache, positions, patch_due))
        kvs = [None] * len(self.byte_layers) if cache is None else cache.byte_kv
        places = None if positions is None else StepPlaces(positions, cache.capacity,
                                                           self.config["attention_window"])
        for i, (layer, kv) in enumerate(zip(self.byte_layers, kvs)):
            if i == self.inject_before and self.fusion == "at_boundaries":
                z = z + self._patches_at_ends(z, x, cache, positions, patch_due)
            elif i == self.inject_before:
                z = z + self.patch_to_bytes(patches.to(z.dtype))
            if self.embedding_scales is not None:  # at layer 0, a learned scale of the input
                z = z + self.embedding_scales[i] * inputs
            values = None if self.value_embeddings is None else self.value_embeddings[i](x)
            z = layer(z, kv, rotation, places, values)  # (B, T, d_model)
        if patches is not None and self.fusion == "concat_output":
            z = torch.cat([z, patches.to(z.dtype)], dim=-1)
        return z

    def _smeared(self, z, cache=None):
        """z (B, T, D) plus, at each byte, a gated share of the previous byte's z (smear:
        modded-nanogpt): what the n-gram tables give the byte's identity, for its state.
        Without a cache the byte before z is none (zeros); with one, the cache holds it
        and is moved on past z."""
        past = (z.new_zeros(z.size(0), 1, z.size(2)) if cache is None
                else cache.smear_past[:, None].to(z.dtype))
        previous = torch.cat([past, z[:, :-1]], dim=1)
        if cache is not None:
            cache.smear_past.copy_(z[:, -1])
        gate = torch.sigmoid(self.smear_gate(z[..., :self.smear_gate.in_features]))  # (B, T, 1)
        return z + self.smear_scale * gate * previous

    def _patch_stream(self, patches, kvs, start, positions=None):
        """Patch inputs (B, n, D_agg) -> the patch stream's states of those patches: n
        patches from patch `start`, or (positions (B,)) one per stream at its own. `kvs`:
        the patch layers' KV caches, or None."""
        patches, rotation = placed(self.agg_pos_encoding, patches, start, positions)
        kvs = kvs or [None] * len(self.agg_stream_encoder)
        places = None if positions is None else StepPlaces(positions, kvs[0].capacity)
        for layer, kv in zip(self.agg_stream_encoder, kvs):
            patches = layer(patches, kv, rotation, places)
        return patches

    def _patch_state_per_byte(self, h, cache=None):
        """Frontend output h (B, T, C) -> (B, T, D_agg): for byte t, the aggregated stream's
        state of the last patch complete at t, j(t) = (t+1)//s - 1, or the "no patch yet"
        vector. Patch j summarises bytes (j+1)s-k .. (j+1)s-1 (zeros before byte 0)."""
        k, s = self.agg_kernel, self.agg_stride
        B, T, C = h.shape
        start = 0 if cache is None else cache.length
        done = start // s                    # patches completed before this call
        new = (start + T) // s - done        # patches completing in this call
        past = h.new_zeros(B, k - 1, C) if cache is None else cache.agg_past
        joined = torch.cat([past.to(h.dtype), h], dim=1)  # (B, k-1+T, C): bytes start-k+1 ..
        previous = (self.no_patch_state.view(1, 1, -1).expand(B, 1, -1) if cache is None
                    else cache.agg_state)
        states = previous  # (B, 1, D_agg): state of patch done-1
        if new > 0:
            first = (done + 1) * s - 1 - start  # where patch `done`'s window starts in joined
            window = joined[:, first:first + (new - 1) * s + k]  # (B, (new-1)s+k, C)
            patches = self.aggregator_cnn(window.transpose(1, 2)).transpose(1, 2)  # (B, new, D_agg)
            patches = self._patch_stream(patches, None if cache is None else cache.agg_kv, done)
            states = torch.cat([previous.to(patches.dtype), patches], dim=1)  # (B, 1+new, D_agg)
        if cache is not None:
            cache.agg_past.copy_(joined[:, joined.size(1) - (k - 1):])
            cache.agg_state.copy_(states[:, -1:])
        positions = torch.arange(start, start + T, device=h.device)
        return states[:, (positions + 1) // s - done]  # index 0 = patch done-1 (or none)

    def _patch_state_at(self, h, cache, positions, patch_due=None):
        """decode_step's _patch_state_per_byte: one frontend output per stream, h (B, 1, C),
        at per-stream positions. To keep one shape for every step, the patch stream runs
        for every stream on the patch its byte belongs to; a stream whose patch is not
        complete keeps its previous state (what it wrote into the patch cache is
        overwritten when the patch completes, and read by no one before). patch_due=False
        (no stream completes a patch at this byte) skips the patch stream: nothing it
        would compute is kept."""
        s = self.agg_stride
        window = torch.cat([cache.agg_past, h.to(cache.agg_past.dtype)], dim=1)  # last k inputs
        cache.agg_past.copy_(window[:, 1:])
        if patch_due is False:
            return cache.agg_state
        # The convolution over its one window, as the matrix-vector product it is (the same
        # sum): compiled for the CPU, a Conv1d ran as PyTorch's unfold-and-multiply, a
        # slow call of its own (docs/benchmarks.md), where a product is compiled into the
        # step's own loops.
        conv = self.aggregator_cnn
        patch = F.linear(window.transpose(1, 2).flatten(1), conv.weight.flatten(1),
                         conv.bias)[:, None]  # (B, 1, D_agg)
        patch = self._patch_stream(patch, cache.agg_kv, None, positions // s)  # each byte's patch
        complete = ((positions + 1) % s == 0)[:, None, None]
        cache.agg_state.copy_(torch.where(complete, patch.to(cache.agg_state.dtype),
                                          cache.agg_state))
        return cache.agg_state

    def _patch_ends(self, x, cache, positions):
        """(ends (B, T) bool, marks after x) for bytes x: which bytes end a patch. A view
        takes at most max_patches_per_window patches: later ends are not ends."""
        marks = (torch.tensor([START_MARKS], device=x.device).expand(x.size(0), 3)
                 if cache is None else cache.patch_marks)
        if self.boundaries == "spacelike":
            ends, after = spacelike_patch_ends(x, self.agg_stride, marks)
        else:
            if positions is None:
                at = torch.arange(x.size(1), device=x.device) + (0 if cache is None
                                                                  else cache.length)
                ends = ((at + 1) % self.agg_stride == 0).expand(x.size(0), -1)
            else:
                ends = ((positions + 1) % self.agg_stride == 0)[:, None]
            after = marks  # fixed patches keep the other marks; the count is added below
        capped = self.max_patches is not None
        if capped:
            ends = ends & (marks[:, 2:] + ends.cumsum(dim=1) <= self.max_patches)
        if capped or self.boundaries != "spacelike":  # spacelike_patch_ends counted the rest
            after = torch.cat([after[:, :2], marks[:, 2:] + ends.sum(1, keepdim=True)], 1)
        return ends, after

    def patch_slots(self, length):
        return patch_slots(length, self.agg_stride, self.boundaries, self.max_patches)

    def _patches_at_ends(self, z, x, cache=None, positions=None, patch_due=None):
        """SpaceByte's patch stream: the byte stream's states z (B, T, d) at the bytes that
        end a patch, one patch each, through the patch layers; their outputs come back as
        (B, T, d) to add to z at those same bytes (zeros elsewhere). A byte's state
        depends on the bytes up to it only, so the patch it ends informs it and every
        later byte, with no lag. Three paths as _hidden_states: a whole view, a chunk
        after a cache (each stream's patches in a loop, since streams end different
        numbers), and one byte per stream (patch_due False: no stream ends a patch)."""
        ends, marks = self._patch_ends(x, cache, positions)
        if cache is not None:
            done = cache.patch_marks[:, 2].clone()
            cache.patch_marks.copy_(marks)
        added = torch.zeros_like(z)
        if positions is not None:
            if patch_due is False:
                return added
            # Every stream runs its next patch (one shape for every step); a stream whose
            # byte ends none discards the output, and the keys it wrote at that patch's slot
            # are overwritten before any query reads them.
            patch = self._patch_stream(self.bytes_to_patch(z), cache.agg_kv, None, done)
            return torch.where(ends[:, :, None], self.patch_to_bytes(patch).to(z.dtype), added)
        if cache is None:
            counts, most = ends.sum(dim=1), self.patch_slots(z.size(1))
            if most == 0:
                return added
            # The ends of each row first, in order (a stable sort of not-end), padded with
            # other bytes whose outputs are zeroed: they come after every real patch, so
            # causal attention keeps them out of the real ones.
            order = torch.sort((~ends).to(torch.uint8), dim=1, stable=True).indices[:, :most]
            index = order[:, :, None].expand(-1, -1, z.size(2))
            patches = self._patch_stream(self.bytes_to_patch(z.gather(1, index)), None, 0)
            real = (torch.arange(most, device=z.device) < counts[:, None])[:, :, None]
            out = self.patch_to_bytes(patches).to(z.dtype) * real
            return added.scatter(1, index, out)
        for b in range(z.size(0)):
            where = ends[b].nonzero().flatten()
            if len(where) == 0:
                continue
            kvs = [copy.copy(kv) for kv in cache.agg_kv]  # row b's caches, at its own length
            for kv in kvs:
                kv.k, kv.v, kv.length = kv.k[b:b + 1], kv.v[b:b + 1], int(done[b])
            patches = self._patch_stream(self.bytes_to_patch(z[b:b + 1, where]), kvs, int(done[b]))
            added[b, where] = self.patch_to_bytes(patches[0]).to(z.dtype)
        return added

    def _logits(self, hidden):
        logits = self.fc_out(dropped(self.output_dropout, self.final_norm(hidden)))
        if self.softcap:
            # Soft-capping (Gemma 2): smooth in the middle, never beyond ±softcap, so no
            # byte's logit runs away while the rest catch up.
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    # --- public API ----------------------------------------------------------

    def forward(self, x, targets=None, last_only=False):
        """x (B, T) int64 bytes. Without targets: logits (B, T, 256), or with `last_only`
        the last position's alone, (B, 1, 256), as forward_incremental gives them (the
        uncached generation path reads no others). With targets (B, T): the mean
        cross-entropy in nats per byte over the training objective's positions."""
        hidden = self._hidden_states(x)  # (B, T, out_width)
        if targets is None:
            return self._logits(hidden[:, -1:] if last_only else hidden)
        if self.training_objective == "last_byte":
            # Only the last position reaches final_norm and fc_out.
            return F.cross_entropy(self._logits(hidden[:, -1]), targets[:, -1])
        logits = self._logits(hidden)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

    def loss(self, x, y):
        return self(x, y)

    def new_cache(self, batch_size, capacity=None, dtype=torch.float32):
        """An empty GenerationCache of `capacity` positions per stream (default: the
        training window), at position 0, on the model's device."""
        capacity = capacity or self.context_length
        device = self.embedding.weight.device
        for encoding in [self.pos_encoding] + ([self.agg_pos_encoding] if self.parallel else []):
            encoding.cover(capacity)  # decode_step reads positions from the stored tables
        return GenerationCache(self, batch_size, capacity, dtype, device)

    @torch.no_grad()
    def decode_step(self, byte, cache, positions, patch_due=None):
        """Logits (B, 256) after one new byte per stream: byte (B,) at positions (B,),
        each stream's own. Writes the cache in place, and has the same shapes at every
        call, so torch.compile turns it into a few kernels once. Equals the full
        forward's logits at those positions. Parallel stream: `patch_due`, where the
        caller knows it without reading the device, says whether any stream's byte
        completes a patch (False: the patch stream is skipped, as it can be for most
        bytes; None: it runs at every byte). A compiled step makes one graph for each
        value it is given."""
        hidden = self._hidden_states(byte[:, None], cache, positions, patch_due)
        return self._logits(hidden)[:, 0]

    @torch.no_grad()
    def forward_incremental(self, x_new, cache, last_only=False):
        """Logits (B, n, 256) of x_new (B, n), which holds positions cache.length ..
        cache.length+n-1; the cache is updated in place. Equals the full forward's logits
        at those positions, for any split of the sequence into chunks. `last_only`: the
        last position's alone, (B, 1, 256), all that a prompt's pass or a window's refill
        reads (the output layer is then one row's work, not n rows')."""
        if x_new.dim() != 2 or x_new.size(1) < 1 or x_new.size(0) != cache.batch_size:
            raise ValueError(f"x_new must be (batch {cache.batch_size}, n >= 1), got "
                             f"{tuple(x_new.shape)}")
        hidden = self._hidden_states(x_new, cache)
        cache.length += x_new.size(1)
        return self._logits(hidden[:, -1:] if last_only else hidden)


# ---------------------------------------------------------------------------
# Sizes

def count_parameters(model):
    """Trainable parameters (a DDP or torch.compile wrapper shares its model's)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameters_of(config):
    """How many parameters the model of `config` would have, without allocating them."""
    with torch.device("meta"):
        return count_parameters(ByteLLM_GrugV3(config))
