"""The ground floor every module stands on; it imports nothing from the project.

- errors a user can fix (UserError, ConfigError),
- Rule: what one config key accepts; config.py declares one per key, and every check,
  the command-line parser and --help read those declarations,
- runtime helpers: seeding, device and autocast choice, atomic file writes, units,
- the distributed (torchrun) context.
"""

import ast
import contextlib
import csv
import datetime
import difflib
import functools
import io
import math
import os
import random
import re
import socket
import tempfile
import time

import numpy as np
import torch

# The low 32 bits: the counter-based hashes (sampling noise in predictor.py, n-gram buckets
# in model_components.py) keep their values below 2**32 in int64 tensors, so every product
# stays below 2**63 on every device.
MASK32 = 0xFFFFFFFF


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
# Rules: the type, range, choices and nullability of one config key

class Rule:
    """What one key accepts. `kind` is bool, int, float, str or list (of `item`);
    low/high bound numbers and list items (open = the bound itself is excluded);
    `choices` lists the allowed strings; `check(value)` returns a problem or None."""

    def __init__(self, kind, low=None, high=None, low_open=False, high_open=False,
                 choices=None, nullable=False, item=None, check=None):
        self.kind, self.item = kind, item
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open
        self.choices = tuple(choices) if choices is not None else None
        self.nullable, self.check = nullable, check

    def problem(self, key, value):
        """Why `value` is not acceptable for `key`, or None."""
        if value is None:
            return None if self.nullable else f"`{key}` must not be None"
        if not _has_kind(value, self.kind):
            return f"`{key}` must be {self.kind.__name__}, got {type(value).__name__} ({value!r})"
        if self.kind is list:
            if not all(_has_kind(v, self.item) for v in value):
                return f"`{key}` must be a list of {self.item.__name__}, got {value!r}"
            if self.low is not None and any(self._out_of_range(v) for v in value):
                bound = f"{'>' if self.low_open else '>='} {self.low}"
                return f"every item of `{key}` must be {bound}, got {value!r}"
            return None
        if self.choices is not None and value not in self.choices:
            return f"`{key}` = {value!r} is not one of {', '.join(map(repr, self.choices))}"
        if self.kind in (int, float) and self._out_of_range(value):
            return f"`{key}` = {value!r} is out of range: must be in {self._bounds()}"
        if self.kind is float and not math.isfinite(value):
            return f"`{key}` = {value!r} must be a finite number"
        return self.check(value) if self.check else None

    def _out_of_range(self, value):
        too_low = self.low is not None and (value <= self.low if self.low_open
                                            else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open
                                              else value > self.high)
        return too_low or too_high

    def _bounds(self):
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        low = "-inf" if self.low is None else self.low
        high = "inf" if self.high is None else self.high
        return f"{left}{low}, {high}{right}"

    def describe(self):
        """A short human description for --help, e.g. "int >= 1" or "None or float"."""
        if self.choices is not None:
            text = "one of " + ", ".join(map(repr, self.choices))
        elif self.kind is list:
            text = f"list of {self.item.__name__}"
        elif self.kind in (int, float) and (self.low is not None or self.high is not None):
            text = f"{self.kind.__name__} in {self._bounds()}"
        else:
            text = self.kind.__name__
        return f"None or {text}" if self.nullable else text

    def parse(self, key, text):
        """The value of `--key=text`; ConfigError if it cannot be read as this kind."""
        if text in ("None", "none", "null"):
            return None
        if self.kind is str:
            return text
        if self.kind is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ConfigError([f"`--{key}` expects True or False, got {text!r}"])
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            article = "an" if self.kind is int else "a"
            raise ConfigError([f"`--{key}` expects {article} {self.kind.__name__}, "
                               f"got {text!r}"]) from None


def _has_kind(value, kind):
    """isinstance, except that bools are not ints and ints are accepted as floats."""
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def integer(low=None, high=None, nullable=False):
    return Rule(int, low, high, nullable=nullable)


def real(low=None, high=None, low_open=False, high_open=False, nullable=False):
    return Rule(float, low, high, low_open, high_open, nullable=nullable)


def flag():
    return Rule(bool)


def text(nullable=False, check=None):
    return Rule(str, nullable=nullable, check=check)


def one_of(*choices):
    return Rule(str, choices=choices)


def list_of(item, low=None):
    return Rule(list, low=low, item=item)


