"""Small helpers shared by every stage: config checking, command-line overrides,
seeding, device choice, atomic file writes and unit conversion."""

import ast
import contextlib
import difflib
import math
import os
import random
import tempfile

import numpy as np
import torch

from model import structure_problems


class UserError(Exception):
    """A problem the user can fix (bad config, missing data, bad checkpoint).
    main.py prints its message without a traceback and exits non-zero."""


class ConfigError(UserError):
    """Every problem found in a config, reported at once."""

    def __init__(self, problems):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the configuration:\n{lines}")


# ---------------------------------------------------------------------------
# Config schema: the type of each key comes from its default in config.py;
# these tables add what a default cannot say.

NULLABLE_KEYS = {
    "resume_from_checkpoint", "max_steps", "max_train_minutes", "lr_scheduler_T_max",
    "clip_grad_norm_value", "eval_max_batches", "generation_seed",
}

CHOICES = {
    "utf8_error_policy": ("replace", "skip", "error", "keep"),
    "cnn_activation": ("gelu", "relu"),
    "positional_encoding_type": ("sinusoidal", "learnable"),
    "training_objective": ("all_positions", "last_byte"),
    "optimizer_type": ("AdamW", "Adam"),
    "scheduler_type": ("CosineAnnealingLR", "ReduceLROnPlateau", "constant"),
    "amp_dtype": ("auto", "bfloat16", "float16"),
}

# (lowest, highest, lowest included, highest included); None = unbounded.
RANGES = {
    **{k: (1, None, True, True) for k in (
        "sequence_length", "data_stride", "batch_size", "embedding_dim", "attention_d_model",
        "attention_num_heads", "ffn_dim_multiply", "num_attention_layers",
        "num_byte_stream_layers", "num_agg_stream_layers", "agg_cnn_kernel_size",
        "agg_cnn_stride", "agg_cnn_out_dim", "max_positional_encoding_len", "num_epochs",
        "max_steps", "gradient_accumulation_steps", "print_every", "metrics_every",
        "validate_and_checkpoint_best_every_batches", "checkpoint_every_batches",
        "keep_last_checkpoints", "eval_max_batches", "interim_test_max_new_bytes",
        "generation_repetition_window", "profiler_schedule_active", "profiler_schedule_repeat",
        "lr_scheduler_T_max")},
    **{k: (0, None, True, True) for k in (
        "num_workers", "test_every_batches", "lr_warmup_steps", "generation_top_k",
        "interim_test_top_k", "profiler_schedule_wait", "profiler_schedule_warmup",
        "generation_max_new_bytes", "lr_scheduler_patience", "weight_decay",
        "lr_scheduler_eta_min", "generation_temperature", "interim_test_temperature",
        "generation_seed", "seed")},
    **{k: (0, 1, True, False) for k in (
        "cnn_dropout", "pe_dropout", "transformer_dropout", "output_dropout",
        "adam_beta1", "adam_beta2")},
    "val_split_ratio": (0, 1, False, False),
    "lr_scheduler_factor": (0, 1, False, False),
    "lr_warmup_init_factor": (0, 1, False, True),
    "generation_top_p": (0, 1, False, True),
    "learning_rate": (0, None, False, True),
    "adam_eps": (0, None, False, True),
    "clip_grad_norm_value": (0, None, False, True),
    "max_train_minutes": (0, None, False, True),
    "generation_repetition_penalty": (0, None, False, True),
    "distributed_timeout_minutes": (0, None, False, True),
}

LIST_ITEM_TYPES = {
    "cnn_out_channels_list": int, "cnn_kernel_sizes": int, "generation_prompts": str,
}


def _type_name(value):
    return type(value).__name__


