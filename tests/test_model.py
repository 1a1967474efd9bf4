"""Tests of the GrugV3 model: causality, cache equivalence, objectives, checkpoints,
config errors, learning. Tiny models only: the whole file runs in seconds."""

import io

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from config import CONFIG_V3
from tests.conftest import RECIPE_OPTIONS
from model import (ARCHITECTURE_KEYS, ByteLLM_GrugV3, CausalSelfAttention, EncoderLayer,
                   band_mask, count_parameters)
from model_components import (NO_BYTE, START_MARKS, CNNFrontend, HashedNgramEmbedding,
                              LearnablePositionalEncoding, RotaryPositions,
                              SinusoidalPositionalEncoding, newest_ngram_hashes, ngram_hashes,
                              spacelike_patch_ends)


@pytest.fixture(autouse=True)
def one_thread():
    # Models this small run faster on one thread, and far faster when the cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides):
    config = dict(CONFIG_V3)
    config.update(embedding_dim=32, attention_d_model=32, attention_num_heads=2,
                  ffn_dim_multiply=2, num_attention_layers=2, num_byte_stream_layers=2,
                  num_agg_stream_layers=1, agg_cnn_out_dim=16, sequence_length=16,
                  max_positional_encoding_len=64,
                  # The seed's layers unless a case asks otherwise: old checkpoints load with
                  # them (LEGACY_ARCHITECTURE), so they keep their own causality/cache cases.
                  positional_encoding_type="sinusoidal", qk_norm=False, ngram_orders=[],
                  smear_previous_byte=False, embeddings_into_every_layer=False,
                  value_embeddings=False)
    config.update(overrides)
    return config


def tiny_model(seed=0, **overrides):
    """A model in eval mode with large random weights, so that any wrong connection moves
    the logits far more than rounding does."""
    torch.manual_seed(seed)
    model = ByteLLM_GrugV3(tiny_config(**overrides))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model.eval()


CNN = dict(use_cnn_frontend=True, cnn_out_channels_list=[24, 32], cnn_kernel_sizes=[2, 3])
PARALLEL = dict(use_parallel_stream_model=True)
MODERN = dict(positional_encoding_type="rotary", norm_type="rmsnorm", qk_norm=True,
              ffn_activation="relu2")
DEFAULT_LAYERS = {key: CONFIG_V3[key] for key in ("positional_encoding_type", "qk_norm",
                                                  "norm_type", "ffn_activation",
                                                  "ngram_orders", "ngram_buckets",
                                                  "smear_previous_byte",
                                                  "embeddings_into_every_layer",
                                                  "value_embeddings")}
# Hashed n-grams with a small table (collisions happen) and orders with a gap.
NGRAMS = dict(ngram_orders=[2, 3, 5], ngram_buckets=61)
# RECIPE_OPTIONS (conftest): tiny_model's random weights make every scale and gate non-zero.

# (name, overrides): both architectures, frontend on/off, even and odd kernels, and
# aggregator kernels below, at and above the stride, strides that do not divide T = 13.
AT_SPACELIKE_ENDS_3 = dict(PARALLEL, parallel_fusion="at_boundaries", patch_boundaries="spacelike",
                           agg_cnn_stride=3)