def config_problems(config, rules, keys=None, cross_checks=()):
    """Every problem in `config`'s values of `keys` (default: every key of `rules`),
    then the cross-key rules, which see only the keys whose own values are valid."""
    problems, valid = [], {}
    for key in rules if keys is None else keys:
        if key not in config:
            problems.append(f"missing key `{key}`")
            continue
        problem = rules[key].problem(key, config[key])
        if problem:
            problems.append(problem)
        else:
            valid[key] = config[key]
    for cross_check in cross_checks:
        problems.extend(cross_check(valid))
    return problems


def suggestion(key, known):
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


# ---------------------------------------------------------------------------
# Command line: --key=value overrides and --help

def apply_overrides(argv, config, flags, rules, switches_known):
    """Apply `--key=value` (or `--key value`) arguments to copies of `config` and `flags`.

    `switches_known` maps the program's own options (not config keys) to None for a bare
    switch such as --interactive, or to a placeholder such as "PATH" for one that takes
    a value. Returns (config, flags, switches, problems): `switches` maps each given
    option to True or its value; problems lists every argument that could not be
    applied, so the caller reports them with the config's own problems."""
    config, flags = dict(config), dict(flags)
    switches, problems = {}, []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            problems.append(f"unexpected argument {arg!r}: options look like --key=value")
            continue
        key, has_value, value_text = arg[2:].partition("=")
        bare_switch = key in switches_known and switches_known[key] is None
        if bare_switch and not has_value:
            switches[key] = True
            continue
        if not has_value:
            if not args or args[0].startswith("--"):
                placeholder = switches_known.get(key) or "VALUE"
                problems.append(f"`--{key}` needs a value: --{key}={placeholder}")
                continue
            value_text = args.pop(0)
        if key in switches_known:
            if bare_switch:
                problems.append(f"`--{key}` takes no value")
            else:
                switches[key] = value_text
            continue
        target = flags if key in flags else config
        if key not in target:
            known = list(config) + list(flags) + sorted(switches_known)
            problems.append(f"unknown option `--{key}`{suggestion(key, known)}")
            continue
        rule = rules.get(key) or flag()  # the stage flags are booleans
        try:
            target[key] = rule.parse(key, value_text)
        except ConfigError as error:
            problems.extend(error.problems)
    for name, value in flags.items():
        if not isinstance(value, bool):
            problems.append(f"`{name}` must be True or False, got {value!r}")
    return config, flags, switches, problems


def config_comments(config_module_path, names):
    """{key: its one-line comment} read from config.py's source."""
    comments = {}
    with open(config_module_path, encoding="utf-8") as source:
        for line in source:
            code, hash_sign, comment = line.strip().partition("#")
            name = code.split(":")[0].split("=")[0].strip().strip('"')
            if hash_sign and name in names and name not in comments:
                comments[name] = comment.strip()
    return comments


# ---------------------------------------------------------------------------
# Runtime

# The oldest torch release the project runs on, and what each newer-than-2.0 API it uses
# needs (README lists them for users). Checked once at start-up by main.py, so an
# old torch is a message that names both versions, not an AttributeError at import.
TORCH_FLOOR = (2, 9)
TORCH_FEATURES = (
    ("torch.optim.Muon", "2.9", "the Muon optimizer (optimizer_type=\"Muon\")"),
    ("torch.nn.utils.get_total_norm", "2.6", "the gradient norm"),
)  # also torch._inductor.aoti_compile_and_package (2.6): not looked up here, since that
# import alone takes seconds; the floor covers it.
# The torch releases whose private compiler details the project was checked against:
# inductor option names (predictor.CPU_STEP_INDUCTOR_OPTIONS) and the ahead-of-time
# runner (predictor.load_program builds it, boxed_run calls it). A private name can
# change meaning or vanish in any release, silently; on other releases the predictor uses
# public APIs only (slower, never wrong).
TORCH_INTERNALS_CHECKED = ((2, 13),)


def torch_release(version=None):
    """(major, minor) of the installed torch, or of `version` (a string such as
    "2.4.1+cpu"); (0, 0) if it cannot be read."""
    match = re.match(r"(\d+)\.(\d+)", str(torch.__version__ if version is None else version))
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def torch_internals_checked(version=None):
    """Whether the installed torch (or `version`) is a release in TORCH_INTERNALS_CHECKED."""
    return torch_release(version) in TORCH_INTERNALS_CHECKED


