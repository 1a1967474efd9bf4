"""Predictor: sampling filters, UTF-8 masking, streaming, KV cache against the full
forward, the sliding window, RNG hygiene and the interactive loop."""

import codecs
import hashlib
import json
import os
import warnings

import pytest
import torch

from tests.conftest import DEVICES, GPU_DEVICES, make_tiny_config
from model import ByteLLM_GrugV3
from predictor import (
    Predictor, StreamSampler, UTF8_START, interactive_loop, penalize_repeats, top_k_filter,
    top_p_filter, utf8_next_state, utf8_unfinished_tail,
)

# use_parallel_stream_model, or a parallel stream fed at patch ends (SpaceByte), with
# spacelike patches (ends found on the device) or fixed ones (patch_due from the host)
ARCHITECTURES = [False, True, "at-spacelike-ends", "at-fixed-ends"]
AT_ENDS = {"at-spacelike-ends": dict(parallel_fusion="at_boundaries", patch_boundaries="spacelike",
                                     agg_cnn_stride=6),
           "at-fixed-ends": dict(parallel_fusion="at_boundaries", agg_cnn_stride=3)}
RANDOM = dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)  # raw model sampling


def make_predictor(tmp_path, parallel=False, use_kv_cache=True, device="cpu", **overrides):
    config = make_tiny_config(str(tmp_path), use_parallel_stream_model=bool(parallel),
                              device=device, **{**AT_ENDS.get(parallel, {}), **overrides})
    torch.manual_seed(0)
    model = ByteLLM_GrugV3(config).to(device)  # the same weights on every device
    return Predictor(model, device, config, use_kv_cache=use_kv_cache)


def generate_both_ways(predictor, prompt, **kwargs):
    """(text, bytes) with the KV cache, then without it."""
    results = []
    for use_kv_cache in (True, False):
        predictor.use_kv_cache = use_kv_cache
        text = predictor.generate(prompt, **kwargs)
        results.append((text, predictor.last_bytes))
    return results


def spy_on_model(model):
    """Record the length of every input the model is fed: full forwards, cached chunks
    (forward_incremental) and cached single bytes (decode_step, 1 byte per stream), and
    how many bytes the cache holds after each cached call; returns the record."""
    record = {"full": [], "incremental": [], "cache_lengths": []}
    model.register_forward_pre_hook(lambda module, args: record["full"].append(args[0].shape[1]))
    incremental, decode = model.forward_incremental, model.decode_step

    def spy(x_new, cache, **options):
        logits = incremental(x_new, cache, **options)
        record["incremental"].append(x_new.shape[1])
        record["cache_lengths"].append(cache.length)
        return logits

    def spy_decode(byte, cache, positions, patch_due=None):
        logits = decode(byte, cache, positions, patch_due)
        record["incremental"].append(1)
        record["cache_lengths"].append(int(positions.max()) + 1)
        return logits
    model.forward_incremental, model.decode_step = spy, spy_decode
    return record


# --- KV cache against the full forward ---------------------------------------------

@pytest.mark.parametrize("window", [None, 5], ids=["full-attention", "window5"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("parallel", ARCHITECTURES)
def test_cached_and_uncached_give_identical_bytes(tmp_path, parallel, device, window):
    predictor = make_predictor(tmp_path, parallel, sequence_length=32, device=device,
                               attention_window=window)
    cached, uncached = generate_both_ways(predictor, "Hello, world", max_new_bytes=24,
                                          seed=7, **RANDOM)
    assert len(cached[1]) > 0
    assert cached == uncached


@pytest.mark.parametrize("parallel", ARCHITECTURES)
def test_a_cpu_generates_in_fp32_whatever_the_configs_precision(tmp_path, parallel):
    """No autocast on a CPU (Predictor): the decode step runs in fp32 under a bf16 config
    too, and gives the bytes an fp32 config gives, cached and uncached alike, over a
    window that slides several times."""
    texts = []
    for precision in ({"use_amp": False}, {"use_amp": True, "amp_dtype": "bfloat16"}):
        predictor = make_predictor(tmp_path, parallel, sequence_length=16, **precision)
        autocast_in_steps, decode = [], predictor.model.decode_step

        def spy(*args):
            autocast_in_steps.append(torch.is_autocast_enabled("cpu"))
            return decode(*args)
        predictor.model.decode_step = spy
        cached, uncached = generate_both_ways(predictor, "Hello", max_new_bytes=50, seed=3,
                                              **RANDOM)
        assert autocast_in_steps and not any(autocast_in_steps)
        assert len(cached[1]) > 40 and cached == uncached
        texts.append(cached)
    assert texts[0] == texts[1]


def test_cache_feeds_prompt_once_then_one_byte_per_step(tmp_path):
    predictor = make_predictor(tmp_path, sequence_length=64)
    record = spy_on_model(predictor.model)
    predictor.generate("abcdef", max_new_bytes=10, seed=1, **RANDOM)
    assert record["incremental"] == [6] + [1] * 9
    assert record["cache_lengths"][-1] == 15


@pytest.mark.parametrize("fusion", ["concat_output", "add_input"])
def test_eager_decoding_runs_the_patch_stream_only_for_bytes_that_complete_a_patch(
        tmp_path, fusion):
    """The predictor tells decode_step, from positions it keeps on the host, when no
    stream completes a patch; then the patch stream is skipped, and the bytes stay those of
    the full forward."""
    predictor = make_predictor(tmp_path, True, sequence_length=32, parallel_fusion=fusion,
                               agg_cnn_stride=4, agg_cnn_kernel_size=8)
    calls = []  # the patches each run of the patch stream's layer is fed
    predictor.model.agg_stream_encoder[0].register_forward_hook(
        lambda module, args, output: calls.append(args[0].shape[1]))
    cached, uncached = generate_both_ways(predictor, "abcdef", max_new_bytes=10, seed=3,
                                          **RANDOM)
    assert cached == uncached
    # cached: the prompt pass (bytes 0-5; patch 0 completes at byte 3), then bytes 6-14
    # one per step, of which 7 and 11 complete patches 1 and 2; the rest are the uncached
    # passes, one per byte, over views of 6 to 15 bytes (1 to 3 patches)
    assert calls[:3] == [1, 1, 1]  # one patch each time
    assert calls[3:] == [n // 4 for n in range(6, 16)]


def test_use_kv_cache_switch_comes_from_config_and_constructor(tmp_path):
    config = make_tiny_config(str(tmp_path), use_kv_cache=False)
    model = ByteLLM_GrugV3(config)
    assert Predictor(model, "cpu", config).use_kv_cache is False
    assert Predictor(model, "cpu", config, use_kv_cache=True).use_kv_cache is True
    record = spy_on_model(model)
    Predictor(model, "cpu", config).generate("abc", max_new_bytes=5, seed=1, **RANDOM)
    assert record["incremental"] == [] and record["full"] == [3, 4, 5, 6, 7]


# --- sampling filters ---------------------------------------------------------------

def test_greedy_is_deterministic_and_top_k_1_equals_greedy(tmp_path):
    predictor = make_predictor(tmp_path)
    greedy = predictor.generate("The ", max_new_bytes=20, temperature=0, seed=1)
    assert predictor.generate("The ", max_new_bytes=20, temperature=0, seed=2) == greedy
    for seed in (1, 2, 3):
        assert predictor.generate("The ", max_new_bytes=20, temperature=1.0, top_k=1,
                                  top_p=1.0, seed=seed) == greedy


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.0, 0.5])
    kept = torch.isfinite(top_k_filter(logits, 2))
    assert kept.tolist() == [False, True, False, True, False]
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.15, 0.5, 0.1, 0.25])  # order by likelihood: 1, 3, 0, 2
    logits = probs.log()

    def kept(p):
        return set(torch.isfinite(top_p_filter(logits, p)).nonzero().flatten().tolist())
    assert kept(0.3) == {1}
    assert kept(0.7) == {1, 3}  # 0.5 < 0.7 <= 0.75
    assert kept(0.8) == {1, 3, 0}  # 0.75 < 0.8 <= 0.9
    assert kept(0.95) == {0, 1, 2, 3}
    assert kept(1e-6) == {1}  # always at least one
    assert kept(1.0) == {0, 1, 2, 3}


