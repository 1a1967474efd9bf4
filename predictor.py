"""Text generation: sample bytes from a GrugV3 model and stream them as text.

Each step turns the model's logits for the next byte into one byte, for a batch of
streams at once, on the model's device: repetition penalty -> valid-UTF-8 mask ->
temperature -> top-k -> top-p -> a draw. The draw is the Gumbel-max trick with noise
that is a hash of (stream seed, step, byte): a stream's text depends on its own seed
only, not on the other prompts of its batch, and the global RNG is never touched (the
trainer relies on it for exact resume).

With the KV cache each prompt is fed in one pass, then one byte per stream and step
(`Model.decode_step`, which a compiler can turn into a few kernels: AOTInductor ahead of
time on a CPU, torch.compile on a GPU); a window that slides is refilled in one pass as a
prompt is fed (with the newest byte, in place of that step, when every stream slides);
without the cache every step is a full forward over the context. Both paths see exactly
the same bytes at every step (`window_start`), so with the same seed they produce the same
output.
"""

import codecs
import collections
import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import sys
import tempfile
import warnings

import torch

from config import RULES, keys_with
from utils import (MASK32, atomic_output, autocast_context, error_summary, resolve_amp_dtype,
                   torch_internals_checked)

EMPTY_PROMPT = b"\n"  # the model needs at least one input byte; a newline is a neutral start
KEEP_FRACTION = 0.75  # a full window slides to keep this much of it (see window_start)
# "auto" compiles calls that make this many bytes per prompt, by device type (others: the
# CPU's): compiling takes tens of seconds, so it pays only for long generations. The values
# sit above the break-even that bench.py's generation section measured (its "compile pays
# after" figure) on the 2-core CPU and on an H200; the runs are in docs/benchmarks.md
# (Figures behind design choices).
COMPILE_PAYS_AFTER_BYTES = {"cpu": 60_000, "cuda": 4_000}

# generate() argument -> the config key that gives its default (config.KEY_ROLES)
SETTING_KEYS = {key.removeprefix("generation_"): key for key in keys_with("generate")}
NOISE_BLOCK = 64  # steps of sampling noise an eager CPU sampler makes at once (_log_noise)


# ---------------------------------------------------------------------------
# Sampling filters: logits (..., 256) in, logits out; whole batches at once.

def penalize_repeats(logits, seen, penalty):
    """CTRL-style: positive logits of recently seen bytes (`seen`, bool like logits) are
    divided by `penalty` (a number or a 0-d tensor), negative ones multiplied, so a
    penalty > 1 always makes them less likely (and 1 changes nothing)."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits, k):
    """Keep the logits at least as large as the k-th largest (0 = off; a tie with the k-th
    stays too); the others become -inf. k is a number or a 0-d tensor (a compiled step's:
    a sort then, since topk takes a Python k)."""
    if torch.is_tensor(k):
        ranked = torch.sort(logits, dim=-1, descending=True).values
        place = (k.clamp(1, logits.size(-1)) - 1).expand(*logits.shape[:-1], 1)
        kth = torch.where(k > 0, ranked.gather(-1, place), float("-inf"))
    elif k <= 0 or k >= logits.size(-1):
        return logits
    else:
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    """Nucleus filter: keep the smallest set of most likely bytes whose probability
    reaches p, always at least the most likely one. p is a number or a 0-d tensor; 1 (or
    more) is off."""
    if not torch.is_tensor(p) and p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= p
    if torch.is_tensor(p):  # p < 1: a tensor p of 1 could still drop bytes by rounding
        drop_sorted &= p < 1.0
    drop_sorted[..., 0] = False  # the top byte always stays (p may round to 0 in float32)
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back in byte order (every place written)
    return logits.masked_fill(drop, float("-inf"))


def is_greedy(temperature):
    """Temperature 0, or one too small to divide by in float32 (say 1e-300), is greedy."""
    return temperature == 0 or not math.isfinite(float(torch.tensor(1.0 / temperature)))


def hashed_uniforms(seeds, step, device):
    """(B, 256) uniforms in (0, 1), a hash of (stream seed, step, byte value): a
    counter-based random stream per prompt. Every product stays below 2**63, so int64
    arithmetic is exact on every device. `step` is a 0-d tensor, or (n,) steps, which
    give (n, B, 256): each step's uniforms, the same values."""
    salt = ((step * 0x27D4EB2F + 0x165667B1) & MASK32)[..., None, None]
    x = seeds[:, None] ^ salt  # (B, 1), or (n, B, 1)
    x = (x + torch.arange(256, device=device) * 0x9E3779B) & MASK32  # ([n,] B, 256)
    for multiplier in (0x7FEB352D, 0x5BD1E995, 0x2C1B3C6D):
        x = x ^ (x >> 16)
        x = (x * multiplier) & MASK32
    return ((x >> 8).float() + 0.5) * 2.0**-24