def torch_problem(version=None):
    """Why the installed torch (or `version`, a string such as "2.4.1+cpu") cannot run
    the project, or None."""
    version = str(torch.__version__ if version is None else version)
    found = torch_release(version)
    floor = ".".join(map(str, TORCH_FLOOR))
    if found < TORCH_FLOOR:
        return (f"GrugV3 needs torch {floor} or newer (requirements.txt); this is torch "
                f"{version}. Upgrade it: python3 -m pip install -r requirements.txt")
    missing = [f"{path} ({purpose}, torch {release}+)" for path, release, purpose
               in TORCH_FEATURES if not _has_attribute_path(path)]
    if missing:
        return (f"this torch {version} lacks what GrugV3 uses: {'; '.join(missing)}. "
                f"Install a full torch {floor} or newer: python3 -m pip install -r "
                f"requirements.txt")
    return None


def _has_attribute_path(path):
    """Whether `path`, such as "torch.optim.Muon", names something in imported modules."""
    value = torch
    for name in path.split(".")[1:]:
        value = getattr(value, name, None)
        if value is None:
            return False
    return True


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device_problem(name):
    """Why `name` is not a device this program understands, or None."""
    kind, _, index = name.partition(":")
    if name in ("auto", "cpu", "cuda", "mps") or (kind == "cuda" and index.isdigit()):
        return None
    return (f"`device` = {name!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N' (N = a GPU "
            f"number such as 0) or 'mps'")


def resolve_device(name):
    """"auto" picks cuda, then mps, then cpu; an explicit name must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    problem = device_problem(name)
    if problem:
        raise UserError(problem)
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"`device` is {name!r} but CUDA is not available here; "
                            f"use \"auto\" or \"cpu\"")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"`device` is {name!r} but this machine has "
                            f"{torch.cuda.device_count()} GPU(s), numbered from 0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"`device` is {name!r} but MPS is not available here; use \"auto\"")
    return device


def resolve_amp_dtype(config, device):
    """The autocast dtype the config asks for on this machine, or None when AMP is off
    (fp32). "auto": bf16 on GPUs that have it (else fp16), and on CPUs with bf16 units;
    fp32 on other CPUs (AVX2-only x86, most laptops), where bf16 is far slower. Decided
    from what the hardware is, never from a timing, so every process on one machine
    decides alike; a training run takes rank 0's choice (run_precision)."""
    if not config["use_amp"]:
        return None
    choice = config["amp_dtype"]
    if choice == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu":
            return torch.bfloat16 if cpu_has_bf16_units() else None
        return torch.bfloat16  # MPS
    return PRECISION_DTYPES[choice]


# The names a run's precision is printed and recorded by; None = fp32, no autocast.
PRECISION_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def precision_name(dtype):
    return next(name for name, known in PRECISION_DTYPES.items() if known == dtype)


def run_precision(config, device):
    """The autocast dtype of a training run: rank 0's resolve_amp_dtype, taken by every
    rank, so the replicas of a data-parallel job compute alike even on unlike machines."""
    names = list(PRECISION_DTYPES)
    mine = names.index(precision_name(resolve_amp_dtype(config, device)))
    return PRECISION_DTYPES[names[int(agree_across_ranks([mine], "first", device)[0])]]


BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=None)
def cpu_has_bf16_units(cpuinfo="/proc/cpuinfo"):
    """Whether this CPU has bf16 matrix instructions (x86: AVX-512 BF16 or AMX), read from
    the flags the kernel reports. Not timed: a timing in a fresh process measured its cold
    start and the machine's load as much as the CPU, and gave different answers in two
    processes of one run. Other platforms answer False (fp32); amp_dtype="bfloat16"
    forces bf16 anywhere."""
    with contextlib.suppress(OSError):
        with open(cpuinfo, encoding="utf-8", errors="replace") as file:
            for line in file:
                if line.startswith("flags"):
                    return bool(BF16_CPU_FLAGS & set(line.partition(":")[2].split()))
    return False


def autocast_context(device, dtype):
    """Autocast to `dtype` on `device`'s type, or nothing when dtype is None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def profiled(name):
    """A torch.profiler range named `name` around the code inside (bench.py's training
    profile reads its phases from them); none inside torch.compile, which drops such
    ranges with a warning at every compile."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.profiler.record_function(name)