def _has_type(value, default):
    """True if `value` fits the type of `default` (ints are accepted for floats)."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, type(default))


def _expected_type(key, defaults):
    """The default of `key`, or a stand-in of the right type for nullable keys."""
    default = defaults[key]
    if default is None:
        return {"resume_from_checkpoint": "", "max_steps": 0, "max_train_minutes": 0.0,
                "lr_scheduler_T_max": 0, "clip_grad_norm_value": 0.0,
                "eval_max_batches": 0, "generation_seed": 0}[key]
    return default


def _range_problem(key, value):
    low, high, low_inclusive, high_inclusive = RANGES[key]
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if not (too_low or too_high):
        return None
    left = "[" if low_inclusive else "("
    right = "]" if high_inclusive else ")"
    bounds = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    return f"`{key}` = {value!r} is out of range: must be in {bounds}"


def _suggestion(key, known):
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def config_problems(config, defaults):
    """Every problem in `config`, checked against the keys and types of `defaults`."""
    problems = []
    for key in config:
        if key not in defaults:
            problems.append(f"unknown key `{key}`{_suggestion(key, list(defaults))}")
    for key in defaults:
        if key not in config:
            problems.append(f"missing key `{key}` (default: {defaults[key]!r})")

    well_typed = {}
    for key, value in config.items():
        if key not in defaults:
            continue
        if value is None:
            if key in NULLABLE_KEYS:
                well_typed[key] = value
            else:
                problems.append(f"`{key}` must not be None")
            continue
        expected = _expected_type(key, defaults)
        if not _has_type(value, expected):
            problems.append(f"`{key}` must be {_type_name(expected)}, got "
                            f"{_type_name(value)} ({value!r})")
            continue
        item_type = LIST_ITEM_TYPES.get(key)
        if item_type and not all(isinstance(v, item_type) and not isinstance(v, bool)
                                 for v in value):
            problems.append(f"`{key}` must be a list of {item_type.__name__}, got {value!r}")
            continue
        well_typed[key] = value

    valid = {}  # well typed, in range and among the choices
    for key, value in well_typed.items():
        before = len(problems)
        if key in CHOICES and value is not None and value not in CHOICES[key]:
            options = ", ".join(repr(c) for c in CHOICES[key])
            problems.append(f"`{key}` = {value!r} is not one of {options}")
        if key in RANGES and value is not None:
            problem = _range_problem(key, value)
            if problem:
                problems.append(problem)
        if len(problems) == before:
            valid[key] = value
        # Still "valid" after this: the cross-key rules only read the lists' lengths.
        if key in ("cnn_out_channels_list", "cnn_kernel_sizes") and value and min(value) < 1:
            problems.append(f"`{key}` must hold positive integers, got {value!r}")
    problems.extend(_consistency_problems(valid))
    return problems


def _consistency_problems(c):
    """Rules that tie several keys together. Only valid keys reach here."""
    problems = []

    def has(*keys):
        return all(c.get(k) is not None for k in keys)

    problems.extend(structure_problems(c))  # the model's own rules, one definition
    if has("sequence_length", "agg_cnn_stride") and c["sequence_length"] < c["agg_cnn_stride"]:
        problems.append(f"`sequence_length` ({c['sequence_length']}) must be at least "
                        f"`agg_cnn_stride` ({c['agg_cnn_stride']})")
    if has("lr_scheduler_eta_min", "learning_rate") \
            and c["lr_scheduler_eta_min"] > c["learning_rate"]:
        problems.append(f"`lr_scheduler_eta_min` ({c['lr_scheduler_eta_min']}) is above "
                        f"`learning_rate` ({c['learning_rate']})")
    if has("amp_dtype", "device") and c["amp_dtype"] == "float16" and c["device"] == "cpu" \
            and c.get("use_amp"):
        problems.append("`amp_dtype` float16 is not supported on the CPU: use \"bfloat16\" "
                        "or \"auto\"")
    return problems


def validate_config(config, defaults):
    """Raise ConfigError listing every problem in `config`, or return it unchanged."""
    problems = config_problems(config, defaults)
    if problems:
        raise ConfigError(problems)
    return config


# ---------------------------------------------------------------------------
# Command line: --key=value overrides, type-checked against the defaults.

def parse_value(key, text, default):
    """Turn the text of `--key=text` into a value of the default's type."""
    if text in ("None", "none", "null"):
        return None
    if isinstance(default, str):
        return text
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError([f"`--{key}` expects True or False, got {text!r}"])
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if default is None:  # nullable string keys such as resume_from_checkpoint
            return text
        raise ConfigError([f"`--{key}` expects a {_type_name(default)}, got {text!r}"])