class StreamSampler:
    """Chooses the next byte of B streams from their logits, keeping each stream's
    state as tensors on the device: its seed, the step, its UTF-8 state and its recent
    bytes (the repetition window), and every setting (temperature, top-k, top-p, penalty,
    greedy or not, the UTF-8 rule). choose() reads no value back to the host, so a
    generation loop needs no synchronisation per byte."""

    def __init__(self, settings, seeds, utf8_states, recent, valid_utf8_only, device):
        # Eager decoding skips the filters that are off (Python values); a compiled step
        # runs them all (every_filter), its settings read from tensors, so one program
        # serves every setting and programs differ only by shapes. Off, each filter
        # changes nothing, so both give the same bytes.
        self.greedy, self.valid_utf8_only = is_greedy(settings["temperature"]), valid_utf8_only
        # top-p as the float32 a tensor holds: a p just under 1 rounds to 1 (off), as in
        # the compiled step
        self.k, self.p = settings["top_k"], float(torch.tensor(settings["top_p"],
                                                               dtype=torch.float32))
        self.filters_top_p = self.p < 1.0
        self.penalizes, self.every_filter = settings["repetition_penalty"] != 1.0, False
        def value(number, dtype=torch.float32):  # float32, as choose() computes
            return torch.tensor(number, dtype=dtype, device=device)
        self.temperature = value(1.0 if self.greedy else settings["temperature"])
        self.top_p, self.penalty = value(settings["top_p"]), value(settings["repetition_penalty"])
        self.top_k = value(settings["top_k"], torch.long)
        self.argmax, self.utf8_only = value(self.greedy, torch.bool), value(valid_utf8_only,
                                                                           torch.bool)
        self.seeds = torch.tensor([seed & MASK32 ^ seed >> 32 for seed in seeds], device=device)
        self.step = torch.zeros((), dtype=torch.long, device=device)
        _, allowed, following = utf8_tables()
        self.allowed, self.following = allowed.to(device), following.to(device)
        self.utf8_state = torch.tensor(utf8_states, device=device)
        self.recent = torch.tensor(recent, device=device)  # (B, window); 256 = empty
        self._noise, self._noise_from = torch.empty(0), 0  # see _log_noise

    def choose(self, logits):
        """Bytes (B,) from logits (B, 256), advancing every stream's state."""
        logits, every = logits if logits.dtype == torch.float32 else logits.float(), self.every_filter
        if every or self.penalizes:
            seen = torch.zeros(logits.size(0), 257, dtype=torch.bool, device=logits.device)
            seen = seen.scatter_(1, self.recent, True)[:, :256]
            logits = penalize_repeats(logits, seen, self.penalty)
        if every:
            allowed = self.allowed[self.utf8_state] | ~self.utf8_only
            logits = logits.masked_fill(~allowed, float("-inf"))
        elif self.valid_utf8_only:
            logits = torch.where(self.allowed[self.utf8_state], logits, float("-inf"))
        if not every and self.greedy:
            chosen = logits.argmax(-1)
        else:
            sampled = top_k_filter(logits / self.temperature, self.top_k if every else self.k)
            if every or self.filters_top_p:
                sampled = top_p_filter(sampled, self.top_p if every else self.p)
            chosen = (sampled - self._log_noise()).argmax(-1)  # Gumbel-max
            if every:
                chosen = torch.where(self.argmax, logits.argmax(-1), chosen)
        self.utf8_state.copy_(self.following[self.utf8_state, chosen])
        if self.every_filter or self.penalizes:  # only the penalty reads the recent bytes
            self.recent.scatter_(1, (self.step % self.recent.size(1)).expand(len(chosen), 1),
                                 chosen[:, None])
        self.step += 1
        return chosen

    def _log_noise(self):
        """log(-log(u)) of this step's hashed uniforms (B, 256), which the Gumbel-max draw
        subtracts. Eagerly on a CPU it is made for NOISE_BLOCK steps at once and read a
        step at a time: made at every step, its thirty-odd tensor operations each cost a
        dispatch (docs/benchmarks.md, Eager decode step). Compiled, it is fused into the
        step; on a GPU, reading the step to index a block would wait for the device."""
        if self.seeds.device.type != "cpu" or torch.compiler.is_compiling():
            return torch.log(-torch.log(hashed_uniforms(self.seeds, self.step,
                                                        self.seeds.device)))
        step = int(self.step)  # a block is checked against the step, whoever moved it on
        if not self._noise_from <= step < self._noise_from + len(self._noise):
            steps = torch.arange(step, step + NOISE_BLOCK)
            self._noise = torch.log(-torch.log(hashed_uniforms(self.seeds, steps, "cpu")))
            self._noise_from = step
        return self._noise[step - self._noise_from]

    TENSORS = ("seeds", "step", "allowed", "following", "utf8_state", "recent", "temperature",
               "top_k", "top_p", "penalty", "argmax", "utf8_only")

    def tensors(self):
        """The tensors choose() reads or writes, in the order with_tensors takes them."""
        return [getattr(self, name) for name in self.TENSORS]

    def with_tensors(self, tensors):
        """This sampler made of `tensors` (as tensors() lists them)."""
        view = copy.copy(self)
        for name, tensor in zip(self.TENSORS, tensors, strict=True):
            setattr(view, name, tensor)
        return view


def decode_and_choose(decode, byte, cache, positions, sampler, patch_due=None):
    """One decoding step of every stream: the next bytes (B,), with the cache, the
    sampler's state and `positions` moved on in place. `decode` is model.decode_step, or
    (in a program compiled ahead of time) a call of it with weights given as inputs."""
    chosen = sampler.choose(decode(byte, cache, positions, patch_due))
    positions += 1
    return chosen


@contextlib.contextmanager
def small_operations(threads):
    """Global settings for a loop of eager CPU decode steps, whose operations each handle
    a few hundred values, restored after: inference mode (no view or version tracking);
    PyTorch's own kernels rather than oneDNN's (its gelu's fixed cost per call is several
    times that of PyTorch's for so few values); at most `threads` threads. Yields a
    context manager that puts the settings found back for a while: a window's refill
    inside the loop is a pass over many bytes, like the prompt's, and runs as fast as
    that. Measured in docs/benchmarks.md, Eager decode step."""
    threads_before, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled

    def small():
        torch.set_num_threads(min(threads, threads_before))
        torch.backends.mkldnn.enabled = False

    def found():
        torch.set_num_threads(threads_before)
        torch.backends.mkldnn.enabled = onednn

    @contextlib.contextmanager
    def settings_found():
        found()
        try:
            yield
        finally:
            small()
    try:
        small()
        with torch.inference_mode():
            yield settings_found
    finally:
        found()


