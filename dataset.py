"""Bytes in, training windows out.

DataProcessor turns a folder of .txt files into one cached uint8 array (a .npy file,
read back memory-mapped); ByteSequenceDataset cuts that array into (input, target)
windows of the train or validation split; BatchOrder says which windows each
micro-batch of training holds.

Cache layout in `processed_data_dir`:
    all_bytes_grug_v3.npy            the byte stream, 1-D uint8
    all_bytes_grug_v3.manifest.json  what it was built from, and the array's fingerprint
                                     (corpus_fingerprint); written last, so an array
                                     without a matching manifest is never trusted
"""

import codecs
import errno
import hashlib
import io
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from stat import S_ISREG

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from config import RULES, keys_with
from utils import (TEMPORARY_PREFIX, ConfigError, UserError, atomic_output, config_problems,
                   remove_stale_temporaries)

PROCESSED_FILENAME = "all_bytes_grug_v3.npy"
MANIFEST_FILENAME = "all_bytes_grug_v3.manifest.json"
DUMMY_FILENAME = "dummy_corpus.txt"
FORMAT_VERSION = 3  # bump when the processing or the manifest changes: old caches get rebuilt
FINGERPRINT_BLOCK = 16 * 2**20  # bytes hashed at a time: memory stays bounded on any corpus
# Read size: blocks that fit in the CPU's cache decode faster than large ones (measured
# against 8 MB blocks: docs/benchmarks.md, Figures behind design choices).
BLOCK_BYTES = 256 * 2**10
DATA_KEYS = keys_with("data")  # the config keys DataProcessor reads (config.KEY_ROLES)