def synchronize(device):
    """Wait for queued GPU work, so wall-clock timings include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bits_per_byte(nats):
    """Cross-entropy in nats per byte -> bits per byte."""
    return nats / math.log(2)


def error_summary(error):
    """"Type: first line of the message", for a one-line message about an error (a failed
    compile, an unreadable checkpoint)."""
    message = str(error).strip()
    return f"{type(error).__name__}: {message.splitlines()[0] if message else ''}"


# ---------------------------------------------------------------------------
# Files

TEMPORARY_PREFIX = ".tmp_"


def _temporary_prefix():
    """Temporaries carry host and pid, so a later run can tell which writer is gone."""
    return f"{TEMPORARY_PREFIX}{socket.gethostname()}_{os.getpid()}_"


@contextlib.contextmanager
def atomic_output(path):
    """Open a temporary file beside `path` for binary writing; on success flush,
    fsync and rename it over `path`. On any error the old `path` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(dir=folder, prefix=_temporary_prefix(),
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


def move_aside(path, stamp=None):
    """Rename `path` to `{name}_before_{stamp}{extension}` beside it (stamp: the time, by
    default), never over an existing file; returns the new path. What a fresh run does
    with an earlier run's files: they are kept, out of its way."""
    stamp = stamp or time.strftime("%Y%m%d_%H%M%S")
    root, extension = os.path.splitext(path)
    aside, count = f"{root}_before_{stamp}{extension}", 1
    while os.path.exists(aside):
        count += 1
        aside = f"{root}_before_{stamp}_{count}{extension}"
    os.rename(path, aside)
    return aside


def read_log_columns(path, key="step"):
    """(columns, unreadable) of a CSV log such as metrics.csv: {name: [string of each row]}
    in the header's order, of the rows whose `key` is a whole number; `unreadable` counts
    the rows left out (a garbled row, and a last line without its newline, which a killed
    writer left half-written). A short row's missing cells read as "", a long row's extra
    cells are ignored (csv.DictReader's reading). Bytes that are not UTF-8 read as U+FFFD."""
    with open(path, newline="", encoding="utf-8", errors="replace") as file:
        text = file.read()
    complete = text[:text.rfind("\n") + 1]  # "" when no line is complete
    half_written = int(complete != text)
    header, cells, rows = _log_cells(complete)
    columns = {name: cells[i::len(header)] for i, name in enumerate(header)}
    if key not in columns:
        return {name: [] for name in columns}, rows + half_written
    if not all(map(str.isdigit, columns[key])):  # garbled rows: keep the others
        kept = [i for i, value in enumerate(columns[key]) if value.isdigit()]
        columns = {name: [column[i] for i in kept] for name, column in columns.items()}
    return columns, rows - len(columns[key]) + half_written


def _log_cells(text):
    """(header, cells, rows) of complete CSV lines: the cells of the rows after the header
    in one list, each row cut or padded with "" to the header's width; blank lines skipped."""
    if text.count("\r") == text.count("\r\n"):  # no \r but in csv.writer's line ends
        text = text.replace("\r\n", "\n")
    lines = text.split("\n")[:-1]
    if not lines:
        return [], [], 0
    header = lines[0].split(",")
    if ('"' in text or "\r" in text or len(header) == 1
            or not all(line.count(",") == len(header) - 1 for line in lines)):
        # Quoted cells, other line ends, rows of other widths: the csv module's rules.
        table = list(csv.reader(io.StringIO(text)))
        header, rows, width = table[0], [row for row in table[1:] if row], len(table[0])
        return header, [cell for row in rows for cell in (row + [""] * width)[:width]], len(rows)
    # What csv reads too, without a list for each row (a long run logs millions of rows):
    # every line has the header's width, so the rows' cells are one split away.
    body = text[len(lines[0]) + 1:-1]
    return header, body.replace("\n", ",").split(",") if body else [], len(lines) - 1


def read_log_rows(path, key="step"):
    """The rows of read_log_columns as dicts of strings, and how many were unreadable."""
    columns, unreadable = read_log_columns(path, key)
    return [dict(zip(columns, values)) for values in zip(*columns.values())], unreadable


def remove_stale_temporaries(folder):
    """Delete the temporaries of atomic_output in `folder` whose writer is no longer
    running on this host (a killed write leaves one behind). Returns the bytes freed."""
    freed = 0
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for name in os.listdir(folder):
            if name.startswith(TEMPORARY_PREFIX) and _writer_is_gone(name):
                path = os.path.join(folder, name)
                with contextlib.suppress(OSError):
                    size = os.path.getsize(path)
                    os.remove(path)
                    freed += size
    return freed


def _writer_is_gone(name):
    host, _, rest = name[len(TEMPORARY_PREFIX):].partition("_")
    pid = rest.partition("_")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's, or not ours: leave it
    return not process_is_running(int(pid))


def process_is_running(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


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


def available_memory_bytes(device):
    """Free memory of `device` (GPU: free device memory; CPU: MemAvailable), or None."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


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


def agree_across_ranks(values, op="max", device=None):
    """`values` (numbers) combined over every rank of a torchrun job: "max", or "first"
    (rank 0's). Without a process group, the values themselves."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if op == "max":
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    else:
        torch.distributed.broadcast(tensor, src=0)
    return tensor.tolist()