def stream_seeds(seed, count):
    """Each prompt's own seed: seed, seed+1, ... (None: fresh ones from the OS)."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    return [seed + i for i in range(count)]


# ---------------------------------------------------------------------------
# UTF-8 validity. A state is (continuation bytes still expected, lowest allowed
# value of the next byte, highest allowed value); UTF8_START expects a lead byte.

UTF8_START = (0, 0x00, 0x7F)


def utf8_next_state(state, byte):
    """The state after `byte`, or None if `byte` makes the text invalid UTF-8."""
    need, low, high = state
    if need > 0:
        if not low <= byte <= high:
            return None
        # The narrower ranges above hold for the second byte only; a complete character
        # is back at the start (one state, not a twin that merely behaves like it).
        return (need - 1, 0x80, 0xBF) if need > 1 else UTF8_START
    if byte <= 0x7F:
        return UTF8_START
    if 0xC2 <= byte <= 0xDF:
        return (1, 0x80, 0xBF)
    if byte == 0xE0:
        return (2, 0xA0, 0xBF)  # lower would be an overlong 3-byte form
    if byte == 0xED:
        return (2, 0x80, 0x9F)  # higher would be a UTF-16 surrogate
    if 0xE1 <= byte <= 0xEF:
        return (2, 0x80, 0xBF)
    if byte == 0xF0:
        return (3, 0x90, 0xBF)  # lower would be an overlong 4-byte form
    if 0xF1 <= byte <= 0xF3:
        return (3, 0x80, 0xBF)
    if byte == 0xF4:
        return (3, 0x80, 0x8F)  # higher would be above U+10FFFF
    return None  # a stray continuation byte, C0/C1 (overlong) or F5-FF


@functools.lru_cache(maxsize=None)
def utf8_tables():
    """The state machine as tables, for sampling on the device: (the states, in order,
    the start first; allowed (S, 256) bool: which bytes keep the text valid after each
    state; following (S, 256) long: the state after each allowed byte)."""
    states, allowed, following = [UTF8_START], [], []
    for state in states:  # grows while new states turn up
        row = [utf8_next_state(state, byte) for byte in range(256)]
        for new in row:
            if new is not None and new not in states:
                states.append(new)
        allowed.append([new is not None for new in row])
        following.append([states.index(new) if new is not None else 0 for new in row])
    return states, torch.tensor(allowed), torch.tensor(following)


def utf8_unfinished_tail(data):
    """(state, tail) after `data`: `tail` is its unfinished last character (b"" if
    the last character is complete or invalid; an invalid one is never finished)."""
    for i in range(len(data) - 1, max(len(data) - 4, -1), -1):
        if 0x80 <= data[i] <= 0xBF:
            continue  # a continuation byte: the character started further back
        state = UTF8_START
        for byte in data[i:]:
            state = utf8_next_state(state, byte)
            if state is None:
                return UTF8_START, b""
        return (state, bytes(data[i:])) if state[0] > 0 else (UTF8_START, b"")
    return UTF8_START, b""


# ---------------------------------------------------------------------------
# Generation

def window_start(start, length, window):
    """Index of the first context byte the model sees, given the previous one.

    The view grows until it would exceed the window; then it jumps forward to keep the
    last three quarters, so the cache is rebuilt once every window/4 bytes rather than
    on every step. The uncached path uses the same rule, so both see the same bytes."""
    if length - start <= window:
        return start
    return length - max(1, int(window * KEEP_FRACTION))


def generation_settings(config, **overrides):
    """The settings of one generate() call: an override that is None takes the config's
    generation_* value. Raises ValueError on a value its config key would not accept."""
    settings = {name: config[key] if overrides.get(name) is None else overrides[name]
                for name, key in SETTING_KEYS.items()}
    problems = [RULES[key].problem(name, settings[name]) for name, key in SETTING_KEYS.items()]
    problems = [problem for problem in problems if problem]
    if problems:
        raise ValueError("; ".join(problems))
    return settings


def prompt_bytes(prompt):
    """The prompt as bytes (str is UTF-8 encoded); an empty prompt becomes EMPTY_PROMPT."""
    data = prompt.encode("utf-8") if isinstance(prompt, str) else bytes(prompt)
    return data or EMPTY_PROMPT


class Stream:
    """One prompt's generation: its bytes so far and where the model's view starts."""

    def __init__(self, prompt, valid_utf8_only):
        self.prompt, self.context, self.start = prompt, list(prompt), 0
        self.utf8_state, self.tail = utf8_unfinished_tail(prompt)
        if not valid_utf8_only:
            self.utf8_state = UTF8_START
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.decoder.decode(self.tail)  # so the first generated bytes complete the prompt's
        self.pieces = []

    def emit(self, data, on_text=None, final=False):
        piece = self.decoder.decode(bytes(data), final=final)
        if piece:
            self.pieces.append(piece)
            if on_text is not None:
                on_text(piece)


def copying_out(compiled_step):
    """`compiled_step` (compiled with CUDA graphs) with its output copied out. A graph
    writes each replay's output where the last one's was, and the generation loop keeps
    every step's bytes. Without the copy (kept buffers, on an H200) torch raised
    "accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run"
    at the end of a compiled call."""
    def step(*args):
        return compiled_step(*args).clone()
    return step


# ---------------------------------------------------------------------------
# The decode step compiled ahead of time, kept on disk

# Device types whose compiled decode step is built by AOTInductor and called from its C++
# runner rather than through torch.compile. On a CPU a call through torch.compile spends a
# large share of a short step in Python (its frame hook, AOTAutograd's wrappers, guards),
# which the ahead-of-time program does not (docs/benchmarks.md, Figures behind design
# choices). On a GPU, CUDA graphs take that cost away.
AHEAD_OF_TIME_DEVICE_TYPES = ("cpu",)
# Inductor's settings for the CPU's decode step (both compiled paths), private ones, so
# given only on a torch in utils.TORCH_INTERNALS_CHECKED (inductor_options). For one
# stream each of a layer's matrices is a matrix-vector product, which the compiled step
# otherwise hands to MKL through at::addmm_out (a call per matrix, with a copy of the bias
# into the output first): decompose_mm_pass makes inductor write products of one row as
# its own loops, fused with the operations around them, so the step becomes one kernel.
# Not for more rows: for 8 streams it was slower. Products with a side over 2,048
# (inductor's CPU limit: a width over 512, say) still go to MKL. Measured in
# docs/benchmarks.md (Figures behind design choices; Speed).
CPU_STEP_INDUCTOR_OPTIONS = {"post_grad_fusion_options": {"decompose_mm_pass": {}}}
# Programs a predictor keeps loaded (least recently used dropped): a batch size's one or
# two (the parallel stream's patch_due), for the couple of batch sizes a session uses.
PROGRAMS_KEPT = 4
PROGRAM_FOLDER = "compiled"  # where programs are kept: <checkpoint_dir>/compiled
# The files whose code a program is compiled from: another version of any of them makes
# the programs kept on disk stale.
STEP_CODE_FILES = ("predictor.py", "model.py", "model_components.py", "utils.py")


def inductor_options(device_type, ahead_of_time):
    """Inductor's options for a decode step on `device_type`: none on a torch whose
    private options the project was not checked against."""
    if not torch_internals_checked():
        return {}
    options = {} if ahead_of_time else {"cpp_wrapper": True}  # kernels called from C++
    return {**options, **(CPU_STEP_INDUCTOR_OPTIONS if device_type == "cpu" else {})}


class DecodeStepCall(torch.nn.Module):
    """model.decode_step as a module's forward, which torch.func.functional_call calls."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, byte, cache, positions, patch_due):
        return self.model.decode_step(byte, cache, positions, patch_due)