ARCHITECTURES = [
    ("single", {}),
    ("single-cnn-k2k3", CNN),
    ("single-cnn-learnable", dict(CNN, cnn_kernel_sizes=[4, 1], positional_encoding_type="learnable")),
    ("parallel-k3s2", dict(PARALLEL, agg_cnn_kernel_size=3, agg_cnn_stride=2)),
    ("parallel-k2s3-cnn", dict(PARALLEL, **CNN, agg_cnn_kernel_size=2, agg_cnn_stride=3)),
    ("parallel-k4s4", dict(PARALLEL, agg_cnn_kernel_size=4, agg_cnn_stride=4)),
    ("parallel-k1s3", dict(PARALLEL, agg_cnn_kernel_size=1, agg_cnn_stride=3)),
    ("parallel-k5s2-cnn-postnorm", dict(PARALLEL, **CNN, agg_cnn_kernel_size=5, agg_cnn_stride=2,
                                        transformer_norm_first=False)),
    # config.py's default layers, then the other modern options, in both architectures.
    ("single-default-layers", DEFAULT_LAYERS),
    ("parallel-default-layers-k3s2", dict(PARALLEL, **DEFAULT_LAYERS, agg_cnn_kernel_size=3,
                                          agg_cnn_stride=2)),
    ("single-rotary-rmsnorm-qknorm-swiglu", {**MODERN, "ffn_activation": "swiglu"}),
    ("single-cnn-rotary-relu2-softcap", dict(CNN, positional_encoding_type="rotary",
                                             ffn_activation="relu2", logit_softcap=5.0)),
    ("parallel-rotary-k3s2", dict(PARALLEL, **MODERN, agg_cnn_kernel_size=3, agg_cnn_stride=2)),
    # The patch state fed into the byte stream (MEGABYTE-like), first or middle layer.
    ("parallel-add-input-k4s4", dict(PARALLEL, parallel_fusion="add_input", agg_cnn_kernel_size=4,
                                     agg_cnn_stride=4)),
    ("parallel-add-middle-k3s2-rotary", {**PARALLEL, **MODERN, "parallel_fusion": "add_middle",
                                         "agg_cnn_kernel_size": 3, "agg_cnn_stride": 2}),
    ("parallel-k2s3-cnn-rotary-postnorm", {**PARALLEL, **CNN, **MODERN, "agg_cnn_kernel_size": 2,
                                           "agg_cnn_stride": 3, "transformer_norm_first": False,
                                           "ffn_activation": "swiglu"}),
    # Hashed n-gram embeddings: alone, before the CNN frontend, into the patch stream.
    ("single-ngrams", NGRAMS),
    ("single-cnn-ngrams-rotary", {**CNN, **MODERN, **NGRAMS}),
    ("parallel-ngrams-k3s2", dict(PARALLEL, **NGRAMS, agg_cnn_kernel_size=3, agg_cnn_stride=2)),
    ("parallel-add-input-ngram-4-k4s4", dict(PARALLEL, parallel_fusion="add_input",
                                             ngram_orders=[4], ngram_buckets=97,
                                             agg_cnn_kernel_size=4, agg_cnn_stride=4)),
    # Local attention: windows shorter than the inputs (13, 16), one of them not dividing.
    ("single-window4-rotary", {**MODERN, "attention_window": 4}),
    ("single-default-layers-ngrams-window5", {**DEFAULT_LAYERS, **NGRAMS, "attention_window": 5}),
    ("parallel-window3-k3s2-sinusoidal", dict(PARALLEL, attention_window=3, agg_cnn_kernel_size=3,
                                              agg_cnn_stride=2)),
    # SpaceByte's patch stream: fed from and back into the bytes that end a patch, fixed
    # patches or spacelike ones (at most 3 or 5 bytes), with the other options around it.
    ("parallel-at-boundaries-fixed-s3", dict(PARALLEL, parallel_fusion="at_boundaries",
                                             agg_cnn_stride=3)),
    ("parallel-at-boundaries-spacelike-max3", AT_SPACELIKE_ENDS_3),
    ("parallel-at-boundaries-spacelike-default-layers-3-layers", {
        **PARALLEL, **DEFAULT_LAYERS, **NGRAMS, "parallel_fusion": "at_boundaries",
        "patch_boundaries": "spacelike", "agg_cnn_stride": 5, "num_byte_stream_layers": 3,
        "num_agg_stream_layers": 2, "agg_cnn_out_dim": 48, "attention_window": 6}),
    # Smear, the embeddings into every layer and value embeddings: with config.py's layers,
    # with a CNN frontend and 3 layers, in the seed's parallel stream and in SpaceByte's.
    ("single-default-layers-recipe-options", {**DEFAULT_LAYERS, **NGRAMS, **RECIPE_OPTIONS}),
    ("single-cnn-3-layers-smear", {**CNN, **MODERN, "num_attention_layers": 3,
                                   "smear_previous_byte": True}),
    ("single-every-layer-values-window4", {**MODERN, "embeddings_into_every_layer": True,
                                           "value_embeddings": True, "attention_window": 4}),
    ("parallel-recipe-options-k3s2", dict(PARALLEL, **RECIPE_OPTIONS, agg_cnn_kernel_size=3,
                                          agg_cnn_stride=2)),
    ("parallel-at-boundaries-recipe-options", dict(AT_SPACELIKE_ENDS_3, **RECIPE_OPTIONS,
                                                   num_byte_stream_layers=3)),
]
ARCH_IDS = [name for name, _ in ARCHITECTURES]
ARCH_OVERRIDES = [overrides for _, overrides in ARCHITECTURES]


# ---------------------------------------------------------------------------
# Causality (and locality with attention_window)

def leaking_positions(forward, x):
    """Positions t whose logits change when only bytes after t change."""
    with torch.no_grad():
        base = forward(x)
        leaks = []
        for t in range(x.size(1) - 1):
            changed = x.clone()
            changed[:, t + 1:] = (changed[:, t + 1:] + 1 + torch.randint_like(changed[:, t + 1:], 254)) % 256
            if not torch.equal(forward(changed)[:, :t + 1], base[:, :t + 1]):
                leaks.append(t)
    return leaks


@pytest.fixture(params=ARCH_OVERRIDES, ids=ARCH_IDS)
def model(request):
    """A tiny model of each architecture variant (the tests below run once for each)."""
    return tiny_model(**request.param)


def test_future_bytes_do_not_change_logits(model):
    x = torch.randint(0, 256, (2, 13))
    assert leaking_positions(model, x) == []
    # The same check catches a model that peeks one byte ahead.
    assert leaking_positions(lambda x: model(torch.roll(x, -1, dims=1)), x) != []


def test_present_and_past_bytes_do_change_logits(model):
    x = torch.randint(0, 256, (1, 13))
    with torch.no_grad():
        base = model(x)
        for t in (0, 5, 12):
            changed = x.clone()
            changed[:, t] = (changed[:, t] + 1) % 256
            logits = model(changed)
            assert not torch.allclose(logits[:, t], base[:, t])   # byte t itself
            # and a later position: the last, or the last its attention window reaches
            reach = model.config["attention_window"] or 13
            later = min(12, t + reach - 1)
            assert not torch.allclose(logits[:, later], base[:, later])