def _warn(message):
    print(f"warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------
# Train / validation split

def split_point(num_bytes, val_split_ratio, val_split_max_bytes=None):
    """Index of the first validation byte: train = data[:split], val = data[split:], the
    last val_split_ratio of the bytes, or val_split_max_bytes where that is fewer."""
    split = int(num_bytes * (1 - val_split_ratio))
    return split if val_split_max_bytes is None else max(split, num_bytes - val_split_max_bytes)


def split_problems(c):
    """Cross-key rule: a capped validation split must hold one window. Then a corpus has
    enough bytes with the cap exactly when it has without it: min_bytes_needed ignores it."""
    cap, length = c.get("val_split_max_bytes"), c.get("sequence_length")
    if cap is not None and length is not None and cap < length + 1:
        return [f"`val_split_max_bytes` ({cap}) is less than one window (sequence_length + "
                f"1 = {length + 1} bytes)"]
    return []


def min_bytes_needed(sequence_length, val_split_ratio):
    """Smallest corpus whose train and validation spans each hold one window
    (sequence_length + 1 bytes: inputs plus the shifted targets)."""
    window = sequence_length + 1

    def enough(n):
        split = split_point(n, val_split_ratio)
        return split >= window and n - split >= window

    # Both spans only grow with n, so the answer is the first n that is enough.
    too_few = 2 * window - 1
    plenty = max(math.ceil(window / val_split_ratio),
                 math.ceil((window + 1) / (1 - val_split_ratio))) + 2
    while not enough(plenty):  # guards the float estimate above
        plenty *= 2
    while plenty - too_few > 1:
        middle = (too_few + plenty) // 2
        too_few, plenty = (too_few, middle) if enough(middle) else (middle, plenty)
    return plenty


def check_enough_data(n_bytes, config):
    """Raise UserError unless train and validation each get at least one window."""
    length, ratio = config["sequence_length"], config["val_split_ratio"]
    needed = min_bytes_needed(length, ratio)
    if n_bytes >= needed:
        return
    split = split_point(n_bytes, ratio, config["val_split_max_bytes"])
    raise UserError(
        f"not enough data: found {n_bytes:,} bytes, but sequence_length={length} with "
        f"val_split_ratio={ratio} needs at least {needed:,} bytes (train and validation "
        f"must each hold one window of sequence_length + 1 = {length + 1} bytes; this "
        f"corpus gives train {split:,} and validation {n_bytes - split:,} bytes). "
        f"Add more .txt files or lower sequence_length.")


# ---------------------------------------------------------------------------
# Building the byte array

# Invalid UTF-8 under "replace" and "keep": the decoder calls this handler once per bad
# sequence, so counting costs nothing on valid text. Codecs look handlers up by name,
# hence the module-level counter.
_invalid_sequences_seen = 0


def _replace_and_count(error):
    global _invalid_sequences_seen
    _invalid_sequences_seen += 1
    return "\ufffd", error.end


_COUNTING_HANDLER = "grug_v3_replace_and_count"
codecs.register_error(_COUNTING_HANDLER, _replace_and_count)


class _InvalidUtf8(Exception):
    def __init__(self, offset):
        super().__init__(offset)
        self.offset = offset  # byte offset of the first bad sequence in the file


def _append_source(path, out, policy):
    """Append one file to `out` in blocks; return how many invalid UTF-8 sequences it held.
    Under "skip" and "error" the first bad sequence raises _InvalidUtf8 instead."""
    strict = policy in ("skip", "error")
    decoder = codecs.getincrementaldecoder("utf-8")("strict" if strict else _COUNTING_HANDLER)
    seen_before = _invalid_sequences_seen
    read = 0
    with _readable(path) as source:
        while True:
            block = _read_block(source, path)
            # The decoder holds back a character split by the block edge until the next block.
            held = len(decoder.getstate()[0])
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as error:
                raise _InvalidUtf8(read - held + error.start) from None
            out.write(text.encode("utf-8") if policy == "replace" else block)
            read += len(block)
            if not block:
                return _invalid_sequences_seen - seen_before


class UnreadableSource(UserError):
    def __init__(self, path, error):
        super().__init__(f"{path}: cannot read this data file ({error.strerror or error}); "
                         f"it vanished or is not readable. Fix or remove it, then run again.")


def _readable(path):
    try:
        return open(path, "rb")
    except OSError as error:
        raise UnreadableSource(path, error) from None


def _read_block(source, path):
    try:
        return source.read(BLOCK_BYTES)
    except OSError as error:
        raise UnreadableSource(path, error) from None


def _npy_header(num_bytes):
    """The .npy header of a 1-D uint8 array. numpy pads it so the shape can grow to 21
    digits, so its length does not depend on num_bytes: the placeholder written first
    is overwritten in place once the length is known."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "|u1", "fortran_order": False, "shape": (num_bytes,)})
    return buffer.getvalue()


def scan_sources(data_dir, hash_contents=False):
    """{relative path: [size, mtime_ns(, content hash)]} of every .txt file under
    data_dir, recursively and through symlinked folders (a folder met twice, as in a
    symlink loop, is read once), sorted by relative path (POSIX separators) so the order
    is the same everywhere. A data_dir that is a .txt file is a corpus of one file."""
    if data_dir.is_file():
        names = [data_dir.name]
        data_dir = data_dir.parent
    else:
        names, seen = [], set()
        for folder, subfolders, files in os.walk(data_dir, followlinks=True):
            stat = os.stat(folder)
            if (stat.st_dev, stat.st_ino) in seen:
                _warn(f"{folder}: a folder already read (a symlink loop?), skipped")
                subfolders.clear()
                continue
            seen.add((stat.st_dev, stat.st_ino))
            relative = Path(folder).relative_to(data_dir)
            names += [(relative / name).as_posix() for name in files
                      if name.lower().endswith(".txt") and not name.startswith(TEMPORARY_PREFIX)]
    found = {}
    for name in names:
        try:
            stat = (data_dir / name).stat()
        except OSError:  # vanished since the listing, or a dangling link: not a source
            continue
        if not S_ISREG(stat.st_mode):
            continue
        found[name] = [stat.st_size, stat.st_mtime_ns]
        if hash_contents:
            found[name].append(_content_hash(data_dir / name))
    return dict(sorted(found.items()))


def _content_hash(path):
    with _readable(path) as file:
        try:
            return hashlib.file_digest(file, "blake2b").hexdigest()
        except OSError as error:
            raise UnreadableSource(path, error) from None


def _read_manifest(path):
    """The manifest as a dict, or None when missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as file:
            manifest = json.load(file)
    except (OSError, ValueError):
        return None
    needed = ("format_version", "options", "files", "num_bytes")
    return manifest if isinstance(manifest, dict) and all(k in manifest for k in needed) else None


def _write_manifest(path, manifest):
    with atomic_output(path) as file:
        file.write(json.dumps(manifest, indent=1, ensure_ascii=False).encode("utf-8"))


def _changed_files(old, new):
    """'1 file(s) added (c.txt); 1 file(s) modified (a.txt)', or '' when nothing changed."""
    groups = {"added": [p for p in new if p not in old],
              "removed": [p for p in old if p not in new],
              "modified": [p for p in new if p in old and old[p] != new[p]]}
    parts = []
    for what, paths in groups.items():
        if paths:
            names = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
            parts.append(f"{len(paths)} file(s) {what} ({names})")
    return "; ".join(parts)


class DataProcessor:
    """Builds (or reuses) the cached byte array of every .txt file under data_dir.
    `create_missing_data_dir`: a missing data_dir is created (the default folder on a
    first run) rather than an error (a mistyped path). `for_training`: the array must
    hold a training and a validation window (a text to evaluate need not)."""

    def __init__(self, config, create_missing_data_dir=False, for_training=True):
        problems = config_problems(config, RULES, DATA_KEYS)
        if problems:
            raise ConfigError(problems)
        self.config, self.create_missing = config, create_missing_data_dir
        self.for_training = for_training
        self.data_dir = Path(config["data_dir"])
        self.root = self.data_dir.parent if self.data_dir.is_file() else self.data_dir
        self.processed_dir = Path(config["processed_data_dir"])
        self.array_path = self.processed_dir / PROCESSED_FILENAME
        self.manifest_path = self.processed_dir / MANIFEST_FILENAME
        self.policy = config["utf8_error_policy"]

    def prepare(self):
        """Build the cache if needed; return the bytes as a read-only 1-D uint8 memmap."""
        for folder in (self.processed_dir, self.root):
            freed = remove_stale_temporaries(folder)
            if freed:
                print(f"data: removed {freed / 1e6:.1f} MB of temporary files left in "
                      f"{folder} by an interrupted run")
        wanted = {"format_version": FORMAT_VERSION, "options": self._options(),
                  "files": self._sources()}
        cached = _read_manifest(self.manifest_path)
        reason = self._stale_reason(wanted, cached)
        if reason is None:
            data = self._open(cached["num_bytes"])
            if data is not None:
                print(f"data: reusing cache {self.array_path} ({cached['num_bytes']:,} bytes "
                      f"from {len(cached['files'])} file(s); sources and options unchanged"
                      f"{self._invalid_remark(cached)})")
                return self._checked(data)
            _warn(f"{self.array_path} is unreadable (a damaged header?); rebuilding it")
            reason = "cached array is damaged"
        print(f"data: rebuilding cache {self.array_path} ({reason})")
        num_bytes = self._rebuild(wanted)
        return self._checked(self._open(num_bytes))

    def _open(self, num_bytes):
        """The cached array memory-mapped, or None when it is not the array it should be."""
        try:
            data = np.load(self.array_path, mmap_mode="r")
        except (OSError, ValueError, EOFError):
            return None
        if data.ndim != 1 or data.dtype != np.uint8 or len(data) != num_bytes:
            return None
        return data

    def _checked(self, data):
        if self.for_training:
            check_enough_data(len(data), self.config)
        return data

    def manifest(self):
        """What the cache was built from (after prepare): its "files", "spans" {file:
        [start, end) of its bytes in the array}, "invalid_utf8" counts, "skipped" files and
        "corpus", the array's corpus_fingerprint: computed once, when the array is written,
        and as valid as the array (a start reads it here rather than every byte again)."""
        return _read_manifest(self.manifest_path)

    def _options(self):
        return {"data_dir": str(self.data_dir.resolve()),
                "file_separator": self.config["file_separator"],
                "utf8_error_policy": self.policy,
                "data_change_detection": self.config["data_change_detection"]}

    def _sources(self):
        """The .txt files to read, after writing the demo corpus into an existing but
        empty folder."""
        if not self.data_dir.exists():
            if not self.create_missing:
                raise UserError(f"data_dir {self.data_dir} does not exist: check the path (a "
                                f".txt file or a folder of them), or create the folder")
            self.data_dir.mkdir(parents=True)
        elif self.data_dir.is_file() and self.data_dir.suffix.lower() != ".txt":
            raise UserError(f"data_dir {self.data_dir} is a file but not a .txt file: give a "
                            f".txt file or a folder of them")
        by_content = self.config["data_change_detection"] == "content"
        sources = scan_sources(self.data_dir, by_content)
        if not sources and not self.for_training:
            raise UserError(f"no readable .txt files in {self.data_dir}: nothing to evaluate")
        if not sources:
            if not self.config["generate_dummy_data_if_empty"]:
                raise UserError(
                    f"no .txt files in {self.data_dir}: put your training text there as "
                    f".txt files (subfolders are searched too), or set "
                    f"generate_dummy_data_if_empty=True to train on a generated demo corpus")
            with atomic_output(self.data_dir / DUMMY_FILENAME) as file:
                file.write(dummy_corpus_text().encode("utf-8"))
            print(f"data: no .txt files in {self.data_dir}; wrote a generated demo corpus")
            sources = scan_sources(self.data_dir, by_content)
        if DUMMY_FILENAME in sources:
            print(f"data: USING DUMMY DATA: {self.root / DUMMY_FILENAME} is a generated "
                  f"demo corpus. To train on real text, put .txt files in {self.root} "
                  f"and delete {DUMMY_FILENAME}.")
        return sources

    def _stale_reason(self, wanted, cached):
        """Why the cache cannot be reused, or None when it can."""
        if self.config["force_reprocess_data"]:
            return "force_reprocess_data is set"
        if cached is None:
            return "no cache yet"
        if cached["format_version"] != wanted["format_version"]:
            return "cache format changed"
        for key, value in wanted["options"].items():
            if cached["options"].get(key) != value:
                return f"`{key}` changed"
        changes = _changed_files(cached["files"], wanted["files"])
        if changes:
            return changes
        expected_size = len(_npy_header(0)) + cached["num_bytes"]
        if not self.array_path.is_file() or self.array_path.stat().st_size != expected_size:
            return "cached array is missing or has the wrong size"
        return None

    def _rebuild(self, wanted):
        # Without a manifest nothing is trusted, whatever happens until the new one lands.
        self.manifest_path.unlink(missing_ok=True)
        started = time.perf_counter()
        try:
            num_bytes, spans, invalid, skipped = self._write_array(wanted["files"])
            corpus = corpus_fingerprint(self._open(num_bytes))
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            needed = sum(entry[0] for entry in wanted["files"].values()) / 1e6
            raise UserError(f"cannot write {self.array_path}: the disk is full (about "
                            f"{needed:.0f} MB needed). Free some space or set "
                            f"processed_data_dir to another disk.") from None
        _write_manifest(self.manifest_path, {**wanted, "num_bytes": num_bytes, "spans": spans,
                                             "invalid_utf8": invalid, "skipped": skipped,
                                             "corpus": corpus})
        seconds = time.perf_counter() - started
        print(f"data: wrote {num_bytes:,} bytes in {seconds:.1f} s")
        return num_bytes

    def _write_array(self, sources):
        """Stream every source into the .npy file. Returns (num_bytes, {file: [start, end)
        of its bytes in the array}, {file: invalid sequences}, [skipped files])."""
        separator = self.config["file_separator"].encode("utf-8")
        header = _npy_header(0)
        spans, invalid, skipped = {}, {}, []
        with atomic_output(self.array_path) as out:
            out.write(header)
            for name in sources:
                path = self.root / name
                if sources[name][0] == 0:
                    _warn(f"{path}: empty file, skipped")
                    continue
                start = out.tell()
                if spans:
                    out.write(separator)
                count = self._append(path, out)
                if count is None:  # skipped for invalid UTF-8
                    out.seek(start)
                    out.truncate()
                    skipped.append(name)
                    continue
                spans[name] = [start + (len(separator) if spans else 0) - len(header),
                               out.tell() - len(header)]
                if count:
                    invalid[name] = count
                    done = {"replace": "replaced with U+FFFD", "keep": "kept as raw bytes"}
                    _warn(f"{path}: {count} invalid UTF-8 sequence(s) {done[self.policy]}")
            num_bytes = out.tell() - len(header)
            if num_bytes == 0:
                advice = "add text to train on" if self.for_training else "nothing to evaluate"
                raise UserError(f"the .txt files in {self.data_dir} hold no bytes (all empty "
                                f"or skipped): {advice}")
            out.seek(0)
            final_header = _npy_header(num_bytes)
            assert len(final_header) == len(header), "the .npy header changed length"
            out.write(final_header)
        return num_bytes, spans, invalid, skipped

    def _append(self, path, out):
        """Append one source; its count of invalid UTF-8 sequences, or None if skipped."""
        try:
            return _append_source(path, out, self.policy)
        except _InvalidUtf8 as error:
            if self.policy == "error":
                raise UserError(f"{path}: invalid UTF-8 at byte offset {error.offset} "
                                f"(utf8_error_policy='error'). Fix the file, or set "
                                f"utf8_error_policy to 'replace', 'skip' or 'keep'.") from None
            _warn(f"{path}: skipped (utf8_error_policy='skip'), invalid UTF-8 at byte offset "
                  f"{error.offset}")
            return None

    def _invalid_remark(self, cached):
        bad = len(cached.get("invalid_utf8", {})) + len(cached.get("skipped", []))
        if not bad:
            return ""
        return (f"; {bad} file(s) had invalid UTF-8, handled by policy {self.policy!r} "
                f"and listed in {self.manifest_path}")


def corpus_fingerprint(data):
    """{"bytes", "blake2b"} of a byte array (the processed corpus): which text a checkpoint
    was trained on, so that a resume on another text is noticed. Every byte counts: an
    edited file changes it too."""
    digest = hashlib.blake2b(digest_size=16)
    if _maps_whole_file(data):  # read the file, not the map: as ByteSequenceDataset._windows
        with open(data.filename, "rb") as file:
            file.seek(data.offset)
            for _ in range(0, len(data), FINGERPRINT_BLOCK):
                digest.update(file.read(FINGERPRINT_BLOCK))
    else:
        for start in range(0, len(data), FINGERPRINT_BLOCK):
            digest.update(np.ascontiguousarray(data[start:start + FINGERPRINT_BLOCK]))
    return {"bytes": int(len(data)), "blake2b": digest.hexdigest()}


# ---------------------------------------------------------------------------
# Demo corpus, written when data_dir holds no .txt files

_WORDS = {
    "adjective": ["small", "old", "happy", "green", "quiet", "brave", "naïve", "clever",
                  "sleepy", "tiny", "loud", "kind"],
    "noun": ["cat", "dog", "bird", "child", "teacher", "farmer", "robot", "baker", "fox",
             "fiancée", "sailor", "owl"],
    "verb": ["sees", "follows", "helps", "finds", "likes", "paints", "visits", "greets"],
    "place": ["in the garden", "near the river", "at the café", "in München", "in Zürich",
              "in 東京", "on the hill", "by the sea", "in the old house", "under the bridge"],
    "food": ["apples", "bread", "cheese", "crème brûlée", "jalapeños", "rice", "tea",
             "tofu", "noodles", "milk", "eggs", "pâté"],
    "emoji": ["🙂", "🐱", "🌧", "☀", "🍎", "✨"],
    "number": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
               "nine", "ten", "eleven", "twelve"],
}