class StepProgram(torch.nn.Module):
    """One decoding step (decode_and_choose) as a function of tensors alone, for
    torch.export: the byte, the positions, the model's weights and the cache's and the
    sampler's tensors are all inputs. So the compiled program keeps no copy of them
    (weights that training has changed since are the ones it reads; a program kept on disk
    serves a retrained model) and writes the cache and the sampler's state in place, as
    the eager step does."""

    def __init__(self, decode, cache, sampler, patch_due, amp_dtype):
        super().__init__()
        # a tuple, not attributes: the model's weights are inputs, not this module's own
        self.parts = (decode, cache, sampler)
        self.patch_due, self.amp_dtype = patch_due, amp_dtype

    def forward(self, byte, positions, weights, cache_tensors, sampler_tensors):
        decode, cache, sampler = self.parts
        cache, sampler = cache.with_tensors(cache_tensors), sampler.with_tensors(sampler_tensors)
        sampler.every_filter = True  # settings are inputs: one program serves them all
        # autocast inside (compile_ahead_of_time turns the caller's off): exported under
        # the caller's autocast, the step failed torch.export's dtype checks (torch 2.13)
        def decode_with_weights(*inputs):
            return torch.func.functional_call(decode, weights, inputs)
        with autocast_context(byte.device, self.amp_dtype):
            return decode_and_choose(decode_with_weights, byte, cache, positions, sampler,
                                     self.patch_due)


def step_inputs(args):
    """StepProgram's arguments flattened as torch.export flattens them (a dict in its
    order), each named: [(name, tensor)], the byte first."""
    byte, positions, weights, cache_tensors, sampler_tensors = args
    return [("byte", byte), ("positions", positions),
            *((f"weight {name}", tensor) for name, tensor in weights.items()),
            *((f"cache {i}", tensor) for i, tensor in enumerate(cache_tensors)),
            *((f"sampler {name}", tensor)
              for name, tensor in zip(StreamSampler.TENSORS, sampler_tensors, strict=True))]


def input_spec(named_inputs):
    """What a program compiled for `named_inputs` assumes of them, as JSON values: each
    one's name, shape, strides and dtype, in order. A program checks none of it."""
    return [[name, list(t.shape), list(t.stride()), str(t.dtype)] for name, t in named_inputs]


@functools.lru_cache(maxsize=None)
def step_code_digest():
    """A hash of the code a decode step is compiled from (STEP_CODE_FILES)."""
    digest = hashlib.sha256()
    for name in STEP_CODE_FILES:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), "rb") as file:
            digest.update(file.read())
    return digest.hexdigest()


def program_name(key):
    """The file name (without extension) of the program kept for `key`."""
    return "step_" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def compile_ahead_of_time(program, args):
    """`program` exported for `args` and compiled by AOTInductor: the package's bytes."""
    import torch._inductor  # here, not at the top: loading it takes seconds
    import torch.export
    device_type = args[0].device.type
    with (warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="grug_step_") as folder,
          torch.autocast(device_type, enabled=False)):  # the program sets its own (forward)
        # torch 2.13's own use of a pytree API it deprecates; nothing a user can act on
        warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
        exported = torch.export.export(program, args, strict=False)
        package = torch._inductor.aoti_compile_and_package(
            exported, package_path=os.path.join(folder, "step.pt2"),
            inductor_configs=inductor_options(device_type, ahead_of_time=True) or None)
        with open(package, "rb") as file:
            return file.read()


def load_program(path):
    """The package at `path`, loaded: on a torch in utils.TORCH_INTERNALS_CHECKED its C++
    runner alone (called through boxed_run), else a callable AOTICompiledModel.
    aoti_load_package imports torch._inductor and probes the CPU's vector instructions by
    compiling and running small programs, only to warn of a package built for others
    (Predictor._program_key holds them instead): most of a later process's wait for its
    first byte."""
    if torch_internals_checked():  # with aoti_load_package's defaults for the rest
        return torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1)
    from torch._inductor import aoti_load_package  # here, not at the top: it takes seconds
    return aoti_load_package(path)


def read_kept_program(folder, key):
    """((the program, loaded; the input spec it was compiled for), None) for the program
    kept in `folder` for `key`; (None, None) if none is kept; (None, why) for one that
    must not be used: compiled for another key (a hash collision, an edited record), a
    file that is not the one written (truncated, damaged), or one that does not load."""
    root = os.path.join(folder, program_name(key))
    if not os.path.exists(root + ".json"):
        return None, None
    try:
        with open(root + ".json", encoding="utf-8") as file:
            record = json.load(file)
        with open(root + ".pt2", "rb") as file:
            digest = hashlib.sha256(file.read()).hexdigest()
    except (OSError, ValueError) as error:
        return None, f"cannot be read ({error_summary(error)})"
    # the key as JSON gives it back (a tuple reads as a list)
    if not isinstance(record, dict) or record.get("key") != json.loads(json.dumps(key)):
        return None, "was compiled for other settings"
    if record.get("sha256") != digest:
        return None, "is damaged (its file is not the one written)"
    try:
        return (load_program(root + ".pt2"), record["inputs"]), None
    except Exception as error:  # a package this torch cannot load
        return None, f"cannot be loaded ({error_summary(error)})"