@pytest.mark.parametrize("T, window", [(37, 8), (32, 8), (9, 8), (20, 1)])
def test_local_attention_in_blocks_equals_attention_under_a_band_mask(T, window):
    attention = CausalSelfAttention(16, 2, 0.0, window=window)
    q, k, v = torch.randn(3, 3, 2, T, 8).unbind(0)
    mask = band_mask(T, 0, window, "cpu")
    assert mask.sum(1).tolist() == [min(i + 1, window) for i in range(T)]  # the band
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (attention._attend_locally(q, k, v) - expected).abs().max().item() < 1e-5


def test_with_a_window_a_byte_reaches_exactly_the_window_after_it():
    """One layer, no n-grams or convolutions: byte t moves the logits at t .. t+w-1 and
    nothing after them (and, causally, nothing before)."""
    window = 5
    model = tiny_model(**MODERN, attention_window=window, num_attention_layers=1)
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        base = model(x)
        for t in range(16):
            changed = x.clone()
            changed[0, t] = (changed[0, t] + 1) % 256
            moved = (model(changed) - base).abs().amax(dim=(0, 2)) > 1e-6
            assert moved.nonzero().flatten().tolist() == list(range(t, min(16, t + window)))


@pytest.mark.parametrize("kernels", [[1], [2], [3], [4, 5]])
def test_cnn_frontend_is_causal_and_keeps_length(kernels):
    torch.manual_seed(0)
    frontend = CNNFrontend(8, [6] * len(kernels), kernels, "relu", 0.0, False).eval()
    x = torch.randn(2, 9, 8)
    y = frontend(x)
    assert y.shape == (2, 9, 6)
    changed = x.clone()
    changed[:, 5:] += 1.0
    assert torch.equal(frontend(changed)[:, :5], y[:, :5])
    assert not torch.equal(frontend(changed)[:, 5], y[:, 5])


# ---------------------------------------------------------------------------
# Hashed n-grams

def test_an_ngram_hash_reads_exactly_its_n_bytes():
    """The hash of order n at position t changes with each of bytes t-n+1 .. t, and with
    nothing else; "no byte" (before the view) counts as a byte of its own."""
    torch.manual_seed(0)
    orders, length = (1, 2, 3, 5), 12
    joined = torch.randint(0, 256, (1, 4 + length))
    joined[0, :3] = NO_BYTE  # the view starts at joined[3]
    base = ngram_hashes(joined, orders, length)
    for n in orders:
        assert base[n].shape == (1, length) and 0 <= base[n].min() and base[n].max() < 2**32
    for where in range(joined.size(1)):
        changed = joined.clone()
        changed[0, where] = (changed[0, where] + 1) % 257  # also turns a byte into NO_BYTE
        hashes = ngram_hashes(changed, orders, length)
        for n in orders:
            for t in range(length):
                newest = 4 + t  # position of byte t in joined
                reads = newest - n < where <= newest
                assert (hashes[n][0, t] != base[n][0, t]) == reads, (n, t, where)


@pytest.mark.parametrize("orders", [(2, 3, 4, 5, 6), (3,), (5, 2), (1, 4)])
def test_the_decode_steps_ngram_hashes_equal_ngram_hashes(orders):
    """newest_ngram_hashes (the decode step's) gives ngram_hashes' hash of every order at
    every position of random streams, from the first byte on, where the tail is still
    partly NO_BYTE."""
    torch.manual_seed(0)
    context = max(orders) - 1
    joined = torch.cat([torch.full((5, context), NO_BYTE), torch.randint(0, 256, (5, 40))], 1)
    reference = ngram_hashes(joined, orders, 40)  # {n: (5, 40)}
    for t in range(40):
        tail = joined[:, t:t + context + 1]
        hashes = newest_ngram_hashes(tail, orders)  # (5, len(orders))
        on_host = [newest_ngram_hashes(row, orders) for row in tail.tolist()]  # the CPU's path
        for column, n in enumerate(orders):
            assert torch.equal(hashes[:, column], reference[n][:, t]), (n, t)
            assert [row[column] for row in on_host] == reference[n][:, t].tolist(), (n, t)


@pytest.mark.parametrize("streams", [1, 3])
def test_the_decode_steps_ngram_vectors_equal_forwards_to_the_bit(streams):
    """HashedNgramEmbedding.newest (rows as slices for one stream, a lookup for several)
    gives forward's vector of the last byte, to the bit."""
    torch.manual_seed(0)
    ngrams = HashedNgramEmbedding((2, 3, 4, 5, 6), 64, 8)
    for table in ngrams.embeddings:
        torch.nn.init.normal_(table.weight)
    joined = torch.cat([torch.full((streams, ngrams.context), NO_BYTE),
                        torch.randint(0, 256, (streams, 12))], 1)
    with torch.no_grad():
        reference = ngrams(joined)  # (streams, 12, 8)
        for t in range(12):
            tail = joined[:, t:t + ngrams.context + 1]
            assert torch.equal(ngrams.newest(tail), reference[:, t]), t