def _pick(rng, kind):
    return rng.choice(_WORDS[kind])


def _a(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def _sentence(rng):
    return (f"The {_pick(rng, 'adjective')} {_pick(rng, 'noun')} {_pick(rng, 'verb')} the "
            f"{_pick(rng, 'adjective')} {_pick(rng, 'noun')} {_pick(rng, 'place')}.")


def _arithmetic(rng):
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return rng.choice([f"{a} + {b} = {a + b}.", f"{a} × {b} = {a * b}.",
                       f"{max(a, b)} - {min(a, b)} = {max(a, b) - min(a, b)}."])


def _dialogue(rng):
    noun, place = _pick(rng, "noun"), _pick(rng, "place")
    a, b = rng.randint(0, 9), rng.randint(0, 3)
    return rng.choice([
        f"Q: Where is the {noun}?\nA: The {noun} is {place}.",
        f"Q: What is {_WORDS['number'][a]} plus {_WORDS['number'][b]}?\n"
        f"A: {_WORDS['number'][a].capitalize()} plus {_WORDS['number'][b]} is "
        f"{_WORDS['number'][a + b]}.",
        f"Q: What does the {noun} eat?\nA: The {noun} eats {_pick(rng, 'food')}."])


def _shopping_list(rng):
    items = rng.sample(_WORDS["food"], rng.randint(2, 5))
    cents = rng.randint(100, 5000)
    return f"Shopping list: {', '.join(items)} — total €{cents // 100}.{cents % 100:02d}"


def _story(rng):
    noun, other = _pick(rng, "noun"), _pick(rng, "noun")
    return (f"Once upon a time, {_a(_pick(rng, 'adjective'))} {noun} lived "
            f"{_pick(rng, 'place')}. Every day the {noun} {_pick(rng, 'verb')} {_a(other)}. "
            f"The end. {_pick(rng, 'emoji')}")


def _counting(rng):
    start = rng.randint(1, 40)
    return "Counting: " + ", ".join(str(n) for n in range(start, start + rng.randint(3, 8))) + "."


def dummy_corpus_text(target_bytes=3_000_000, seed=1234):
    """A deterministic demo corpus a small model visibly learns within minutes: templated
    sentences, arithmetic, question/answer pairs, lists, counting and short stories, with
    multi-byte characters (é, ü, —, €, ×, 東京, emoji) so the model meets them too."""
    rng = random.Random(seed)
    writers = [_sentence, _arithmetic, _dialogue, _shopping_list, _story, _counting]
    paragraphs, size = [], 0
    while size < target_bytes:
        write = rng.choice(writers)
        paragraph = "\n".join(write(rng) for _ in range(rng.randint(2, 5)))
        paragraphs.append(paragraph)
        size += len(paragraph.encode("utf-8")) + 2
    return "\n\n".join(paragraphs) + "\n"


# ---------------------------------------------------------------------------
# Training windows

class ByteSequenceDataset(Dataset):
    """(input, target) windows of one split of a 1-D uint8 array.

    The split is contiguous: with split = split_point(len(data), val_split_ratio,
    val_split_max_bytes), train is data[:split] and val is data[split:]. Window i of a
    span starts at s = i * stride and uses T + 1 bytes: x = span[s:s+T], y =
    span[s+1:s+T+1]. No window reaches past its span, so no training window sees a
    validation byte and vice versa."""

    def __init__(self, data, sequence_length, stride, split, val_split_ratio,
                 val_split_max_bytes=None):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if data.ndim != 1 or data.dtype != np.uint8:
            raise ValueError(f"data must be a 1-D uint8 array, got {data.ndim}-D {data.dtype}")
        arguments = {"sequence_length": sequence_length, "data_stride": stride,
                     "val_split_ratio": val_split_ratio, "val_split_max_bytes": val_split_max_bytes}
        problems = config_problems(arguments, RULES, tuple(arguments), (split_problems,))
        if problems:
            raise ValueError("; ".join(problems))
        boundary = split_point(len(data), val_split_ratio, val_split_max_bytes)
        self.data = data
        # A memory-mapped file: windows are read from it, not through the map (_windows).
        readable = _maps_whole_file(data) and hasattr(os, "pread")  # pread: not on Windows
        self._file = (data.filename, data.offset) if readable else None
        self._descriptor = None  # opened at the first read, in the process that reads
        train = split == "train"
        self.span_start, self.span_end = (0, boundary) if train else (boundary, len(data))
        self.sequence_length, self.stride, self.split = sequence_length, stride, split
        self._offsets = np.arange(sequence_length + 1)  # (T+1,) byte offsets in a window

    @property
    def num_bytes(self):
        """Bytes in this split's span."""
        return self.span_end - self.span_start

    def __len__(self):
        spare = self.num_bytes - (self.sequence_length + 1)
        return spare // self.stride + 1 if spare >= 0 else 0

    def window_starts(self, indices):
        """Index in `data` (not in the span) of the first byte of each window in `indices`."""
        return self._starts(indices)

    def __getitem__(self, i):
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, indices):
        """Windows `indices` as (x, y), each (B, T) int64, gathered at once (_windows).
        torch's DataLoader calls this with the whole batch of indices."""
        windows = torch.from_numpy(self._windows(self._starts(indices)).astype(np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def _windows(self, starts):
        """(B, T+1) uint8: the windows at `starts`. Those of a memory-mapped file are read
        with pread: read through the map, a run's random windows would map the corpus
        into the process page by page (the kernel maps each page's neighbours with it),
        and its resident memory would grow to the corpus's size."""
        if self._file is None:
            return self.data[starts[:, None] + self._offsets]
        if self._descriptor is None:
            self._descriptor = os.open(self._file[0], os.O_RDONLY)
        size, offset = self.sequence_length + 1, self._file[1]
        read = b"".join(os.pread(self._descriptor, size, offset + start)
                        for start in starts.tolist())
        return np.frombuffer(read, dtype=np.uint8).reshape(len(starts), size)

    def __del__(self):
        if getattr(self, "_descriptor", None) is not None:
            os.close(self._descriptor)

    def _starts(self, indices):
        """Absolute start of each window index; negative indices count from the end."""
        indices = np.asarray(indices, dtype=np.int64)
        count = len(self)
        if indices.size and (indices.min() < -count or indices.max() >= count):
            raise IndexError(f"window index out of range: the {self.split} split has "
                             f"{count} windows")
        return self.span_start + np.where(indices < 0, indices + count, indices) * self.stride

    # Pickling a memmap copies every byte into the pickle; DataLoader workers started
    # with "spawn" (macOS, Windows) reopen the file instead.
    def __getstate__(self):
        state = {**self.__dict__, "_descriptor": None}
        if _maps_whole_file(self.data):
            state["data"] = ("memmap", self.data.filename, self.data.offset, len(self.data))
        return state

    def __setstate__(self, state):
        if isinstance(state["data"], tuple):
            _, filename, offset, length = state["data"]
            state["data"] = np.memmap(filename, dtype=np.uint8, mode="r", offset=offset,
                                      shape=(length,))
        self.__dict__.update(state)


def _maps_whole_file(data):
    """True for a memmap of a file's whole payload (a slice keeps its parent's offset,
    so it cannot be reopened from filename and offset alone)."""
    if not isinstance(data, np.memmap) or not data.filename:
        return False
    try:
        return data.offset + data.nbytes == os.path.getsize(data.filename)
    except OSError:
        return False


# ---------------------------------------------------------------------------
# Data order: which windows each micro-batch of training holds

class SeededPermutation:
    """A pseudo-random bijection of 0 .. n-1, computed for any positions on demand (a
    4-round Feistel network over the next even power of two, cycle-walking back into
    range), so its memory does not grow with n: a 10 GB corpus costs what a 1 KB one does."""

    MULTIPLIERS = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9))

    def __init__(self, n, seed):
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = [np.uint64(k) for k in
                     np.random.SeedSequence(seed).generate_state(4, dtype=np.uint64)]

    def _round(self, right, key):
        z = (right + key) * self.MULTIPLIERS[0]  # uint64 arithmetic wraps around
        z ^= z >> np.uint64(29)
        z *= self.MULTIPLIERS[1]
        return (z ^ (z >> np.uint64(32))) & self.mask

    def _encrypt(self, x):
        half = np.uint64(self.half)
        left, right = x >> half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._round(right, key)
        return (left << half) | right

    def __call__(self, positions):
        x = np.asarray(positions, dtype=np.uint64).copy()
        outside = np.ones(x.shape, dtype=bool)
        while outside.any():  # each pass lands at least 1/4 of the rest in range
            x[outside] = self._encrypt(x[outside])
            outside = x >= np.uint64(self.n)
        return x.astype(np.int64)