def test_repetition_penalty_lowers_recent_bytes_only():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    seen = torch.tensor([True, True, False, False])  # bytes 0 and 1 were seen recently
    penalized = penalize_repeats(logits, seen, 2.0)
    assert penalized.tolist() == [1.0, -2.0, 0.5, 3.0]  # positive divided, negative multiplied
    before, after = torch.softmax(logits, 0), torch.softmax(penalized, 0)
    assert (after[:2] < before[:2]).all() and (after[2:] > before[2:]).all()
    assert torch.equal(penalize_repeats(logits, seen, 1.0), logits)


def test_repetition_penalty_is_applied_during_generation(tmp_path):
    predictor = make_predictor(tmp_path)
    plain = predictor.generate("aaaa", max_new_bytes=30, temperature=0)
    penalized = predictor.generate("aaaa", max_new_bytes=30, temperature=0,
                                   repetition_penalty=50.0)
    assert penalized != plain


def test_bad_settings_are_rejected(tmp_path):
    predictor = make_predictor(tmp_path)
    for bad in (dict(temperature=-1), dict(top_p=0.0), dict(top_k=-1),
                dict(repetition_penalty=0.0), dict(max_new_bytes=-1)):
        with pytest.raises(ValueError):
            predictor.generate("a", **bad)


# --- UTF-8 ---------------------------------------------------------------------------

def test_utf8_state_machine_matches_the_standard():
    """Every 1- and 2-byte sequence: accepted iff some continuation decodes strictly."""
    def completable(data):
        endings = [b""] + [bytes([first]) + b"\x80" * more
                           for first in (0x80, 0x90, 0xA0) for more in range(3)]
        return any(is_valid_utf8(data + ending) for ending in endings)

    for first in range(256):
        state = utf8_next_state(UTF8_START, first)
        assert (state is not None) == completable(bytes([first])), hex(first)
        for second in range(256):
            accepted = state is not None and utf8_next_state(state, second) is not None
            assert accepted == completable(bytes([first, second])), (hex(first), hex(second))


EDGE_CODE_POINTS = (0x0800, 0xD7FF, 0xE000, 0xFFFF, 0x10000, 0x1F642, 0x10FFFF)


def test_every_complete_character_returns_the_utf8_state_machine_to_its_start():
    """The narrower second-byte ranges of E0, ED, F0 and F4 hold for the second byte only:
    the edge code points of 3- and 4-byte characters, and every valid encoding of every
    code point, walk through the sampling tables without a masked byte, back to the start."""
    from predictor import utf8_tables
    states, allowed, following = utf8_tables()
    for code_point in EDGE_CODE_POINTS:
        state = UTF8_START
        for byte in chr(code_point).encode("utf-8"):
            state = utf8_next_state(state, byte)
            assert state is not None, hex(code_point)
        assert state == UTF8_START, hex(code_point)
    by_length = {}
    for code_point in range(0x110000):
        if not 0xD800 <= code_point <= 0xDFFF:  # surrogates have no UTF-8 encoding
            encoded = chr(code_point).encode("utf-8")
            by_length.setdefault(len(encoded), []).append(encoded)
    for length, encodings in by_length.items():
        data = torch.tensor(list(b"".join(encodings)), dtype=torch.long).view(-1, length)
        state = torch.zeros(len(data), dtype=torch.long)  # states[0] is UTF8_START
        for position in range(length):
            assert allowed[state, data[:, position]].all(), f"a {length}-byte character masked"
            state = following[state, data[:, position]]
        assert (state == 0).all() and states[0] == UTF8_START


def test_unfinished_tail_of_a_prompt():
    assert utf8_unfinished_tail(b"caf\xc3") == ((1, 0x80, 0xBF), b"\xc3")
    assert utf8_unfinished_tail("x€".encode()[:-1])[1] == b"\xe2\x82"
    assert utf8_unfinished_tail("café".encode()) == (UTF8_START, b"")
    assert utf8_unfinished_tail(b"ab\xed\xa0") == (UTF8_START, b"")  # invalid: not finished
    assert utf8_unfinished_tail(b"") == (UTF8_START, b"")


@pytest.mark.parametrize("device", DEVICES)
def test_masked_output_is_always_valid_utf8_and_unmasked_is_not(tmp_path, device):
    predictor = make_predictor(tmp_path, device=device)
    outputs = {}
    for masked in (True, False):
        predictor.valid_utf8_only = masked
        outputs[masked] = []
        for seed in range(12):
            predictor.generate("x", max_new_bytes=30, seed=seed, **RANDOM)
            outputs[masked].append(predictor.last_bytes)
    for data in outputs[True]:
        data.decode("utf-8")  # raises on invalid UTF-8
    assert any(not is_valid_utf8(data) for data in outputs[False])


def is_valid_utf8(data):
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_streamed_pieces_are_whole_characters(tmp_path):
    predictor = make_predictor(tmp_path)
    non_ascii = 0
    for seed in range(4):
        pieces = []
        text = predictor.generate("é", max_new_bytes=40, seed=seed, on_text=pieces.append,
                                  **RANDOM)
        assert "".join(pieces) == text == predictor.last_bytes.decode("utf-8")
        assert all(piece and "\ufffd" not in piece for piece in pieces)
        non_ascii += sum(ord(c) > 127 for c in text)
    assert non_ascii > 0  # multi-byte characters were really split over steps


def test_unmasked_stream_decodes_with_replacement(tmp_path):
    predictor = make_predictor(tmp_path)
    predictor.valid_utf8_only = False
    pieces = []
    text = predictor.generate("x", max_new_bytes=40, seed=0, on_text=pieces.append, **RANDOM)
    assert "".join(pieces) == text == predictor.last_bytes.decode("utf-8", errors="replace")


def test_prompt_ending_mid_character_is_completed(tmp_path):
    predictor = make_predictor(tmp_path)
    for seed in range(3):
        text = predictor.generate(b"caf\xc3", max_new_bytes=10, seed=seed, **RANDOM)
        assert 0x80 <= predictor.last_bytes[0] <= 0xBF
        assert text == (b"\xc3" + predictor.last_bytes).decode("utf-8")


def test_unfinished_last_character_is_trimmed(tmp_path):
    predictor = make_predictor(tmp_path)
    for seed in range(10):
        predictor.generate("x", max_new_bytes=7, seed=seed, **RANDOM)
        assert len(predictor.last_bytes) <= 7
        predictor.last_bytes.decode("utf-8")
        decoder = codecs.getincrementaldecoder("utf-8")()
        decoder.decode(predictor.last_bytes)
        assert decoder.getstate()[0] == b""