def test_ngram_buckets_fill_like_a_random_function():
    """19,683 distinct trigrams over 27 letters, hashed into 4,096 buckets, fill as many
    buckets as a random function would (a hash with structure, such as a weighted sum
    of the bytes, leaves many empty and piles similar n-grams together)."""
    letters = torch.tensor(list(b"abcdefghijklmnopqrstuvwxyz "))
    trigrams = torch.cartesian_prod(letters, letters, letters)  # (19683, 3)
    buckets, count = 4096, trigrams.size(0)
    hashed = ngram_hashes(trigrams, (3,), 1)[3][:, 0] % buckets
    random_fill = buckets * (1 - (1 - 1 / buckets) ** count)  # expected distinct buckets
    assert hashed.unique().numel() >= 0.98 * random_fill
    # Case pairs ("a" vs "A": bytes 32 apart) do not share buckets more than chance.
    upper = ngram_hashes(trigrams - 32 * (trigrams != 32), (3,), 1)[3][:, 0] % buckets
    assert (upper == hashed).float().mean() < 5 / buckets


def test_ngram_embeddings_add_to_the_byte_embedding_at_their_positions():
    """Moving the table row of one trigram moves the first-layer input exactly where
    that trigram ends, and nowhere else."""
    model = tiny_model(ngram_orders=[3], ngram_buckets=61)
    x = torch.tensor([list(b"abcabxabc")])
    before = model._embed(x)
    hashes = ngram_hashes(torch.cat([torch.full((1, 2), NO_BYTE), x], 1), (3,), 9)[3][0] % 61
    row = int(hashes[2])
    with torch.no_grad():
        model.ngram_embedding.embeddings[0].weight[row] += 1.0
    moved = (model._embed(x) - before).abs().sum(-1)[0] > 0
    assert moved.tolist() == (hashes == row).tolist()
    assert moved[2] and moved[8] and not moved[5]  # "abc" ends at 2 and 8; "abx" at 5


# ---------------------------------------------------------------------------
# Incremental generation equals the full forward

def incremental_logits(model, x, chunks):
    cache = model.new_cache(x.size(0))
    assert cache.length == 0
    outputs, start = [], 0
    for n in chunks:
        outputs.append(model.forward_incremental(x[:, start:start + n], cache))
        start += n
        assert cache.length == start
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("chunks", [[1] * 13, [5] + [1] * 8, [3, 4, 1, 2, 3], [13]],
                         ids=["bytewise", "prompt5", "uneven", "whole"])
def test_incremental_logits_equal_full_forward(model, chunks):
    x = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        full = model(x)
    incremental = incremental_logits(model, x, chunks)
    assert incremental.shape == (2, 13, 256)
    assert (incremental - full).abs().max().item() < 1e-4
    cache = model.new_cache(2)  # the last position alone: a prompt's pass, a refill
    if len(chunks) > 1:
        model.forward_incremental(x[:, :13 - chunks[-1]], cache)
    last = model.forward_incremental(x[:, 13 - chunks[-1]:], cache, last_only=True)
    assert last.shape == (2, 1, 256) and cache.length == 13
    assert (last - full[:, -1:]).abs().max().item() < 1e-4


def test_a_prompts_pass_gives_the_full_forwards_last_logits_to_the_bit(model):
    """The last position's logits, all that generation reads of a pass over many bytes:
    the full forward's (the uncached path) equal the cached path's prompt pass and refills
    (forward_incremental) bit for bit, so both sample those bytes from the same logits.
    With an attention window shorter than the bytes, the full forward attends in blocks
    (_attend_locally), the pass under a band mask: equal to rounding only."""
    x = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        full = model(x, last_only=True)
    incremental = model.forward_incremental(x, model.new_cache(2), last_only=True)
    assert full.shape == (2, 1, 256)
    if model.config["attention_window"] is None:
        assert torch.equal(full, incremental)
    else:
        assert (full - incremental).abs().max().item() < 1e-5


def decoded_logits(model, x, prompt_lengths, steps, step=None):
    """Feed stream b its first prompt_lengths[b] bytes through its own row of one cache,
    then decode `steps` bytes for every stream at once, each at its own position.
    Returns the decode steps' logits (B, steps, 256) and the positions they were at."""
    step = step or model.decode_step
    cache = model.new_cache(x.size(0))
    for b, n in enumerate(prompt_lengths):
        model.forward_incremental(x[b:b + 1, :n], cache.row(b))
    positions = torch.tensor(prompt_lengths)
    rows, logits, at = torch.arange(x.size(0)), [], []
    for _ in range(steps):
        logits.append(step(x[rows, positions], cache, positions))
        at.append(positions.clone())
        positions += 1
    return torch.stack(logits, 1), torch.stack(at, 1)