def keep_program(folder, key, program, args):
    """`program` compiled for `args` and kept in `folder` for `key` (package, then its
    record: a reader finds a record only beside the package it describes); returns
    (the program loaded, its input spec). Where `folder` cannot be written, the program
    serves this process only."""
    data, spec = compile_ahead_of_time(program, args), input_spec(step_inputs(args))
    root = os.path.join(folder, program_name(key))
    try:
        with atomic_output(root + ".pt2") as file:
            file.write(data)
        with atomic_output(root + ".json") as file:
            record = {"key": key, "inputs": spec, "sha256": hashlib.sha256(data).hexdigest()}
            file.write(json.dumps(record).encode())
    except OSError as error:
        warnings.warn(f"cannot keep the compiled decode step in {folder} "
                      f"({error_summary(error)}); the next process compiles it again")
        with tempfile.TemporaryDirectory(prefix="grug_step_") as temporary:
            with open(os.path.join(temporary, "step.pt2"), "wb") as file:
                file.write(data)
            return load_program(os.path.join(temporary, "step.pt2")), spec  # it copies it
    return load_program(root + ".pt2"), spec


class Predictor:
    """Generates text from `model` (already on `device`) with the config's generation_*
    settings as defaults. `use_kv_cache`, `valid_utf8_only` and `compile` ("auto",
    "always", "never") are attributes that can be changed after construction;
    `last_bytes` holds the raw bytes of the last generate() (a list after
    generate_batch())."""

    def __init__(self, model, device, config, use_kv_cache=None, compile=None):
        self.model = model
        self.device = torch.device(device)
        self.config = config
        self.use_kv_cache = config["use_kv_cache"] if use_kv_cache is None else use_kv_cache
        self.valid_utf8_only = config["generation_valid_utf8_only"]
        self.compile = config["generation_compile"] if compile is None else compile
        # No autocast on a CPU: a step is a few products of one row each, which the CPU's
        # bf16 kernels run slower than its fp32 ones, plus a cast of every weight per call
        # (docs/benchmarks.md, Eager decode step). Every path (cached, uncached, compiled)
        # generates in the same precision, so they give the same bytes.
        self.amp_dtype = (None if self.device.type == "cpu"
                          else resolve_amp_dtype(config, self.device))
        self.last_bytes = b""
        self._compiled_step = None  # torch.compile's step; False once compiling has failed
        # the programs compiled ahead of time, loaded, least recently used first
        self._programs = collections.OrderedDict()  # program_name(key) -> (program, spec)
        self._buffers = {}  # the state CUDA graphs replay on (see _kept_buffers)

    def generate(self, prompt, max_new_bytes=None, temperature=None, top_k=None, top_p=None,
                 repetition_penalty=None, seed=None, on_text=None):
        """The continuation of `prompt` (str or bytes) as text, without the prompt.

        `on_text(piece)` is called with each piece of text as soon as it is complete
        (a multi-byte character is never split). With valid_utf8_only, every byte keeps
        the text valid UTF-8 and a character still unfinished after max_new_bytes is
        trimmed (rather than finished past the limit), so last_bytes is valid UTF-8 and
        never longer than max_new_bytes. Without it, invalid bytes and a cut last character
        decode to U+FFFD. If the prompt ends inside a character, the text starts with that
        character, completed by the first generated bytes (which then start last_bytes)."""
        texts = self.generate_batch([prompt], max_new_bytes, temperature, top_k, top_p,
                                    repetition_penalty, seed, on_text)
        self.last_bytes = self.last_bytes[0]
        return texts[0]

    def generate_batch(self, prompts, max_new_bytes=None, temperature=None, top_k=None,
                       top_p=None, repetition_penalty=None, seed=None, on_text=None):
        """The continuations of several prompts, decoded together (a list of texts).
        Prompt i samples with seed + i: its text is what generate(prompt, seed=seed + i)
        gives. on_text, if given, streams the first prompt's text."""
        settings = generation_settings(
            self.config, max_new_bytes=max_new_bytes, temperature=temperature, top_k=top_k,
            top_p=top_p, repetition_penalty=repetition_penalty, seed=seed)
        streams = [Stream(prompt_bytes(p), self.valid_utf8_only) for p in prompts]
        # eval mode for the call, then each module's own mode back (a model in mixed modes
        # comes back as it was). Only the modules in training mode are touched: walking
        # every module with model.eval() and model.train() costs more than a short call's
        # steps (docs/benchmarks.md, Figures behind design choices).
        training = [module for module in self.model.modules() if module.training]
        try:
            for module in training:
                module.training = False
            with torch.no_grad(), autocast_context(self.device, self.amp_dtype):
                if self.use_kv_cache:
                    self._decode_cached(streams, settings, on_text)
                else:
                    seeds = stream_seeds(settings["seed"], len(streams))
                    for i, stream in enumerate(streams):
                        self._decode_uncached(stream, settings, seeds[i],
                                              on_text if i == 0 else None)
        finally:
            for module in training:
                module.training = True
        self.last_bytes = [self._finish(stream, settings, on_text if i == 0 else None)
                           for i, stream in enumerate(streams)]
        return ["".join(stream.pieces) for stream in streams]

    def _sampler(self, streams, settings, seeds):
        window = self.config["generation_repetition_window"]
        recent = [[256] * (window - len(s.context[-window:])) + s.context[-window:]
                  for s in streams]
        return StreamSampler(settings, seeds, [utf8_tables()[0].index(s.utf8_state)
                                               for s in streams],
                             recent, self.valid_utf8_only, self.device)

    def _finish(self, stream, settings, on_text):
        """The generated bytes of a stream, trimmed or flushed as generate() describes."""
        generated = bytes(stream.context[len(stream.prompt):])
        if self.valid_utf8_only:
            unfinished = min(len(stream.decoder.getstate()[0]), len(generated))
            return generated[:len(generated) - unfinished]
        stream.emit(b"", on_text, final=True)  # a cut character shows as U+FFFD
        return generated

    def _as_input(self, byte_values):
        return torch.tensor([byte_values], dtype=torch.long, device=self.device)  # (1, n)

    # -- without a cache: a full forward over the view for every byte ----------------

    def _decode_uncached(self, stream, settings, seed, on_text):
        sampler = self._sampler([stream], settings, [seed])
        window = self.model.context_length
        for _ in range(settings["max_new_bytes"]):
            stream.start = window_start(stream.start, len(stream.context), window)
            logits = self.model(self._as_input(stream.context[stream.start:]),
                                last_only=True)[:, -1]
            byte = int(sampler.choose(logits))
            stream.context.append(byte)
            stream.emit([byte], on_text)

    # -- with the cache: each prompt once, then one byte per stream and step ----------

    def _decode_cached(self, streams, settings, on_text):
        count, window = settings["max_new_bytes"], self.model.context_length
        if count == 0:
            return
        sampler = self._sampler(streams, settings, stream_seeds(settings["seed"], len(streams)))
        # Attention runs in fp32 on CPUs anyway; on GPUs the cache takes autocast's dtype.
        cache_dtype = torch.float32 if self.device.type == "cpu" else (self.amp_dtype or
                                                                        torch.float32)
        cache = self.model.new_cache(len(streams), dtype=cache_dtype)
        graphs = self._replays_cuda_graphs(count, len(streams))
        if graphs:
            cache = cache.with_tensors(self._kept_buffers("cache", cache.tensors()))
            sampler = sampler.with_tensors(self._kept_buffers("sampler", sampler.tensors()))
        last_logits = []
        for b, stream in enumerate(streams):  # each prompt in one pass, into its own row
            stream.start = window_start(0, len(stream.context), window)
            last_logits.append(self._feed(cache, b, stream.context[stream.start:]))
        chosen = sampler.choose(torch.cat(last_logits))  # (B,)
        # Each stream's position, kept on the host too, so that deciding when a window
        # is full reads nothing back from the device.
        at = [len(s.context) - s.start for s in streams]
        positions = torch.tensor(at, device=self.device)
        if graphs:
            [positions] = self._kept_buffers("positions", [positions])
        step = self._step_function(count, len(streams))
        generated = [chosen]
        with self._eager_cpu_steps(count, len(streams)) as refill_settings:
            for _ in range(count - 1):
                if on_text is not None:  # streaming reads each byte back; a batch need not
                    streams[0].emit([int(chosen[0])], on_text)
                logits = self._slide_full_windows(cache, streams, at, positions, generated,
                                                  refill_settings)
                if logits is None:
                    # the step moves `positions` on itself, on the device; `at` follows on
                    # the host
                    chosen = step(chosen, cache, positions, sampler, self._patch_due(at))
                    at = [p + 1 for p in at]
                else:  # every stream slid and was fed its newest byte, as a prompt is
                    chosen = sampler.choose(logits)
                generated.append(chosen)
        if on_text is not None:
            streams[0].emit([int(chosen[0])], on_text)
        for b, data in enumerate(torch.stack(generated, 1).tolist()):
            streams[b].context += data
            if b > 0 or on_text is None:
                streams[b].emit(data)

    def _slide_full_windows(self, cache, streams, at, positions, generated, refill_settings):
        """A stream whose next byte would not fit its window keeps the last
        KEEP_FRACTION of it, as the uncached path's view slides (window_start): its row is
        refilled with that part, under `refill_settings()` (a context manager). When every
        stream slides, each is refilled as a prompt is fed, its newest byte included, and
        the logits of the next bytes (B, 256) are returned: the decode step they replace
        would have fed that byte alone (a step fewer per slide). Otherwise a refill
        leaves the newest byte for the next step, and None is returned."""
        window = self.model.context_length
        full = [b for b, p in enumerate(at) if p >= window]
        if not full:
            return None
        every = len(full) == len(streams)
        recent = torch.stack(generated, 1).tolist()
        last_logits = []
        for b in full:
            stream = streams[b]
            context = stream.context + recent[b]
            stream.start = window_start(stream.start, len(context), window)
            view = context[stream.start:] if every else context[stream.start:-1]
            cache.reset_row(b)
            if view:  # (a window of 2 keeps one byte: the newest, for the step to feed)
                with refill_settings():
                    last_logits.append(self._feed(cache, b, view))
            at[b] = positions[b] = len(view)
        return torch.cat(last_logits) if every else None

    def _feed(self, cache, b, view):
        """Row b of `cache`, at position 0, fed the bytes `view` in one pass, as a prompt
        is: the logits (1, 256) of the byte after them."""
        return self.model.forward_incremental(self._as_input(view), cache.row(b),
                                              last_only=True)[:, -1]

    def _eager_cpu_steps(self, steps, batch):
        """Where a call's steps run eagerly on a CPU, the settings that suit their small
        operations (small_operations); elsewhere nothing. Either way it yields what a
        refill runs under (a context manager)."""
        if self.device.type != "cpu" or self._compiles(steps, batch):
            return contextlib.nullcontext(contextlib.nullcontext)
        # One stream's products have one row each: a second thread costs more than it
        # saves. Several streams' products have a row each and keep every thread.
        return small_operations(1 if batch == 1 else torch.get_num_threads())

    def _patch_due(self, at):
        """Parallel stream: whether a byte fed at the host-side positions `at` completes
        a patch in some stream (only then does the patch stream need to run); else None."""
        if not self._knows_patch_ends():
            return None
        return any((p + 1) % self.model.agg_stride == 0 for p in at)

    def _knows_patch_ends(self):
        """Whether the host knows where patches end (fixed patches of the parallel stream),
        so that _patch_due can skip the patch stream; spacelike ends depend on the bytes,
        which stay on the device."""
        return self.model.parallel and self.model.boundaries == "fixed"

    def _compiles(self, steps, batch=1):
        """Whether a call of `steps` steps for `batch` prompts decodes through a compiled
        step: where it pays (compile "auto": calls of at least COMPILE_PAYS_AFTER_BYTES
        steps, i.e. bytes per prompt: a batch saves the same time per step as one prompt;
        or any call whose programs are kept on disk already; "always"; "never"), unless
        compiling has failed before."""
        pays_after = COMPILE_PAYS_AFTER_BYTES.get(self.device.type,
                                                  COMPILE_PAYS_AFTER_BYTES["cpu"])
        wanted = self.compile == "always" or (self.compile == "auto" and (
            steps >= pays_after or self._programs_kept_for(batch)))
        return wanted and self._compiled_step is not False

    def _programs_kept_for(self, batch):
        """Whether every program a call for `batch` prompts runs is kept on disk."""
        if self.device.type not in AHEAD_OF_TIME_DEVICE_TYPES:
            return False
        patch_dues = (False, True) if self._knows_patch_ends() else (None,)
        return all(os.path.exists(os.path.join(self._program_folder(), program_name(
            self._program_key(batch, patch_due)) + ".json")) for patch_due in patch_dues)

    def _replays_cuda_graphs(self, steps, batch=1):
        """Whether a call of `steps` steps decodes through CUDA graphs (_kept_buffers)."""
        return self.device.type == "cuda" and self._compiles(steps, batch)

    def _kept_buffers(self, kind, tensors):
        """`tensors` copied into buffers the predictor keeps (one per kind, place in the
        list, shape and dtype; made at the first call). A CUDA graph replays at fixed
        addresses: an input that is not static is copied into the graph's memory at every
        replay, and inductor's CUDA-graph code (torch 2.13's source: check_for_mutation)
        runs without graphs a step that writes inputs neither static nor made by a graph,
        as this step writes the cache, the sampler's state and the positions; the compiled
        step marks them static (_fall_back_if_compiling_fails). Kept buffers also spare the
        copies into the graph's memory (measured on an H200: docs/benchmarks.md, Figures
        behind design choices). Memory: one set of buffers per batch size the predictor
        has decoded."""
        kept = []
        for place, tensor in enumerate(tensors):
            key = (kind, place, tuple(tensor.shape), tensor.dtype, tensor.device)
            if key not in self._buffers:
                self._buffers[key] = torch.empty_like(tensor)
            kept.append(self._buffers[key].copy_(tensor))
        return kept

    def _step_function(self, steps, batch=1):
        """decode_step + choose (+ moving every position on), compiled if
        _compiles(steps, batch), else eager. One function per generate call."""
        def step(byte, cache, positions, sampler, patch_due=None):
            return decode_and_choose(self.model.decode_step, byte, cache, positions, sampler,
                                     patch_due)
        if not self._compiles(steps, batch):
            return step
        if self.device.type in AHEAD_OF_TIME_DEVICE_TYPES:
            return self._ahead_of_time(step)
        if self._compiled_step is None:
            self._compiled_step = self._compile(step)
        return self._fall_back_if_compiling_fails(step)

    def _ahead_of_time(self, eager_step):
        """The step through programs compiled ahead of time, one for each patch_due value
        of the call, bound to the call's tensors (_bind_program). Errors of a compiled
        program while it runs are raised, not hidden behind eager decoding."""
        bound = {}  # patch_due -> the step through its program, for this call's tensors

        def step(byte, cache, positions, sampler, patch_due=None):
            if patch_due not in bound and self._compiled_step is not False:
                try:
                    bound[patch_due] = self._bind_program(byte, cache, positions, sampler,
                                                          patch_due)
                except Exception as error:  # no compiler, or an unsupported platform
                    self._give_up_compiling(error)
            if self._compiled_step is False:
                return eager_step(byte, cache, positions, sampler, patch_due)
            return bound[patch_due](byte)
        return step

    def _program_folder(self):
        return os.path.join(self.config["checkpoint_dir"], PROGRAM_FOLDER)

    def _program_key(self, batch, patch_due):
        """Everything a program for `batch` prompts holds as constants or assumes, as JSON
        values: the torch that compiled it (and with which options), the device type, the
        autocast dtype, the code and the architecture it was compiled from, the shapes
        of the sampler's state, the CPU's vector instructions (load_program does not check
        them: a program built for wider ones than the CPU's could stop the process at its
        first call), and patch_due. Not the weights: they are inputs."""
        return {"torch": str(torch.__version__), "internals": torch_internals_checked(),
                "device_type": self.device.type, "amp_dtype": str(self.amp_dtype),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "code": step_code_digest(), "batch": batch, "patch_due": patch_due,
                "repetition_window": self.config["generation_repetition_window"],
                "architecture": {key: self.model.config.get(key)
                                 for key in keys_with("architecture")}}

    def _bind_program(self, byte, cache, positions, sampler, patch_due):
        """byte -> the next bytes, through the program for this call's tensors: the one
        the predictor holds, else the one kept on disk, else a new one (compiled and kept).
        None (with a warning) if the program assumes other inputs than these."""
        decode = DecodeStepCall(self.model)
        weights = {**dict(decode.named_parameters()), **dict(decode.named_buffers())}
        args = (byte, positions, weights, cache.tensors(), sampler.tensors())
        key = self._program_key(len(byte), patch_due)
        name = program_name(key)
        if name not in self._programs:
            folder = self._program_folder()
            found, problem = read_kept_program(folder, key)
            if problem:
                warnings.warn(f"the compiled decode step kept in {folder} {problem}; "
                              "compiling it again")
            program = StepProgram(decode, cache, sampler, patch_due, self.amp_dtype)
            self._programs[name] = found or keep_program(folder, key, program, args)
            while len(self._programs) > PROGRAMS_KEPT:
                self._programs.popitem(last=False)
        self._programs.move_to_end(name)
        run, spec = self._programs[name]
        inputs = step_inputs(args)
        if spec != input_spec(inputs):
            raise ValueError(f"the compiled decode step {name} was compiled for other inputs "
                             "than this model's (delete it to compile it again)")
        if torch_internals_checked():
            # boxed_run (which empties the list it is given) rather than calling the loaded
            # model, which parses its input and output specs and flattens its arguments at
            # every call (the gain: docs/benchmarks.md, Figures behind design choices)
            boxed_run, rest = run.boxed_run, [tensor for _, tensor in inputs[1:]]
            return lambda new_byte: boxed_run([new_byte, *rest])[0]
        return lambda new_byte: run(new_byte, *args[1:])

    def _give_up_compiling(self, error):
        warnings.warn(f"compiling the decode step failed ({error_summary(error)}); "
                      "generating uncompiled")
        self._compiled_step = False
        self._buffers.clear()  # only a compiled step on a GPU decodes in them

    def _compile(self, step):
        """torch.compile of the step. fullgraph: a graph break, or a step past torch's
        recompile_limit (8 graphs per function in a process: batch sizes, models and
        patch_due together), fails at compile time, so the predictor falls back to eager
        decoding with a warning rather than decoding in pieces or eagerly unnoticed."""
        if self.device.type == "cuda":
            return copying_out(torch.compile(step, fullgraph=True, dynamic=False,
                                             mode="reduce-overhead"))
        # other devices: MPS, and a CPU where AHEAD_OF_TIME_DEVICE_TYPES leaves it out (the
        # tests do)
        options = inductor_options(self.device.type, ahead_of_time=False)
        return torch.compile(step, fullgraph=True, dynamic=False,
                             **({"options": options} if options else {}))

    def _fall_back_if_compiling_fails(self, eager_step):
        """The compiled step, falling back to eager decoding (with a warning) where the
        call's first step with each graph fails: compiling happens there. An error of a
        later step, which may have moved the cache and the sampler on already, is raised
        rather than hidden behind eager decoding of a half-done step."""
        started = set()  # the patch_due values this call has run compiled

        def step(byte, cache, positions, sampler, patch_due=None):
            if self._compiled_step is False:
                return eager_step(byte, cache, positions, sampler, patch_due)
            sampler.every_filter = True  # settings as tensors: one graph serves them all
            # patch_due, a Python bool, gives the parallel stream two graphs: one with the
            # patch stream, one (for most bytes) without
            if patch_due in started:
                return self._compiled_step(byte, cache, positions, sampler, patch_due)
            try:
                if self._buffers:  # CUDA graphs: the step's state in kept buffers
                    import torch._dynamo  # here, not at the top: loading it takes seconds
                    for tensor in [*cache.tensors(), positions, *sampler.tensors()]:
                        torch._dynamo.mark_static_address(tensor)
                chosen = self._compiled_step(byte, cache, positions, sampler, patch_due)
            except Exception as error:  # no compiler, a graph break, the recompile limit
                self._give_up_compiling(error)
                return eager_step(byte, cache, positions, sampler, patch_due)
            started.add(patch_due)
            return chosen
        return step


