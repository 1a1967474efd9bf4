"""Text generation: sample bytes from a GrugV3 model and stream them as text.

Each step turns the model's logits for the next byte into one byte:
repetition penalty -> valid-UTF-8 mask -> temperature -> top-k -> top-p -> one draw
from a torch.Generator local to the call (the global RNG is never touched: the trainer
relies on it for exact resume).

With the KV cache the prompt is fed in one pass and then one byte per step; without it
every step is a full forward over the context. Both paths see exactly the same bytes
at every step (`window_start`), so with the same seed they produce the same output.
"""

import codecs
import functools
import sys

import torch

from config import RULES

EMPTY_PROMPT = b"\n"  # the model needs at least one input byte; a newline is a neutral start
KEEP_FRACTION = 0.75  # a full window slides to keep this much of it (see window_start)

# generate() argument -> the config key that gives its default
SETTING_KEYS = {
    "max_new_bytes": "generation_max_new_bytes",
    "temperature": "generation_temperature",
    "top_k": "generation_top_k",
    "top_p": "generation_top_p",
    "repetition_penalty": "generation_repetition_penalty",
    "seed": "generation_seed",
}


# ---------------------------------------------------------------------------
# Sampling: each filter takes and returns a (256,) float tensor of logits.

def apply_repetition_penalty(logits, recent_bytes, penalty):
    """CTRL-style: positive logits of recently seen bytes are divided by `penalty`,
    negative ones multiplied, so a penalty > 1 always makes them less likely."""
    if penalty == 1.0 or not recent_bytes:
        return logits
    seen = torch.tensor(sorted(set(recent_bytes)), dtype=torch.long, device=logits.device)
    chosen = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(chosen > 0, chosen / penalty, chosen * penalty)
    return logits


def top_k_filter(logits, k):
    """Keep the k largest logits (0 = off); the others become -inf."""
    if k <= 0 or k >= logits.numel():
        return logits
    kept = torch.topk(logits, k).indices
    filtered = torch.full_like(logits, float("-inf"))
    filtered[kept] = logits[kept]
    return filtered


def top_p_filter(logits, p):
    """Nucleus filter: keep the smallest set of most likely bytes whose probability
    reaches p, always at least the most likely one (1.0 = off)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[0] = False  # the top byte always stays (p may round to 0 in float32)
    drop = torch.zeros_like(drop_sorted)
    drop[order] = drop_sorted
    return logits.masked_fill(drop, float("-inf"))


def sample_byte(logits, temperature, top_k, top_p, generator):
    """One byte from (256,) logits; temperature 0 = greedy (top-k/top-p do not matter),
    and so is a temperature too small to divide by in float32 (say 1e-300)."""
    scaled = logits / temperature if temperature > 0 else None
    if scaled is None or torch.isnan(scaled).any() or torch.isposinf(scaled).any():
        return int(torch.argmax(logits))
    probs = torch.softmax(top_p_filter(top_k_filter(scaled, top_k), top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed):
    """A CPU generator for one generate() call; seed None = different every call."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()  # from the OS, not from the global RNG
    else:
        generator.manual_seed(seed)
    return generator


# ---------------------------------------------------------------------------
# UTF-8 validity. A state is (continuation bytes still expected, lowest allowed
# value of the next byte, highest allowed value); UTF8_START expects a lead byte.

UTF8_START = (0, 0x00, 0x7F)


def utf8_next_state(state, byte):
    """The state after `byte`, or None if `byte` makes the text invalid UTF-8."""
    need, low, high = state
    if need > 0:
        return (need - 1, 0x80, 0xBF) if low <= byte <= high else None
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
def utf8_allowed_bytes(state):
    """(256,) bool: the bytes that keep the text valid UTF-8 after `state`."""
    return torch.tensor([utf8_next_state(state, b) is not None for b in range(256)])


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


class Predictor:
    """Generates text from `model` (already on `device`) with the config's generation_*
    settings as defaults. `use_kv_cache` and `valid_utf8_only` are attributes that can be
    changed after construction; `last_bytes` holds the raw bytes of the last call."""

    def __init__(self, model, device, config, use_kv_cache=None):
        self.model = model
        self.device = torch.device(device)
        self.config = config
        self.use_kv_cache = config["use_kv_cache"] if use_kv_cache is None else use_kv_cache
        self.valid_utf8_only = config["generation_valid_utf8_only"]
        self.last_bytes = b""

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
        settings = generation_settings(
            self.config, max_new_bytes=max_new_bytes, temperature=temperature, top_k=top_k,
            top_p=top_p, repetition_penalty=repetition_penalty, seed=seed)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self._generate(prompt_bytes(prompt), settings, on_text)
        finally:
            self.model.train(was_training)

    def _generate(self, prompt, settings, on_text):
        generator = make_generator(settings["seed"])
        state, tail = utf8_unfinished_tail(prompt)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        decoder.decode(tail)  # so the first generated bytes complete the prompt's character
        pieces = []

        def emit(piece):
            if piece:
                pieces.append(piece)
                if on_text is not None:
                    on_text(piece)

        context = list(prompt)
        start, cache = 0, None
        for _ in range(settings["max_new_bytes"]):
            new_start = window_start(start, len(context), self.model.context_length)
            if self.use_kv_cache and (cache is None or new_start != start):
                cache = self.model.new_cache(1)
            start = new_start
            logits = self._next_logits(context, start, cache)
            byte = self._choose_byte(logits, context, state, settings, generator)
            context.append(byte)
            if self.valid_utf8_only:
                state = utf8_next_state(state, byte)
            emit(decoder.decode(bytes([byte])))

        generated = bytes(context[len(prompt):])
        if self.valid_utf8_only:
            unfinished = min(len(decoder.getstate()[0]), len(generated))
            generated = generated[:len(generated) - unfinished]
        else:
            emit(decoder.decode(b"", final=True))  # a cut character shows as U+FFFD
        self.last_bytes = generated
        return "".join(pieces)

    def _next_logits(self, context, start, cache):
        """(256,) logits for the byte after `context`, the model seeing context[start:].
        A cache is fed only the bytes it has not seen: the whole view when it is new
        (the prompt, or a rebuild after sliding), else the last byte."""
        if cache is None:
            return self.model(self._as_input(context[start:]))[0, -1]
        unseen = context[start + cache.length:]
        return self.model.forward_incremental(self._as_input(unseen), cache)[0, -1]

    def _as_input(self, byte_values):
        return torch.tensor([byte_values], dtype=torch.long, device=self.device)  # (1, n)

    def _choose_byte(self, logits, context, state, settings, generator):
        # sampling runs on the CPU: small, and the byte is needed here anyway
        logits = logits.float().cpu()
        recent = context[-self.config["generation_repetition_window"]:]
        logits = apply_repetition_penalty(logits, recent, settings["repetition_penalty"])
        if self.valid_utf8_only:
            logits = logits.masked_fill(~utf8_allowed_bytes(state), float("-inf"))
        return sample_byte(logits, settings["temperature"], settings["top_k"],
                           settings["top_p"], generator)


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
  /quit     leave (Ctrl-D and Ctrl-C work too)
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
    """Read prompts and /commands with `input_fn` until /quit, Ctrl-D or Ctrl-C,
    streaming each continuation through `write(text)` (which adds no newline)."""
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
                predictor.generate(line, on_text=write, **settings)
                write("\n")
    except (EOFError, KeyboardInterrupt):
        write("\n")