def test_decoding_streams_at_different_positions_equals_full_forward(model):
    x = torch.randint(0, 256, (3, 16))
    with torch.no_grad():
        full = model(x)
    logits, at = decoded_logits(model, x, prompt_lengths=[1, 5, 8], steps=8)
    expected = full[torch.arange(3)[:, None], at]  # (3, 8, 256)
    assert (logits - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("overrides", [DEFAULT_LAYERS, dict(PARALLEL, **DEFAULT_LAYERS,
                                                             agg_cnn_kernel_size=3,
                                                             agg_cnn_stride=2)],
                         ids=["single", "parallel"])
def test_decoding_under_fp16_autocast_equals_its_full_forward(overrides):
    """Under autocast to a dtype that is not the CPU's bf16 (a GPU's path), the eager step
    attends without SDPA, with StepPlaces' additive mask: the same logits as the full
    forward under that autocast."""
    model = tiny_model(**overrides)
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        full = model(x).float()
        logits, at = decoded_logits(model, x, prompt_lengths=[3, 6], steps=8)
    expected = full[torch.arange(2)[:, None], at]
    assert (logits.float() - expected).abs().max().item() < 0.05  # fp16 rounding


AT_SPACELIKE_ENDS = dict(PARALLEL, parallel_fusion="at_boundaries", patch_boundaries="spacelike",
                         agg_cnn_stride=4, attention_window=5)


@pytest.mark.parametrize("overrides", [
    dict(PARALLEL, **CNN, **MODERN, agg_cnn_stride=3, parallel_fusion="add_input"),
    dict(AT_SPACELIKE_ENDS, **MODERN), dict(DEFAULT_LAYERS, **NGRAMS, **RECIPE_OPTIONS)],
    ids=["add-input-cnn", "at-spacelike-ends-window", "recipe-options"])
def test_the_decode_step_traces_as_one_graph(overrides):
    # backend="eager" checks dynamo's tracing (no graph breaks) without compiling kernels.
    model = tiny_model(**overrides)
    x = torch.randint(0, 256, (2, 12))
    compiled = torch.compile(model.decode_step, backend="eager", fullgraph=True)
    eager, _ = decoded_logits(model, x, [2, 4], steps=6)
    traced, _ = decoded_logits(model, x, [2, 4], steps=6, step=compiled)
    assert torch.allclose(eager, traced, atol=1e-5)


def test_a_cache_made_of_other_tensors_decodes_the_same_into_them():
    """cache.with_tensors(cache.tensors()) is how the predictor hands the cache to a step
    compiled ahead of time: made of copies of its tensors, it must decode as the cache
    does, reading and writing those copies only (every kind of cache tensor here)."""
    model = tiny_model(**PARALLEL, **CNN, **NGRAMS, agg_cnn_kernel_size=3, agg_cnn_stride=2,
                       smear_previous_byte=True)
    x = torch.randint(0, 256, (2, 10))
    cache = model.new_cache(2)
    with torch.no_grad():
        for b in range(2):
            model.forward_incremental(x[b:b + 1, :5], cache.row(b))
    before = [t.clone() for t in cache.tensors()]
    copied = cache.with_tensors([t.clone() for t in before])
    logits = [model.decode_step(x[:, t], copied, torch.full((2,), t)) for t in range(5, 10)]
    assert all(torch.equal(a, b) for a, b in zip(cache.tensors(), before))  # untouched
    for t, expected in zip(range(5, 10), logits):
        assert torch.equal(model.decode_step(x[:, t], cache, torch.full((2,), t)), expected)
    assert all(torch.equal(a, b) for a, b in zip(cache.tensors(), copied.tensors()))
    assert len(cache.tensors()) == 2 * 3 + 2 + 4  # k, v of 3 layers; 2 convolutions; pasts


def test_windows_shorter_than_a_patch_use_the_no_patch_state():
    model = tiny_model(**PARALLEL, agg_cnn_kernel_size=5, agg_cnn_stride=4)
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        full = model(x)
        for T in (1, 3, 4, 5):
            assert (model(x[:, :T]) - full[:, :T]).abs().max() < 1e-4


def test_fresh_cache_starts_again_at_position_zero():
    # The predictor drops old bytes by feeding the kept ones to a new cache.
    model = tiny_model(**PARALLEL, agg_cnn_kernel_size=3, agg_cnn_stride=2)
    x = torch.randint(0, 256, (1, 12))
    incremental_logits(model, x, [12])
    kept = x[:, 5:]
    with torch.no_grad():
        assert (incremental_logits(model, kept, [3, 1, 1, 1, 1]) - model(kept)).abs().max() < 1e-4


@pytest.mark.parametrize("overrides", [{}, dict(PARALLEL, **CNN), MODERN,
                                       dict(PARALLEL, **CNN, **MODERN),
                                       dict(PARALLEL, **MODERN, parallel_fusion="at_boundaries",
                                            patch_boundaries="spacelike", agg_cnn_stride=3,
                                            attention_window=4),
                                       dict(MODERN, **NGRAMS, **RECIPE_OPTIONS)],
                         ids=["single", "parallel", "single-modern", "parallel-modern",
                              "at-spacelike-ends-window-modern", "recipe-options"])
def test_incremental_under_autocast(overrides):
    model = tiny_model(**overrides)
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        full = model(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full_bf16 = model(x).float()
        incremental = incremental_logits(model, x, [4, 1, 1, 1, 1, 1]).float()
    assert (incremental - full_bf16).abs().max() < 1e-2
    assert (incremental - full).abs().max() < 0.1  # bf16 rounding; the logits spread over ~±3


@pytest.mark.parametrize("option", sorted(RECIPE_OPTIONS))
def test_a_recipe_option_starts_as_the_model_without_it(option):
    """Smear's scale, the per-layer embedding scales and the value tables start at zero:
    a new model with the option computes what the model without it does."""
    torch.manual_seed(0)
    layers = {**DEFAULT_LAYERS, **NGRAMS, **dict.fromkeys(RECIPE_OPTIONS, False)}
    without = ByteLLM_GrugV3(tiny_config(**layers)).eval()
    with torch.no_grad():
        for table in without.ngram_embedding.embeddings:  # zero at the start, like the options
            table.weight.normal_()
    model = ByteLLM_GrugV3(tiny_config(**{**layers, option: True})).eval()
    missing, unexpected = model.load_state_dict(without.state_dict(), strict=False)
    assert missing and not unexpected  # the option's own parameters kept their start
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(x), without(x))
        for name, parameter in model.named_parameters():
            if name in missing and ("scale" in name or "value" in name):
                parameter.fill_(0.5)
        assert not torch.allclose(model(x), without(x))  # the option is wired in


def test_learnable_positions_past_the_table_raise_clear_error():
    model = tiny_model(positional_encoding_type="learnable", max_positional_encoding_len=16)
    with pytest.raises(ValueError, match="max_positional_encoding_len"):
        model(torch.randint(0, 256, (1, 17)))
    cache = model.new_cache(1)
    model.forward_incremental(torch.randint(0, 256, (1, 16)), cache)
    with pytest.raises(ValueError, match="16 positions"):
        model.forward_incremental(torch.randint(0, 256, (1, 1)), cache)
    encoding = LearnablePositionalEncoding(8, 0.0, max_len=4)
    with pytest.raises(ValueError):
        encoding(torch.zeros(1, 2, 8), offset=3)


def test_sinusoidal_positions_past_the_table_work():
    encoding = SinusoidalPositionalEncoding(10, 0.0, max_len=8)
    long = encoding(torch.zeros(1, 20, 10))
    assert encoding.table.shape == (8, 10)  # the stored table is not grown
    assert torch.equal(long[0, :8], encoding.table)
    assert torch.equal(encoding(torch.zeros(1, 3, 10), offset=15), long[:, 15:18])
    model = tiny_model(max_positional_encoding_len=8)
    assert model(torch.randint(0, 256, (1, 20))).shape == (1, 20, 256)


def test_the_decode_steps_turns_equal_the_forwards_to_the_bit():
    """rotation_at reads eagerly from turns made once: the same values as the forward's
    turns at those positions, also after the table is covered further."""
    encoding = RotaryPositions(32, 0.0, max_len=16, head_dim=8)
    for length in (16, 40):
        encoding.cover(length)
        positions = torch.tensor([0, 5, length - 1])
        turns = encoding.rotation_at(positions)
        assert turns.shape == (3, 1, 1, 4)
        assert torch.equal(turns[:, 0, 0], encoding.rotation(length)[positions])


# ---------------------------------------------------------------------------
# Encoder layer = nn.TransformerEncoderLayer

@pytest.mark.parametrize("norm_first", [True, False])
def test_encoder_layer_matches_torch(norm_first):
    torch.manual_seed(0)
    ours = EncoderLayer(16, 4, 3, 0.0, norm_first).eval()
    reference = nn.TransformerEncoderLayer(16, 4, 48, 0.0, activation="gelu", batch_first=True,
                                           norm_first=norm_first).eval()
    with torch.no_grad():
        reference.self_attn.in_proj_weight.copy_(ours.attn.qkv.weight)
        reference.self_attn.in_proj_bias.copy_(ours.attn.qkv.bias.normal_())
        reference.self_attn.out_proj.weight.copy_(ours.attn.out_proj.weight)
        reference.self_attn.out_proj.bias.copy_(ours.attn.out_proj.bias.normal_())
        for name in ("linear1", "linear2"):
            getattr(reference, name).load_state_dict(getattr(ours.ffn, name).state_dict())
        for name in ("norm1", "norm2"):
            getattr(ours, name).weight.normal_()
            getattr(reference, name).load_state_dict(getattr(ours, name).state_dict())
        x = torch.randn(2, 7, 16)
        mask = nn.Transformer.generate_square_subsequent_mask(7)
        expected = reference(x, src_mask=mask, is_causal=True)
        assert (ours(x) - expected).abs().max() < 1e-5


# ---------------------------------------------------------------------------
# Objectives

@pytest.mark.parametrize("overrides", [{}, dict(PARALLEL, agg_cnn_stride=1, agg_cnn_kernel_size=2)],
                         ids=["single", "parallel"])
def test_objectives_agree_on_a_window_of_one(overrides):
    all_positions = tiny_model(**overrides, training_objective="all_positions")
    last_byte = tiny_model(**overrides, training_objective="last_byte")
    x, y = torch.randint(0, 256, (4, 1)), torch.randint(0, 256, (4, 1))
    assert torch.allclose(all_positions(x, y), last_byte(x, y))


@pytest.mark.parametrize("overrides", [{}, dict(PARALLEL, **CNN)], ids=["single", "parallel"])
def test_losses_are_cross_entropy_of_their_positions(overrides):
    all_positions = tiny_model(**overrides, training_objective="all_positions")
    last_byte = tiny_model(**overrides, training_objective="last_byte")
    x, y = torch.randint(0, 256, (3, 11)), torch.randint(0, 256, (3, 11))
    logits = all_positions(x)
    assert torch.allclose(all_positions(x, y), F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1)))
    assert torch.allclose(last_byte(x, y), F.cross_entropy(logits[:, -1], y[:, -1]), atol=1e-6)
    assert torch.equal(last_byte.loss(x, y), last_byte(x, y))
    assert not torch.allclose(all_positions(x, y), last_byte(x, y))