def apply_overrides(argv, config, flags):
    """Apply `--key=value` (or `--key value`) arguments to copies of `config` and `flags`.

    Returns (config, flags, switches, problems): switches are the bare options this
    program knows (such as --interactive); problems lists every argument that could not be
    applied, so the caller can report them together with the config's own problems."""
    config, flags = dict(config), dict(flags)
    switches, problems = set(), []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            problems.append(f"unexpected argument {arg!r}: options look like --key=value")
            continue
        key, has_value, text = arg[2:].partition("=")
        if key in BARE_SWITCHES and not has_value:
            switches.add(key)
            continue
        if not has_value:
            if not args or args[0].startswith("--"):
                problems.append(f"`--{key}` needs a value: --{key}=VALUE")
                continue
            text = args.pop(0)
        target = flags if key in flags else config
        if key not in target:
            known = list(config) + list(flags) + sorted(BARE_SWITCHES)
            problems.append(f"unknown option `--{key}`{_suggestion(key, known)}")
            continue
        try:
            target[key] = parse_value(key, text, target[key])
        except ConfigError as error:
            problems.extend(error.problems)
    for name, value in flags.items():
        if not isinstance(value, bool):
            problems.append(f"`{name}` must be True or False, got {value!r}")
    return config, flags, switches, problems


BARE_SWITCHES = {"help", "interactive"}


def config_help(config_module_path, defaults, flags):
    """The --help text: every key with its default and the comment from config.py."""
    comments = {}
    with open(config_module_path, encoding="utf-8") as source:
        for line in source:
            stripped = line.strip()
            if "#" not in stripped:
                continue
            code, _, comment = stripped.partition("#")
            name = code.split(":")[0].split("=")[0].strip().strip('"')
            if name in defaults or name in flags:
                comments[name] = comment.strip()
    lines = ["usage: python3 main.py [--KEY=VALUE ...] [--interactive] [--help]", "",
             "Every key of CONFIG_V3 in config.py can be overridden for one run.",
             "  --interactive  after training (if any), open a prompt loop for generation", ""]
    for name, value in list(flags.items()) + list(defaults.items()):
        lines.append(f"  --{name}={value!r}")
        if comments.get(name):
            lines.append(f"        {comments[name]}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Runtime

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name):
    """"auto" picks cuda, then mps, then cpu; an explicit name must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"`device` is {name!r} but CUDA is not available here; "
                        f"use \"auto\" or \"cpu\"")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"`device` is {name!r} but MPS is not available here; use \"auto\"")
    return device


def resolve_amp_dtype(config, device):
    """The autocast dtype for this run, or None when AMP is off."""
    if not config["use_amp"]:
        return None
    choice = config["amp_dtype"]
    if choice == "auto":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[choice]


def autocast_context(device, dtype):
    """Autocast to `dtype` on `device`'s type, or nothing when dtype is None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def synchronize(device):
    """Wait for queued GPU work, so wall-clock timings include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def atomic_output(path):
    """Open a temporary file beside `path` for binary writing; on success flush,
    fsync and rename it over `path`. On any error the old `path` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(dir=folder, prefix=".tmp_",
                                         suffix="_" + os.path.basename(path))
    os.chmod(temp_path, 0o666 & ~_current_umask())  # mkstemp's 0600 would hide the file
    try:
        with os.fdopen(handle, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp_path)
        raise
    _fsync_folder(folder)


def _current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder):
    """Make the rename itself durable (not possible on every platform)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def bits_per_byte(nats):
    """Cross-entropy in nats per byte -> bits per byte."""
    return nats / math.log(2)


# ---------------------------------------------------------------------------
# Distributed (torchrun) context

class DistributedContext:
    """Who this process is. A plain `python3 main.py` is rank 0 of 1, no process group."""

    def __init__(self, rank=0, local_rank=0, world_size=1, device=None):
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.device = device  # None: let the config's `device` decide
        self.is_main = rank == 0

    def barrier(self):
        if self.world_size > 1:
            torch.distributed.barrier()

    def close(self):
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def setup_distributed(config):
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL and one
    GPU per rank on CUDA, gloo on CPU. Collectives time out instead of hanging forever."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    import datetime
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and config["device"] in ("auto", "cuda")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    timeout = datetime.timedelta(minutes=config["distributed_timeout_minutes"])
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo",
                                         timeout=timeout)
    return DistributedContext(rank, local_rank, world_size, device)