class BatchOrder:
    """Which windows every micro-batch holds, and where training stands in them.

    Each epoch is a fresh permutation of the training windows (from the seed), cut into
    global micro-batches of batch_size x world_size windows; rank r takes the r-th share
    of each, so 2 ranks of batch B see the same windows as 1 rank of batch 2B. A step
    takes `accumulation` micro-batches and the epoch ends when fewer are left. The
    position (epoch, micro_batch) is all a resume needs."""

    def __init__(self, num_windows, batch_size, accumulation, seed, rank=0, world_size=1):
        self.num_windows, self.batch_size, self.seed = num_windows, batch_size, seed
        self.accumulation, self.rank, self.world_size = accumulation, rank, world_size
        self.steps_per_epoch = num_windows // (batch_size * world_size) // accumulation
        self.micro_batches_per_epoch = self.steps_per_epoch * accumulation
        self.epoch, self.micro_batch = 0, 0  # the next micro-batch to train on
        self.epoch_of_last_step = 1  # 1-based, for the logs

    def micro_batches(self, epoch, first):
        """Window indices of this rank's micro-batches from (epoch, first) on, forever."""
        global_batch = self.batch_size * self.world_size
        while True:
            permutation = SeededPermutation(self.num_windows, self.seed * 1_000_003 + epoch)
            for k in range(first, self.micro_batches_per_epoch):
                start = k * global_batch + self.rank * self.batch_size
                yield permutation(np.arange(start, start + self.batch_size)).tolist()
            epoch, first = epoch + 1, 0

    def loader(self, dataset, num_workers=0, pin_memory=False):
        """An iterator over this rank's micro-batches (x, y) of `dataset`, from the current
        position on, across epochs; num_workers > 0 gathers them in background processes."""
        order = self.micro_batches(self.epoch, self.micro_batch)
        # A private generator: the loader must not draw from the global RNG.
        return iter(DataLoader(dataset, batch_sampler=order, collate_fn=_identity,
                               num_workers=num_workers, pin_memory=pin_memory,
                               generator=torch.Generator().manual_seed(self.seed)))

    def advance(self):
        """Count one optimizer step's micro-batches; True when that ended an epoch."""
        self.epoch_of_last_step = self.epoch + 1
        self.micro_batch += self.accumulation
        if self.micro_batch < self.micro_batches_per_epoch:
            return False
        self.epoch, self.micro_batch = self.epoch + 1, 0
        return True

    def state_dict(self):
        # In windows, so a run resumed with another rank count starts at the same data.
        return {"epoch": self.epoch, "batch_in_epoch": self.micro_batch,
                "windows_in_epoch": self.micro_batch * self.batch_size * self.world_size}

    def load_state_dict(self, state, log):
        windows_per_batch = self.batch_size * self.world_size
        self.epoch = state["epoch"]
        self.micro_batch = state["windows_in_epoch"] // windows_per_batch
        if state["windows_in_epoch"] % windows_per_batch:
            log(f"note: the checkpoint stopped {state['windows_in_epoch']} windows into the "
                f"epoch, not a multiple of this run's {windows_per_batch} per micro-batch; "
                f"continuing from micro-batch {self.micro_batch}")


def _identity(batch):
    return batch  # the dataset's __getitems__ already returns the batch as (x, y)