def test_last_byte_objective_sends_only_the_last_position_to_fc_out():
    model = tiny_model(training_objective="last_byte")
    seen = []
    model.fc_out.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape))
    model(torch.randint(0, 256, (3, 11)), torch.randint(0, 256, (3, 11)))
    assert seen == [torch.Size([3, 32])]


# ---------------------------------------------------------------------------
# Checkpoints

@pytest.mark.parametrize("overrides", [{}, dict(PARALLEL, **CNN)], ids=["single", "parallel"])
def test_state_dict_round_trip_gives_identical_outputs(overrides):
    model = tiny_model(seed=0, **overrides)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = tiny_model(seed=1, **overrides)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))


@pytest.mark.parametrize("overrides", [{}, dict(PARALLEL, **CNN)], ids=["single", "parallel"])
def test_state_dict_holds_parameters_only(overrides):
    model = ByteLLM_GrugV3(tiny_config(**overrides))
    keys = list(model.state_dict())
    assert keys == [name for name, _ in model.named_parameters()]  # no sinusoidal table
    assert not any("table" in key for key in keys)
    assert list(torch.compile(model)._orig_mod.state_dict()) == keys


@pytest.mark.parametrize("overrides", [dict(PARALLEL, **CNN, agg_cnn_stride=3), AT_SPACELIKE_ENDS],
                         ids=["parallel-cnn", "at-spacelike-ends-window"])