# ---------------------------------------------------------------------------
# Terminal prompt loop

COMMANDS = {  # command -> (generate() argument, type of its value)
    "/temp": ("temperature", float),
    "/topk": ("top_k", int),
    "/topp": ("top_p", float),
    "/len": ("max_new_bytes", int),
    "/rep": ("repetition_penalty", float),
    "/seed": ("seed", int),
}

HELP = """Type a prompt and press Enter to see its continuation. Commands:
  /temp T   sampling temperature (0 = greedy)
  /topk K   sample among the K most likely bytes (0 = off)
  /topp P   nucleus sampling, P in (0, 1] (1 = off)
  /len N    bytes to generate
  /rep R    repetition penalty (1 = off)
  /seed S   sampling seed (an integer)
  /help     this text and the current settings
  /quit     leave (Ctrl-D too; Ctrl-C stops a continuation, and at the prompt leaves)
"""


def _write_stdout(text):
    sys.stdout.write(text)
    sys.stdout.flush()


def _changed_settings(config, settings, command, argument):
    """`settings` with one command applied; ValueError with a message if it is bad."""
    name, kind = COMMANDS[command]
    try:
        value = kind(argument)
    except ValueError:
        raise ValueError(f"{command} needs a{'n' if kind is int else ''} "
                         f"{kind.__name__}, got {argument!r}") from None
    return generation_settings(config, **{**settings, name: value})