# --- context window ------------------------------------------------------------------

@pytest.mark.parametrize("window", [None, 5], ids=["full-attention", "window5"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("parallel", ARCHITECTURES)
def test_generating_far_past_the_window(tmp_path, parallel, device, window):
    predictor = make_predictor(tmp_path, parallel, sequence_length=16, device=device,
                               attention_window=window)
    record = spy_on_model(predictor.model)
    cached, uncached = generate_both_ways(predictor, "ab", max_new_bytes=100, seed=3,
                                          **RANDOM)
    assert cached == uncached
    assert len(cached[1]) >= 97  # at most 3 bytes of an unfinished character trimmed
    assert max(record["full"]) <= 16 and max(record["cache_lengths"]) <= 16
    # The view slides to keep 3/4 of the window, 12 bytes, which refill the cache as a
    # prompt is fed (the newest byte included: no step feeds it alone).
    rebuilds = record["incremental"].count(12)
    assert 5 <= rebuilds <= 30  # amortised: not one rebuild per step


@pytest.mark.parametrize("prompt", ["", b"", "q" * 50 + "é" * 10])
def test_empty_and_overlong_prompts(tmp_path, prompt):
    predictor = make_predictor(tmp_path, sequence_length=16)
    cached, uncached = generate_both_ways(predictor, prompt, max_new_bytes=20, seed=4,
                                          **RANDOM)
    assert cached == uncached and len(cached[1]) > 0


# --- RNG and mode hygiene ---------------------------------------------------------------

def test_seeds_are_reproducible_and_distinct(tmp_path):
    predictor = make_predictor(tmp_path)
    first = predictor.generate("The ", max_new_bytes=30, seed=11, **RANDOM)
    assert predictor.generate("The ", max_new_bytes=30, seed=11, **RANDOM) == first
    assert predictor.generate("The ", max_new_bytes=30, seed=12, **RANDOM) != first


def test_config_seed_is_the_default(tmp_path):
    predictor = make_predictor(tmp_path, generation_seed=5)
    assert predictor.generate("a", **RANDOM) == predictor.generate("a", seed=5, **RANDOM)


def module_modes(model):
    """Each module's train/eval mode, by name."""
    return {name: module.training for name, module in model.named_modules()}


def rng_states():
    """The global RNG states sampling must leave alone: the CPU's and each GPU's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return [torch.get_rng_state(), *cuda]


@pytest.mark.parametrize("device", DEVICES)
def test_global_rng_and_train_mode_are_left_alone(tmp_path, device):
    """Generation runs in eval mode (no dropout: the same bytes whatever mode the model is
    in) and leaves every module in the mode it found it in, and the global RNG alone."""
    predictor = make_predictor(tmp_path, device=device, transformer_dropout=0.5)
    model, texts = predictor.model, []
    for modes in ("train", "eval", "mixed"):
        model.train(modes == "train")
        if modes == "mixed":  # the model in eval mode, one of its layers in train mode
            model.byte_layers[0].train()
        before = module_modes(model)
        rng_before = rng_states()
        texts.append(predictor.generate("abc", max_new_bytes=10, seed=3, **RANDOM))
        assert all(map(torch.equal, rng_states(), rng_before))
        assert module_modes(model) == before
    assert texts[0] == texts[1] == texts[2]


def test_eager_cpu_steps_leave_threads_onednn_and_grad_mode_as_they_were(tmp_path):
    """The eager CPU decode loop runs without oneDNN in inference mode, one stream on one
    thread, several on every thread (small_operations), a window's refill inside it
    under the settings found, and gives the same bytes as with those settings; after it,
    and after an error in it, they are back."""
    predictor = make_predictor(tmp_path)
    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    seen, refills, refills_at = [], [], []

    def settings():
        return (torch.get_num_threads(), torch.backends.mkldnn.enabled,
                torch.is_inference_mode_enabled())

    def look(piece):
        seen.append(settings())
    incremental = predictor.model.forward_incremental

    def refill(*args, **options):
        refills.append(settings())
        refills_at.append(len(seen))  # how many pieces of text came before it
        return incremental(*args, **options)
    predictor.model.forward_incremental = refill
    try:
        torch.set_num_threads(2)
        text = predictor.generate("abc", max_new_bytes=20, seed=3, on_text=look, **RANDOM)
        assert (1, False, True) in seen
        # the prompt's pass, then (window 16, 20 bytes) at least one refill
        assert len(refills) >= 2 and set(refills[1:]) == {(2, onednn, True)}
        # after the first refill, the loop's steps run under the loop's settings again
        assert (1, False, True) in seen[refills_at[1]:]
        seen.clear()
        predictor.generate_batch(["abc", "de"], max_new_bytes=20, seed=3, on_text=look)
        assert (2, False, True) in seen and (1, False, True) not in seen
        assert (torch.get_num_threads(), torch.backends.mkldnn.enabled) == (2, onednn)
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        predictor.use_kv_cache = False  # the full forward under the settings found
        assert predictor.generate("abc", max_new_bytes=20, seed=3, **RANDOM) == text

        def fail(piece):
            raise KeyboardInterrupt
        predictor.use_kv_cache = True
        with pytest.raises(KeyboardInterrupt):
            predictor.generate("abc", max_new_bytes=20, seed=3, on_text=fail)
        assert (torch.get_num_threads(), torch.backends.mkldnn.enabled) == (2, onednn)
    finally:
        torch.set_num_threads(threads)


def test_train_mode_is_restored_after_an_error(tmp_path):
    predictor = make_predictor(tmp_path)
    model = predictor.model
    model.train()
    model.byte_layers[0].eval()  # mixed modes come back as they were too
    before = module_modes(model)

    def fail(piece):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        predictor.generate("abc", max_new_bytes=10, temperature=0, on_text=fail)
    assert module_modes(model) == before
    assert model.training and not model.byte_layers[0].training


@pytest.mark.slow
def test_the_cpu_step_options_make_inductor_write_one_row_products_itself():
    """CPU_STEP_INDUCTOR_OPTIONS, given to inductor, turn a product of one row and a
    matrix (a layer of one stream's decoding step) into inductor's own loops rather than
    a call to MKL, and leave a product of 8 rows to MKL. (A later torch that renamed
    the pass would leave every product to MKL, silently and twice as slowly.)"""
    import torch._dynamo
    import torch._dynamo.utils
    import torch._inductor.config

    import predictor as predictor_module
    layer = torch.nn.Linear(64, 96)
    decomposed = {}
    for rows in (1, 8):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(layer, dynamic=False,
                                 options=predictor_module.CPU_STEP_INDUCTOR_OPTIONS)
        x = torch.randn(rows, 64)
        with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
            assert torch.allclose(compiled(x), layer(x), atol=1e-5)
        decomposed[rows] = torch._dynamo.utils.counters["inductor"]["decompose_addmm"]
    assert decomposed[1] > 0 and decomposed[8] == 0


# --- interactive loop ------------------------------------------------------------------

def scripted(lines):
    """An input() stand-in that pops answers off `lines` (raising the exceptions among
    them), then raises EOFError as Ctrl-D does."""
    def input_fn(prompt):
        if not lines:
            raise EOFError
        line = lines.pop(0)
        if isinstance(line, BaseException):
            raise line
        return line
    return input_fn


def test_interactive_loop_changes_settings_and_generates(tmp_path):
    predictor = make_predictor(tmp_path)
    written = []
    interactive_loop(predictor, predictor.config,
                     input_fn=scripted(["/temp 0", "/len 12", "/topk abc", "/bogus", "hello"]),
                     write=written.append)
    output = "".join(written)
    expected = predictor.generate("hello", temperature=0, max_new_bytes=12)
    assert "temperature = 0.0" in output and "max_new_bytes = 12" in output
    assert "/topk needs an int" in output and "unknown command /bogus" in output
    assert output.endswith(expected + "\n\n")  # the continuation, then a clean exit on EOF


@pytest.mark.parametrize("ending", ["/quit", KeyboardInterrupt()])
def test_interactive_loop_exits_on_quit_and_ctrl_c(tmp_path, ending):
    predictor = make_predictor(tmp_path)
    written = []
    lines = ["/seed 3", ending, "never read"]
    interactive_loop(predictor, predictor.config, write=written.append, input_fn=scripted(lines))
    assert "seed = 3" in "".join(written)
    assert lines == ["never read"]  # it stopped asking


def test_ctrl_c_during_a_continuation_returns_to_the_prompt(tmp_path):
    predictor = make_predictor(tmp_path)
    generate = predictor.generate

    def interrupted_after_some_text(prompt, on_text, **settings):
        if prompt == "long":
            on_text("a beginning")
            raise KeyboardInterrupt
        return generate(prompt, on_text=on_text, **settings)
    predictor.generate = interrupted_after_some_text
    written, lines = [], ["long", "/seed 3", "/quit", "never read"]
    interactive_loop(predictor, predictor.config, write=written.append, input_fn=scripted(lines))
    output = "".join(written)
    assert "a beginning\n[stopped]\n" in output and "seed = 3" in output  # still asking
    assert lines == ["never read"]


# --- values at the edges ------------------------------------------------------------------

def test_temperatures_too_small_to_divide_by_sample_greedily(tmp_path):
    predictor = make_predictor(tmp_path)
    greedy = predictor.generate("The ", max_new_bytes=20, temperature=0)
    for tiny_temperature in (1e-300, 1e-45):
        assert predictor.generate("The ", max_new_bytes=20, temperature=tiny_temperature,
                                  top_k=0, top_p=1.0, seed=3) == greedy


def test_a_vanishing_top_p_still_keeps_the_most_likely_byte():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.0])
    assert torch.isfinite(top_p_filter(logits, 1e-300)).tolist() == [False, True, False, False]


@pytest.mark.parametrize("bad", [dict(temperature=float("nan")), dict(temperature=float("inf")),
                                 dict(repetition_penalty=float("nan")),
                                 dict(top_p=float("nan"))])
def test_non_finite_settings_are_rejected(tmp_path, bad):
    with pytest.raises(ValueError, match="finite|out of range"):
        make_predictor(tmp_path).generate("a", **bad)


def test_interactive_loop_rejects_nan_and_accepts_tiny_values(tmp_path):
    predictor = make_predictor(tmp_path)
    written = []
    interactive_loop(predictor, predictor.config, write=written.append,
                     input_fn=scripted(["/temp nan", "/rep inf", "/temp 1e-300", "/topp 1e-300",
                                        "/len 8", "hello"]))
    output = "".join(written)
    assert "`temperature` = nan must be a finite number" in output
    assert "`repetition_penalty` = inf must be a finite number" in output
    assert "temperature = 1e-300" in output and "top_p = 1e-300" in output
    assert output.endswith(predictor.generate("hello", temperature=0, max_new_bytes=8) + "\n\n")


@pytest.mark.parametrize("p", [0.5, 0.95, 0.99999999, 1.0])
def test_top_p_filters_alike_as_the_eager_samplers_number_and_the_compiled_steps_tensor(p):
    """The eager sampler's top-p is a Python number, the compiled step's a float32 tensor:
    a p just under 1 rounds to 1 in float32, and both then leave the logits as they are."""
    settings = {"temperature": 1.0, "top_k": 0, "top_p": p, "repetition_penalty": 1.0}
    sampler = StreamSampler(settings, [1], [0], [[256]], False, "cpu")
    logits = torch.tensor([[30.0, 0.0, -1.0] + [-2.0] * 253])
    eager = top_p_filter(logits, sampler.p) if sampler.filters_top_p else logits
    assert torch.equal(eager, top_p_filter(logits, sampler.top_p))


# --- batches ------------------------------------------------------------------------------

PROMPTS = ["Hello, world", "é", "a much longer prompt than the others, past the window", ""]


def test_a_batch_in_a_window_of_two_gives_each_prompt_what_it_gets_alone(tmp_path):
    """A window of 2 keeps one byte when it slides: a stream that slides alone is refilled
    with nothing (the step feeds its newest byte), one that slides with all is fed it."""
    predictor = make_predictor(tmp_path, sequence_length=2)
    prompts = ["ab", "c"]
    texts = predictor.generate_batch(prompts, max_new_bytes=10, seed=5, **RANDOM)
    for i, prompt in enumerate(prompts):
        assert predictor.generate(prompt, max_new_bytes=10, seed=5 + i, **RANDOM) == texts[i]


@pytest.mark.parametrize("parallel", ARCHITECTURES)
def test_streams_sliding_together_are_refilled_as_prompts_and_match_alone(tmp_path, parallel):
    """Prompts of one length slide at the same steps: each refill then feeds the newest
    byte too, and no step follows; every stream still gets what it gets alone."""
    predictor = make_predictor(tmp_path, parallel, sequence_length=16)
    record = spy_on_model(predictor.model)
    prompts = ["abcde", "vwxyz"]
    texts = predictor.generate_batch(prompts, max_new_bytes=30, seed=5, **RANDOM)
    assert record["incremental"].count(12) >= 2 * 3  # both rows refilled, three times or more
    for i, prompt in enumerate(prompts):
        assert predictor.generate(prompt, max_new_bytes=30, seed=5 + i, **RANDOM) == texts[i]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("parallel", ARCHITECTURES)
def test_a_batch_gives_each_prompt_what_it_would_get_alone(tmp_path, parallel, device):
    """Prompts of different lengths decoded together (each at its own positions, with
    windows sliding at different steps): prompt i with seed + i, byte for byte as alone,
    cached or not."""
    predictor = make_predictor(tmp_path, parallel, sequence_length=32, device=device)
    texts = predictor.generate_batch(PROMPTS, max_new_bytes=40, seed=5, **RANDOM)
    batch_bytes = predictor.last_bytes
    assert len(texts) == len(batch_bytes) == len(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        for use_kv_cache in (True, False):
            predictor.use_kv_cache = use_kv_cache
            assert predictor.generate(prompt, max_new_bytes=40, seed=5 + i, **RANDOM) == texts[i]
            assert predictor.last_bytes == batch_bytes[i]
        batch_bytes[i].decode("utf-8")  # valid UTF-8, or this raises
    assert len(set(texts)) == len(texts)  # each prompt its own stream


def test_a_batch_leaves_the_global_rng_alone(tmp_path):
    predictor = make_predictor(tmp_path)
    before = torch.get_rng_state()
    predictor.generate_batch(["a", "bc"], max_new_bytes=10, seed=None, **RANDOM)
    assert torch.equal(torch.get_rng_state(), before)


def test_sampling_noise_depends_on_seed_step_and_byte_only():
    from predictor import hashed_uniforms
    seeds = torch.tensor([1, 2, 1])
    u = hashed_uniforms(seeds, torch.tensor(7), "cpu")
    assert u.shape == (3, 256) and (u > 0).all() and (u < 1).all()
    assert torch.equal(u[0], u[2]) and not torch.equal(u[0], u[1])
    assert not torch.equal(u, hashed_uniforms(seeds, torch.tensor(8), "cpu"))
    many = hashed_uniforms(torch.arange(400), torch.tensor(0), "cpu").flatten()
    assert abs(many.mean().item() - 0.5) < 0.01  # uniform: mean 1/2, variance 1/12
    assert abs(many.var().item() - 1 / 12) < 0.005


def test_noise_made_in_blocks_equals_the_noise_of_each_step():
    """The eager CPU sampler makes its noise NOISE_BLOCK steps at a time: each step must
    read exactly the noise hashed_uniforms gives for that step, across block ends, and
    after the step was moved on by something else (a compiled step) than its own draws."""
    from predictor import NOISE_BLOCK, StreamSampler, hashed_uniforms
    settings = dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    seeds = [5, 2**40 + 3]
    sampler = StreamSampler(settings, seeds, [0, 0], [[256] * 4] * 2, False, "cpu")
    for step in [*range(2 * NOISE_BLOCK + 3), 500, 501, 7]:
        sampler.step.fill_(step)
        uniforms = hashed_uniforms(sampler.seeds, torch.tensor(step), "cpu")
        assert torch.equal(sampler._log_noise(), torch.log(-torch.log(uniforms))), step
    many = hashed_uniforms(sampler.seeds, torch.arange(3, 9), "cpu")  # (6, 2, 256)
    assert torch.equal(many[2], hashed_uniforms(sampler.seeds, torch.tensor(5), "cpu"))


def compiled_and_eager(predictor, prompts, **settings):
    """(texts, bytes) of `predictor` compiling ("always"), then not ("never")."""
    results = []
    for compile in ("always", "never"):
        predictor.compile = compile
        texts = predictor.generate_batch(prompts, **settings)
        results.append((texts, predictor.last_bytes))
    return results


class CountedProgram:
    """A loaded program (a runner, or on a torch not checked the public model) whose calls
    (public or boxed) count in calls[index]."""

    def __init__(self, program, calls, index):
        self.program, self.calls, self.index = program, calls, index

    def __call__(self, *args):
        self.calls[self.index] += 1
        return self.program(*args)

    def boxed_run(self, inputs):
        self.calls[self.index] += 1
        return self.program.boxed_run(inputs)


def counting_program_calls(monkeypatch):
    """Programs compiled ahead of time (or read from disk) that count their calls: the
    list of counts, one per program loaded."""
    import predictor as predictor_module
    calls, real_load = [], predictor_module.load_program

    def counting_load(path):
        calls.append(0)
        return CountedProgram(real_load(path), calls, len(calls) - 1)
    monkeypatch.setattr(predictor_module, "load_program", counting_load)
    return calls


def recording_packages(monkeypatch):
    """The inductor options of each package AOTInductor compiles: the list."""
    import torch._inductor
    inductor_settings, real_package = [], torch._inductor.aoti_compile_and_package

    def package(*args, inductor_configs=None, **options):  # a copy: inductor adds to it
        inductor_settings.append(inductor_configs and dict(inductor_configs))
        return real_package(*args, inductor_configs=inductor_configs, **options)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", package)
    return inductor_settings


@pytest.mark.slow
@pytest.mark.parametrize("parallel,amp", [(False, "bfloat16"), (True, None),
                                          ("at-spacelike-ends", None)],
                         ids=["single-stream-bf16", "parallel-stream-fp32",
                              "at-spacelike-ends-fp32"])
def test_a_step_compiled_ahead_of_time_gives_the_eager_bytes(tmp_path, monkeypatch, parallel,
                                                             amp):
    """The CPU's compiled path (AOTInductor) against the eager one, with a bf16 config
    too (a CPU generates in fp32 whatever the config asks); with the parallel stream both skip the patch stream where no patch completes
    (compiled: a second program). Every step after the prompt pass runs in a program;
    the program reads the model's weights and every sampling setting at every call, so
    it serves every later call with the same shapes, whatever its settings; and a later
    process (a new predictor, "auto", a short call) runs the program kept on disk from
    its first step, compiling nothing."""
    import predictor as predictor_module
    calls, inductor_settings = counting_program_calls(monkeypatch), recording_packages(monkeypatch)
    amp_settings = {"use_amp": True, "amp_dtype": amp} if amp else {}
    predictor = make_predictor(tmp_path, parallel, sequence_length=32,
                               generation_compile="always", **amp_settings)
    assert predictor.amp_dtype is None  # a CPU generates in fp32, whatever the config asks
    prompts, settings = ["The ", "é"], dict(max_new_bytes=40)
    filters = dict(temperature=1.0, top_k=0, top_p=0.95, repetition_penalty=1.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback to eager decoding
        compiled, eager = compiled_and_eager(predictor, prompts, seed=2, **filters, **settings)
    assert compiled == eager
    # a program for each patch_due value: spacelike patch ends are not known on the host
    assert len(calls) == (1 if parallel in (False, "at-spacelike-ends") else 2)
    assert sum(calls) == 39  # steps 2..40
    # one-row products as inductor's own loops (decompose_mm_pass; its effect: bench.py)
    assert inductor_settings == [predictor_module.CPU_STEP_INDUCTOR_OPTIONS] * len(calls)
    programs = dict(predictor._programs)
    with torch.no_grad():
        for parameter in predictor.model.parameters():
            parameter.mul_(1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for changed in (dict(temperature=0.7, top_k=3, top_p=1.0, repetition_penalty=1.0),
                        dict(temperature=0, top_k=5, top_p=0.9, repetition_penalty=1.3)):
            predictor.valid_utf8_only = not predictor.valid_utf8_only
            compiled, eager = compiled_and_eager(predictor, prompts, seed=5, **changed,
                                                 **settings)
            assert compiled == eager
    assert predictor._programs == programs and sum(calls) == 3 * 39  # nothing compiled
    # two prompts of one length slide together: their refills feed the newest bytes in
    # place of those steps, and the sampler draws between the program's calls
    before = sum(calls)
    compiled, eager = compiled_and_eager(predictor, ["q" * 20, "r" * 20], seed=3, **filters,
                                         **settings)
    assert compiled == eager and before < sum(calls) < before + 39
    # another process: the programs kept in <checkpoint_dir>/compiled, from the first step
    later = make_predictor(tmp_path, parallel, sequence_length=32, generation_compile="auto",
                           **amp_settings)
    later.model.load_state_dict(predictor.model.state_dict())
    texts = later.generate_batch(prompts, seed=7, max_new_bytes=10, **filters)
    assert len(inductor_settings) == len(programs)  # nothing compiled
    assert len(calls) == 2 * len(programs) and sum(calls[len(programs):]) == 9
    later.compile = "never"
    assert later.generate_batch(prompts, seed=7, max_new_bytes=10, **filters) == texts


@pytest.mark.slow
def test_on_a_torch_not_checked_the_step_is_compiled_and_called_through_public_apis(
        tmp_path, monkeypatch):
    """On a torch release the project was not checked against, the program gets no
    private inductor options and is called as a loaded model, not through boxed_run:
    still the eager bytes."""
    import predictor as predictor_module
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    inductor_settings = recording_packages(monkeypatch)
    boxed_runs = []
    real_load = predictor_module.load_program

    def load(path):  # the loaded model's public call only (no boxed_run)
        program = real_load(path)
        return lambda *args: public_calls.append(1) or program(*args)
    public_calls = []
    monkeypatch.setattr(predictor_module, "load_program", load)
    # a window of 32: the 24 bytes never slide it, so every byte after the first is a step
    predictor = make_predictor(tmp_path, sequence_length=32, generation_compile="always")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        compiled, eager = compiled_and_eager(predictor, ["The "], seed=2, max_new_bytes=20,
                                             **RANDOM)
    assert compiled == eager and inductor_settings == [None] and len(public_calls) == 19


# --- compiled programs kept on disk (an eager stand-in for AOTInductor: seconds) ---------

def eager_stand_in_compiler(monkeypatch):
    """compile_ahead_of_time gives random bytes (a package) and load_program gives the
    program a package stands for, run eagerly, through the public call: what the
    predictor does around programs (its folder, keys, checks, memory), without a
    compiler. Returns the paths of the packages the predictor keeps, in order."""
    import predictor as predictor_module
    programs, compiled, real_keep = {}, [], predictor_module.keep_program

    def compile_ahead_of_time(program, args):
        data = os.urandom(64)
        programs[hashlib.sha256(data).hexdigest()] = program
        return data

    def keep_program(folder, key, program, args):
        compiled.append(os.path.join(folder, predictor_module.program_name(key) + ".pt2"))
        return real_keep(folder, key, program, args)

    def damaged(*args):
        raise AssertionError("a damaged package ran")

    def load_program(path):  # a damaged package loads, as some would, and must not run
        with open(path, "rb") as file:
            program = programs.get(hashlib.sha256(file.read()).hexdigest(), damaged)
        return lambda *args: program(*args)
    monkeypatch.setattr(predictor_module, "compile_ahead_of_time", compile_ahead_of_time)
    monkeypatch.setattr(predictor_module, "keep_program", keep_program)
    monkeypatch.setattr(predictor_module, "load_program", load_program)
    monkeypatch.setattr(predictor_module, "torch_internals_checked", lambda: False)
    return compiled


def kept_files(tmp_path):
    folder = tmp_path / "checkpoints" / "compiled"
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def generates_as_eager(predictor, prompts=("ab",), **settings):
    """predictor's texts and bytes equal those of eager decoding; the texts."""
    settings = {"seed": 4, "max_new_bytes": 12, **RANDOM, **settings}
    texts, data = predictor.generate_batch(list(prompts), **settings), predictor.last_bytes
    eager = make_predictor(os.path.dirname(predictor.config["checkpoint_dir"]),
                           generation_compile="never")
    eager.model.load_state_dict(predictor.model.state_dict())
    assert eager.generate_batch(list(prompts), **settings) == texts and eager.last_bytes == data
    return texts


def test_a_program_is_kept_on_disk_and_serves_later_predictors_from_the_first_byte(
        tmp_path, monkeypatch):
    compiled = eager_stand_in_compiler(monkeypatch)
    first = make_predictor(tmp_path, generation_compile="always")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generates_as_eager(first)
        assert len(compiled) == 1
        name = os.path.basename(compiled[0])[:-len(".pt2")]
        assert kept_files(tmp_path) == [name + ".json", name + ".pt2"]
        later = make_predictor(tmp_path, generation_compile="auto")  # a short call
        generates_as_eager(later)
        assert len(compiled) == 1 and list(later._programs) == [name]
        generates_as_eager(later, ["ab", "cd"])  # no program kept for 2 prompts: eager
    assert len(compiled) == 1 and list(later._programs) == [name]


def test_a_refill_in_place_of_a_step_decodes_as_eager_between_program_calls(tmp_path,
                                                                            monkeypatch):
    """A program decodes one prompt whose window slides: each refill feeds the newest byte
    and the sampler draws from its logits, on the state the program reads and writes,
    between its calls. The bytes are eager decoding's, and the slides' bytes are no
    program calls."""
    eager_stand_in_compiler(monkeypatch)
    calls = counting_program_calls(monkeypatch)
    predictor = make_predictor(tmp_path, sequence_length=16, generation_compile="always")
    filters = dict(temperature=1.0, top_k=0, top_p=0.95, repetition_penalty=1.1)
    compiled, eager = compiled_and_eager(predictor, ["q" * 15], seed=3, max_new_bytes=40,
                                         **filters)
    assert compiled == eager
    assert 0 < sum(calls) < 39  # the 39 bytes after the prompt's, less the slides'


@pytest.mark.parametrize("damage", ["truncated", "record garbled", "record of another key",
                                    "fails to load"])
def test_a_damaged_kept_program_is_compiled_again_not_used(tmp_path, monkeypatch, damage):
    import predictor as predictor_module
    compiled = eager_stand_in_compiler(monkeypatch)
    generates_as_eager(make_predictor(tmp_path, generation_compile="always"))
    package = compiled[0]
    record = package[:-len(".pt2")] + ".json"
    if damage == "fails to load":  # once: say, a package of a torch build that differs
        real_load, failed = predictor_module.load_program, []

        def load_program(path):
            if not failed:
                failed.append(path)
                raise RuntimeError("Error in dlopen: undefined symbol")
            return real_load(path)
        monkeypatch.setattr(predictor_module, "load_program", load_program)
    elif damage == "truncated":
        with open(package, "r+b") as file:
            file.truncate(10)
    elif damage == "record garbled":
        with open(record, "w") as file:
            file.write('{"key": ')
    else:
        with open(record) as file:
            kept = json.load(file)
        kept["key"]["batch"] = 3
        with open(record, "w") as file:
            json.dump(kept, file)
    predictor = make_predictor(tmp_path, generation_compile="auto")
    with pytest.warns(UserWarning, match="compiling it again"):
        generates_as_eager(predictor)
    assert compiled == [package, package]  # compiled again, in its place
    generates_as_eager(make_predictor(tmp_path, generation_compile="auto"))
    assert len(compiled) == 2  # the new one serves


def test_a_program_that_cannot_be_kept_serves_its_process(tmp_path, monkeypatch):
    compiled = eager_stand_in_compiler(monkeypatch)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "compiled").write_text("a file where the folder would be")
    predictor = make_predictor(tmp_path, generation_compile="always")
    with pytest.warns(UserWarning, match="cannot keep the compiled decode step"):
        generates_as_eager(predictor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generates_as_eager(predictor)  # held in memory: not compiled again
    assert len(compiled) == 1 and predictor._compiled_step is not False


@pytest.mark.parametrize("other", ["torch", "vector instructions"])
def test_a_program_of_another_torch_or_cpu_is_not_used(tmp_path, monkeypatch, other):
    """Nor one built for another CPU's vector instructions, which loading does not check."""
    compiled = eager_stand_in_compiler(monkeypatch)
    generates_as_eager(make_predictor(tmp_path, generation_compile="always"))
    if other == "torch":
        monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    else:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "OTHER")
    predictor = make_predictor(tmp_path, generation_compile="auto")
    assert not predictor._compiles(12)  # nothing kept for this one: a short call is eager
    predictor.compile = "always"
    generates_as_eager(predictor)
    assert len(compiled) == 2 and compiled[0] != compiled[1]


def test_a_program_for_other_inputs_warns_and_decodes_eagerly(tmp_path, monkeypatch):
    compiled = eager_stand_in_compiler(monkeypatch)
    generates_as_eager(make_predictor(tmp_path, generation_compile="always"))
    record = compiled[0][:-len(".pt2")] + ".json"
    with open(record) as file:
        kept = json.load(file)
    first_matrix = next(spec for spec in kept["inputs"][2:] if spec[1])  # a weight, not a scale
    first_matrix[1][0] += 1  # its first dimension
    with open(record, "w") as file:
        json.dump(kept, file)
    predictor = make_predictor(tmp_path, generation_compile="auto")
    with pytest.warns(UserWarning, match="compiled for other inputs"):
        generates_as_eager(predictor)
    assert predictor._compiled_step is False and len(compiled) == 1


def test_a_predictor_holds_a_bounded_number_of_programs(tmp_path, monkeypatch):
    import predictor as predictor_module
    compiled = eager_stand_in_compiler(monkeypatch)
    loaded, real_load = [], predictor_module.load_program
    monkeypatch.setattr(predictor_module, "load_program",
                        lambda path: loaded.append(path) or real_load(path))
    predictor = make_predictor(tmp_path, generation_compile="always")
    kept = predictor_module.PROGRAMS_KEPT
    for batch in range(1, kept + 3):
        generates_as_eager(predictor, ["ab"] * batch)
    names = [os.path.basename(path)[:-len(".pt2")] for path in compiled]
    assert len(compiled) == kept + 2 and list(predictor._programs) == names[-kept:]
    generates_as_eager(predictor, ["ab"] * 3)  # held: nothing loaded
    assert len(loaded) == kept + 2 and list(predictor._programs)[-1] == names[2]
    generates_as_eager(predictor, ["ab"])  # dropped from memory, read back from disk
    assert len(compiled) == kept + 2 and len(loaded) == kept + 3
    assert list(predictor._programs) == [*names[4:], names[2], names[0]]


@pytest.mark.slow
@pytest.mark.parametrize("device", GPU_DEVICES)  # the CPU's compiled path is tested above
@pytest.mark.parametrize("parallel,amp", [(False, None), (False, "bfloat16"), (True, "float16")],
                         ids=["single-stream-fp32", "single-stream-bf16", "parallel-stream-fp16"])
def test_a_step_compiled_for_the_gpu_gives_the_eager_bytes(tmp_path, parallel, amp, device):
    """The GPU's compiled path (torch.compile with CUDA graphs) against the eager one, in
    fp32 and under autocast: the same bytes for a batch; again after the weights change in
    place (training does between interim samples) and with another seed; and the step
    really ran as CUDA graphs."""
    import torch._dynamo.utils
    amp_settings = {"use_amp": True, "amp_dtype": amp} if amp else {"use_amp": False}
    predictor = make_predictor(tmp_path, parallel, sequence_length=32, device=device,
                               generation_compile="always", **amp_settings)
    prompts, settings = ["The ", "é"], dict(max_new_bytes=40, **RANDOM)
    torch._dynamo.utils.counters.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled, eager = compiled_and_eager(predictor, prompts, seed=2, **settings)
        with torch.no_grad():
            for parameter in predictor.model.parameters():
                parameter.mul_(1.5)
        changed, changed_eager = compiled_and_eager(predictor, prompts, seed=5, **settings)
        # prompts of one length slide together: refills in place of steps, the sampler
        # drawing on the graphs' buffers between replays
        sliding, sliding_eager = compiled_and_eager(predictor, ["q" * 20, "r" * 20], seed=3,
                                                    **settings)
    assert not [w for w in caught if "decode step failed" in str(w.message)]
    assert predictor._compiled_step not in (None, False)
    assert compiled == eager and sliding == sliding_eager
    assert changed == changed_eager and changed != compiled
    skips = dict(torch._dynamo.utils.counters["inductor"])
    assert not {k: v for k, v in skips.items() if "cudagraph_skip" in k}, skips


def through_torch_compile(monkeypatch):
    """Compile the CPU's decode step with torch.compile, as on a GPU, not ahead of time."""
    import predictor as predictor_module
    monkeypatch.setattr(predictor_module, "AHEAD_OF_TIME_DEVICE_TYPES", ())


@pytest.mark.parametrize("ahead_of_time", [True, False])
def test_a_compiler_that_fails_falls_back_to_eager_with_a_warning(tmp_path, monkeypatch,
                                                                   ahead_of_time):
    import torch._inductor

    import predictor as predictor_module

    def fails(*args, **options):
        raise RuntimeError("no working C++ compiler found")
    if ahead_of_time:
        monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fails)
    else:
        through_torch_compile(monkeypatch)
        monkeypatch.setattr(predictor_module.torch, "compile", lambda function, **options: fails)
    predictor = make_predictor(tmp_path, generation_compile="always")
    with pytest.warns(UserWarning, match="no working C\\+\\+ compiler found"):
        text = predictor.generate("The ", max_new_bytes=20, seed=2, **RANDOM)
    assert predictor._compiled_step is False and predictor._programs == {}
    predictor.compile = "never"
    assert predictor.generate("The ", max_new_bytes=20, seed=2, **RANDOM) == text


def counting_compiles(monkeypatch):
    """torch.compile in predictor.py, on the CPU too, with a backend that records each
    graph: the list. Graphs compiled before are dropped: torch.compile keeps at most
    recompile_limit graphs of the step in a process, however many predictors compile it."""
    import predictor as predictor_module
    through_torch_compile(monkeypatch)
    torch.compiler.reset()
    graphs, real_compile = [], torch.compile

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward
    monkeypatch.setattr(predictor_module.torch, "compile", lambda function, **options:
                        real_compile(function, backend=counting_backend, dynamic=False,
                                     fullgraph=options["fullgraph"]))
    return graphs


def generates_like_eager(compiled, eager, calls):
    """Each (prompts, settings, valid_utf8_only) call gives the compiled predictor the
    eager one's texts and bytes, with no warning (no fallback to eager decoding)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for prompts, settings, valid_utf8_only in calls:
            compiled.valid_utf8_only = eager.valid_utf8_only = valid_utf8_only
            texts = compiled.generate_batch(prompts, max_new_bytes=12, seed=3, **settings)
            assert texts == eager.generate_batch(prompts, max_new_bytes=12, seed=3, **settings)
            assert compiled.last_bytes == eager.last_bytes
    assert compiled._compiled_step not in (None, False)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ARCHITECTURES)
def test_one_graph_serves_every_setting_of_a_batch_size(tmp_path, monkeypatch, parallel):
    """torch.compile's step (fullgraph: one graph, no breaks) takes every sampling setting
    as a tensor: another temperature, top-k, top-p, penalty, greedy or UTF-8 rule reuses
    the graph; only another batch size (a shape) gets one of its own."""
    graphs = counting_compiles(monkeypatch)
    compiled = make_predictor(tmp_path, parallel, generation_compile="always")
    eager = make_predictor(tmp_path, parallel, generation_compile="never")
    calls = [(["ab"], RANDOM, True), (["ab"], {**RANDOM, "temperature": 0}, True),
             (["ab"], dict(temperature=0.7, top_k=3, top_p=0.9, repetition_penalty=1.3), False),
             (["ab", "c", "déf"], RANDOM, True)]
    generates_like_eager(compiled, eager, calls)
    # fixed patches: with and without the patch stream; spacelike ends are found on the device
    graphs_per_batch_size = 1 if parallel in (False, "at-spacelike-ends") else 2
    assert len(graphs) == 2 * graphs_per_batch_size


def spy_on_step_inputs(monkeypatch, predictor):
    """The addresses of the cache's, the positions' and the sampler's tensors at each
    step of `predictor` (a list of sets)."""
    seen, real_step_function = [], Predictor._step_function

    def spying(self, steps, batch=1):
        step = real_step_function(self, steps, batch)

        def spy(byte, cache, positions, sampler, patch_due=None):
            if self is predictor:
                seen.append({t.data_ptr() for t in [*cache.tensors(), positions,
                                                    *sampler.tensors()]})
            return step(byte, cache, positions, sampler, patch_due)
        return spy
    monkeypatch.setattr(Predictor, "_step_function", spying)
    return seen


@pytest.mark.slow
def test_a_call_through_graphs_decodes_in_buffers_kept_from_call_to_call(tmp_path,
                                                                         monkeypatch):
    """On a GPU the compiled step reads and writes the cache, the sampler's state and the
    positions in buffers the predictor keeps, at the same addresses in every call (CUDA
    graphs replay on them). Here on the CPU, through torch.compile: the eager bytes, and
    every step of two calls on the kept buffers."""
    graphs = counting_compiles(monkeypatch)
    monkeypatch.setattr(Predictor, "_replays_cuda_graphs",
                        lambda self, steps, batch=1: self._compiles(steps, batch))
    compiled = make_predictor(tmp_path, True, generation_compile="always")
    eager = make_predictor(tmp_path, True, generation_compile="never")
    seen = spy_on_step_inputs(monkeypatch, compiled)
    generates_like_eager(compiled, eager, [(["ab", "c"], RANDOM, True)])
    kept = {key: buffer.data_ptr() for key, buffer in compiled._buffers.items()}
    assert {key[0] for key in kept} == {"cache", "sampler", "positions"}
    generates_like_eager(compiled, eager, [(["xyz", "déf"], RANDOM, True)])
    assert {key: buffer.data_ptr() for key, buffer in compiled._buffers.items()} == kept
    assert graphs and len(seen) == 2 * 11  # 11 steps a call (12 bytes)
    assert all(addresses <= set(kept.values()) for addresses in seen)
    # prompts of one length whose windows (16) slide together: the refills write the kept
    # buffers in place, and the sampler draws on them between the steps
    generates_like_eager(compiled, eager, [(["q" * 14, "r" * 14], RANDOM, True)])
    assert {key: buffer.data_ptr() for key, buffer in compiled._buffers.items()} == kept
    assert 2 * 11 < len(seen) < 3 * 11 and all(addresses <= set(kept.values())
                                                for addresses in seen)
    assert eager._buffers == {}  # an eager call needs none


def test_an_error_after_a_compiled_step_has_run_is_raised_not_hidden(tmp_path, monkeypatch):
    """A compiled step that fails after its first call of a generate call (the cache and
    the sampler may have moved on) stops the call with its error; eager decoding takes
    over only from a failure to compile, at a graph's first step."""
    import predictor as predictor_module
    through_torch_compile(monkeypatch)

    def compiling(function, **options):
        calls = []

        def run(*args):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("the device was lost")
            return function(*args)
        return run
    monkeypatch.setattr(predictor_module.torch, "compile", compiling)
    predictor = make_predictor(tmp_path, generation_compile="always")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either
        with pytest.raises(RuntimeError, match="the device was lost"):
            predictor.generate("ab", max_new_bytes=10, seed=1, **RANDOM)
    assert predictor._compiled_step is not False


@pytest.mark.slow
def test_a_step_past_the_recompile_limit_warns_and_decodes_eagerly(tmp_path, monkeypatch):
    """torch.compile runs a function that needs more graphs than recompile_limit
    eagerly; compiled with fullgraph it raises instead, and the predictor says so and
    decodes eagerly: the eager bytes, never a graph made for another shape."""
    import torch._dynamo
    graphs = counting_compiles(monkeypatch)
    compiled = make_predictor(tmp_path, generation_compile="always")
    eager = make_predictor(tmp_path, generation_compile="never")
    # config.patch, not monkeypatch: undoing a monkeypatch.setattr left the setting
    # hidden ("recompile_limit does not exist") for every later compile in the process
    with torch._dynamo.config.patch(recompile_limit=2):
        generates_like_eager(compiled, eager, [(["ab"], RANDOM, True),
                                               (["ab", "cd"], RANDOM, True)])
        with pytest.warns(UserWarning, match="generating uncompiled"):
            texts = compiled.generate_batch(["ab", "c", "d"], max_new_bytes=12, seed=3, **RANDOM)
    assert texts == eager.generate_batch(["ab", "c", "d"], max_new_bytes=12, seed=3, **RANDOM)
    assert len(graphs) == 2 and compiled._compiled_step is False


@pytest.mark.parametrize("checked", [True, False])
def test_private_inductor_options_only_on_a_torch_checked_for_them(tmp_path, monkeypatch,
                                                                   checked):
    import predictor as predictor_module
    through_torch_compile(monkeypatch)
    options = []
    monkeypatch.setattr(predictor_module.torch, "compile",
                        lambda function, **given: options.append(given) or function)
    if not checked:
        monkeypatch.setattr(torch, "__version__", "2.99.0")
    predictor = make_predictor(tmp_path, generation_compile="always")
    predictor.generate("ab", max_new_bytes=3, seed=1, **RANDOM)
    [given] = options
    assert given["fullgraph"] is True
    if checked:
        assert given["options"] == {"cpp_wrapper": True,
                                    **predictor_module.CPU_STEP_INDUCTOR_OPTIONS}
        assert predictor_module.inductor_options("cpu", ahead_of_time=True) == \
            predictor_module.CPU_STEP_INDUCTOR_OPTIONS
    else:
        assert "options" not in given
        assert predictor_module.inductor_options("cpu", ahead_of_time=True) == {}


def test_auto_compiles_calls_long_enough_per_prompt_whatever_the_batch(tmp_path, monkeypatch):
    # A batch saves the same time per step as one prompt, so "auto" counts bytes per
    # prompt: 8 prompts of 10 bytes stay eager where one prompt of 20 compiles.
    import predictor as predictor_module
    compiled = []

    def recording(function, **options):
        compiled.append(function)
        return function
    through_torch_compile(monkeypatch)
    monkeypatch.setattr(predictor_module.torch, "compile", recording)
    monkeypatch.setitem(predictor_module.COMPILE_PAYS_AFTER_BYTES, "cpu", 20)
    predictor = make_predictor(tmp_path, generation_compile="auto")
    predictor.generate_batch(["ab"] * 8, max_new_bytes=10, seed=1, **RANDOM)
    assert compiled == []
    predictor.generate("ab", max_new_bytes=20, seed=1, **RANDOM)
    assert len(compiled) == 1


def test_auto_compiles_sooner_where_compiling_pays_sooner(tmp_path):
    from predictor import COMPILE_PAYS_AFTER_BYTES
    predictor = make_predictor(tmp_path, generation_compile="auto")
    cpu, cuda = COMPILE_PAYS_AFTER_BYTES["cpu"], COMPILE_PAYS_AFTER_BYTES["cuda"]
    assert cuda < cpu
    for device_type, threshold in (("cpu", cpu), ("cuda", cuda), ("mps", cpu)):
        predictor.device = torch.device(device_type)  # only _compiles reads it here
        assert not predictor._compiles(threshold - 1) and predictor._compiles(threshold)