def test_full_forward_traces_as_one_graph(overrides):
    # backend="eager" checks dynamo's tracing (no graph breaks) without compiling kernels.
    model = tiny_model(**overrides)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x))
    compiled(x, x).backward()


def test_architecture_keys_are_config_keys():
    assert set(ARCHITECTURE_KEYS) <= set(CONFIG_V3)
    for key in ("attention_d_model", "agg_cnn_stride", "cnn_kernel_sizes", "sequence_length",
                "positional_encoding_type", "transformer_norm_first", "vocab_size"):
        assert key in ARCHITECTURE_KEYS
    for key in ("transformer_dropout", "pe_dropout", "output_dropout", "cnn_dropout",
                "training_objective", "learning_rate"):
        assert key not in ARCHITECTURE_KEYS
    assert ByteLLM_GrugV3(tiny_config(sequence_length=24)).context_length == 24


# ---------------------------------------------------------------------------
# Config errors

@pytest.mark.parametrize("overrides, names", [
    (dict(attention_num_heads=3), ["attention_num_heads", "attention_d_model", "(3)"]),
    (dict(PARALLEL, agg_cnn_out_dim=15), ["attention_num_heads", "agg_cnn_out_dim", "(15)"]),
    (dict(use_cnn_frontend=True, cnn_out_channels_list=[8, 8], cnn_kernel_sizes=[3]),
     ["cnn_kernel_sizes", "cnn_out_channels_list"]),
    (dict(use_cnn_frontend=True, cnn_out_channels_list=[0], cnn_kernel_sizes=[3]),
     ["cnn_out_channels_list", "must be >= 1"]),
    (dict(embedding_dim=0), ["embedding_dim", "0"]),
    (dict(num_attention_layers=-1), ["num_attention_layers", "-1"]),
    (dict(PARALLEL, agg_cnn_stride=0), ["agg_cnn_stride", "0"]),
    (dict(use_cnn_frontend=True, cnn_out_channels_list=[8], cnn_kernel_sizes=[3],
          cnn_activation="tanh"), ["cnn_activation", "tanh"]),
    (dict(positional_encoding_type="rope"), ["positional_encoding_type", "rope"]),
    (dict(ngram_orders=[2, 1]), ["ngram_orders", "1"]),
    (dict(ngram_orders=[3, 2, 3]), ["ngram_orders", "twice", "[3, 2, 3]"]),
    (dict(ngram_buckets=0), ["ngram_buckets", "0"]),
    (dict(PARALLEL, patch_boundaries="spacelike"), ["patch_boundaries", "at_boundaries"]),
], ids=["heads", "agg-heads", "kernel-list", "channels", "embedding", "layers", "stride",
        "activation", "pe-type", "ngram-order", "ngram-repeat", "ngram-buckets",
        "spacelike-needs-at-boundaries"])
def test_bad_configs_raise_clear_errors(overrides, names):
    with pytest.raises(ValueError) as error:
        ByteLLM_GrugV3(tiny_config(**overrides))
    for name in names:
        assert name in str(error.value)