def interactive_loop(predictor, config, input_fn=input, write=_write_stdout):
    """Read prompts and /commands with `input_fn` until /quit, Ctrl-D or Ctrl-C at the
    prompt, streaming each continuation through `write(text)` (which adds no newline);
    Ctrl-C during a continuation stops it and returns to the prompt."""
    if input_fn is input and hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # invalid UTF-8 typed or piped in: U+FFFD
    settings = generation_settings(config)
    write(HELP)
    try:
        while True:
            line = input_fn("> ")
            command, _, argument = line.strip().partition(" ")
            if command == "/quit":
                break
            if command == "/help":
                write(HELP + f"settings: {settings}\n")
            elif command in COMMANDS:
                try:
                    settings = _changed_settings(config, settings, command, argument.strip())
                    write(f"{COMMANDS[command][0]} = {settings[COMMANDS[command][0]]}\n")
                except ValueError as error:
                    write(f"{error}\n")
            elif command.startswith("/"):
                write(f"unknown command {command}; /help lists them\n")
            elif line:
                try:
                    predictor.generate(line, on_text=write, **settings)
                except KeyboardInterrupt:  # stops this generation, not the session
                    write("\n[stopped]")
                write("\n")
    except (EOFError, KeyboardInterrupt):
        write("\n")