# ---------------------------------------------------------------------------
# Learning

@pytest.mark.parametrize("overrides", [{}, dict(PARALLEL, agg_cnn_kernel_size=4, agg_cnn_stride=4)],
                         ids=["single", "parallel"])
def test_overfits_a_repeated_text(overrides):
    torch.manual_seed(0)
    config = tiny_config(embedding_dim=64, attention_d_model=64, attention_num_heads=4,
                         num_attention_layers=2, num_byte_stream_layers=2,
                         num_agg_stream_layers=2, agg_cnn_out_dim=64, sequence_length=32,
                         **overrides)
    model = ByteLLM_GrugV3(config)
    text = torch.tensor(list(b"grug eats the bright red berry. " * 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        starts = torch.randint(0, len(text) - 33, (8,))
        windows = torch.stack([text[s:s + 33] for s in starts.tolist()])
        loss = model(windows[:, :-1], windows[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5


# ---------------------------------------------------------------------------
# Sizes

def test_count_parameters():
    model = ByteLLM_GrugV3(tiny_config())
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    model.embedding.weight.requires_grad_(False)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters()) - 256 * 32


# ---------------------------------------------------------------------------
# The patch stream fed at patch ends (SpaceByte): where patches end, and no lag

def patch_ends_one_byte_at_a_time(data, longest):
    """The rule as written: a spacelike byte after one that is not ends a patch, and so
    does every `longest`-th byte since the last such end; bytes >= 128 are letters."""
    ends, before_spacelike, since = [], True, 0
    for byte in data:
        space = byte < 128 and not chr(byte).isalnum()
        natural = space and not before_spacelike
        since += 1
        ends.append(natural or since % longest == 0)
        since = 0 if natural else since
        before_spacelike = space
    return ends


@pytest.mark.parametrize("longest", [1, 2, 3, 8])
def test_spacelike_patch_ends_follow_the_rule_in_any_chunks(longest):
    rng = np.random.default_rng(longest)
    alphabet = np.frombuffer("ab c.d\n  ,é9Q_(".encode("utf-8"), dtype=np.uint8)
    for _ in range(50):
        data = rng.choice(alphabet, size=rng.integers(1, 40))
        x = torch.from_numpy(data.astype(np.int64))[None]
        start = torch.tensor([START_MARKS])
        ends, marks = spacelike_patch_ends(x, longest, start)
        assert ends[0].tolist() == patch_ends_one_byte_at_a_time(data.tolist(), longest)
        cut = int(rng.integers(1, x.size(1) + 1))
        first, middle = spacelike_patch_ends(x[:, :cut], longest, start)
        if cut < x.size(1):
            second, middle = spacelike_patch_ends(x[:, cut:], longest, middle)
            first = torch.cat([first, second], dim=1)
        assert torch.equal(first, ends) and torch.equal(middle, marks)
        assert marks[0, 2] == ends.sum()


@pytest.mark.parametrize("longest", [1, 2, 3, 5])
def test_no_view_ends_more_patches_than_the_full_forward_has_slots_for(longest):
    model = tiny_model(**{**AT_SPACELIKE_ENDS, "agg_cnn_stride": longest})
    densest = b"aa." * 11 if longest == 2 else b"a." * 16  # 2 ends in 3 bytes; 1 in 2
    rng = np.random.default_rng(0)
    views = [densest] + [bytes(rng.choice(list(b"ab .,\n"), size=32)) for _ in range(50)]
    most = 0
    for view in views:
        x = torch.tensor([list(view)])
        ends, _ = model._patch_ends(x, None, None)
        assert ends.sum() <= model.patch_slots(len(view))
        most = max(most, int(ends.sum()) / model.patch_slots(len(view)))
    assert most > 0.9  # and the bound is nearly reached


def test_the_byte_that_ends_a_patch_already_reads_the_patch_stream():
    """No lag: with the patch stream's output switched off, the logits are the same up to
    the byte before the first patch end, and differ from that byte on."""
    model = tiny_model(**{**AT_SPACELIKE_ENDS, "attention_window": None, "agg_cnn_stride": 8})
    x = torch.tensor([list(b"hello world, again")])
    first_end = b"hello world, again".index(b" ")
    with torch.no_grad():
        with_patches = model(x)
        model.patch_to_bytes.weight.zero_()
        model.patch_to_bytes.bias.zero_()
        without = model(x)
    moved = (with_patches - without).abs().amax(dim=2)[0] > 1e-6
    assert moved.nonzero().flatten().tolist()[0] == first_end
    assert not moved[:first_end].any() and moved[first_end]


def test_a_window_takes_at_most_max_patches_per_window_patches():
    x = torch.tensor([list(b"one two three four five six")])
    every = tiny_model(**AT_SPACELIKE_ENDS)._patch_ends(x, None, None)[0]
    two = tiny_model(**AT_SPACELIKE_ENDS, max_patches_per_window=2)._patch_ends(x, None, None)[0]
    assert every.sum() > 2 and two.sum() == 2
    assert torch.equal(two, every & (every.cumsum(1) <= 2))  # the first two, later ones ignored
