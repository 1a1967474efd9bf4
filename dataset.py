"""Bytes in, training windows out.

DataProcessor turns a folder of .txt files into one cached uint8 array (a .npy file,
read back memory-mapped); ByteSequenceDataset cuts that array into (input, target)
windows of the train or validation split.

Cache layout in `processed_data_dir`:
    all_bytes_grug_v3.npy            the byte stream, 1-D uint8
    all_bytes_grug_v3.manifest.json  what it was built from; written last, so an array
                                     without a matching manifest is never trusted
"""

import codecs
import io
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from config import RULES
from utils import ConfigError, UserError, atomic_output, config_problems

PROCESSED_FILENAME = "all_bytes_grug_v3.npy"
MANIFEST_FILENAME = "all_bytes_grug_v3.manifest.json"
DUMMY_FILENAME = "dummy_corpus.txt"
FORMAT_VERSION = 1  # bump when the processing itself changes, so old caches get rebuilt
BLOCK_BYTES = 256 * 2**10  # read size: blocks that fit in cache decode ~3x faster than 8 MB ones
# The config keys DataProcessor reads.
DATA_KEYS = ("data_dir", "processed_data_dir", "generate_dummy_data_if_empty",
             "force_reprocess_data", "file_separator", "utf8_error_policy", "sequence_length",
             "val_split_ratio")


def _warn(message):
    print(f"warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------
# Train / validation split

def split_point(num_bytes, val_split_ratio):
    """Index of the first validation byte: train = data[:split], val = data[split:]."""
    return int(num_bytes * (1 - val_split_ratio))


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
    split = split_point(n_bytes, ratio)
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
    with open(path, "rb") as source:
        while True:
            block = source.read(BLOCK_BYTES)
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


def _npy_header(num_bytes):
    """The .npy header of a 1-D uint8 array. numpy pads it so the shape can grow to 21
    digits, so its length does not depend on num_bytes: the placeholder written first
    is overwritten in place once the length is known."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "|u1", "fortran_order": False, "shape": (num_bytes,)})
    return buffer.getvalue()


def _scan_sources(data_dir):
    """{relative path: [size, mtime_ns]} of every .txt file under data_dir, recursively,
    sorted by relative path (POSIX separators) so the order is the same everywhere."""
    found = {}
    for path in data_dir.rglob("*"):
        if path.suffix.lower() == ".txt" and path.is_file():
            stat = path.stat()
            found[path.relative_to(data_dir).as_posix()] = [stat.st_size, stat.st_mtime_ns]
    return dict(sorted(found.items()))


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
    """Builds (or reuses) the cached byte array of every .txt file under data_dir."""

    def __init__(self, config):
        problems = config_problems(config, RULES, DATA_KEYS)
        if problems:
            raise ConfigError(problems)
        self.config = config
        self.data_dir = Path(config["data_dir"])
        self.array_path = Path(config["processed_data_dir"]) / PROCESSED_FILENAME
        self.manifest_path = Path(config["processed_data_dir"]) / MANIFEST_FILENAME
        self.policy = config["utf8_error_policy"]

    def prepare(self):
        """Build the cache if needed; return the bytes as a read-only 1-D uint8 memmap."""
        wanted = {"format_version": FORMAT_VERSION, "options": self._options(),
                  "files": self._sources()}
        cached = _read_manifest(self.manifest_path)
        reason = self._stale_reason(wanted, cached)
        if reason is None:
            print(f"data: reusing cache {self.array_path} ({cached['num_bytes']:,} bytes from "
                  f"{len(cached['files'])} file(s); sources and options unchanged"
                  f"{self._invalid_remark(cached)})")
        else:
            print(f"data: rebuilding cache {self.array_path} ({reason})")
            self._rebuild(wanted)
        data = np.load(self.array_path, mmap_mode="r")
        check_enough_data(len(data), self.config)
        return data

    def _options(self):
        return {"data_dir": str(self.data_dir.resolve()),
                "file_separator": self.config["file_separator"],
                "utf8_error_policy": self.policy}

    def _sources(self):
        """The .txt files to read, after writing the demo corpus if there are none."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        sources = _scan_sources(self.data_dir)
        if not sources:
            if not self.config["generate_dummy_data_if_empty"]:
                raise UserError(
                    f"no .txt files in {self.data_dir}: put your training text there as "
                    f".txt files (subfolders are searched too), or set "
                    f"generate_dummy_data_if_empty=True to train on a generated demo corpus")
            with atomic_output(self.data_dir / DUMMY_FILENAME) as file:
                file.write(dummy_corpus_text().encode("utf-8"))
            print(f"data: no .txt files in {self.data_dir}; wrote a generated demo corpus")
            sources = _scan_sources(self.data_dir)
        if DUMMY_FILENAME in sources:
            print(f"data: USING DUMMY DATA: {self.data_dir / DUMMY_FILENAME} is a generated "
                  f"demo corpus. To train on real text, put .txt files in {self.data_dir} "
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
        num_bytes, invalid, skipped = self._write_array(wanted["files"])
        _write_manifest(self.manifest_path, {**wanted, "num_bytes": num_bytes,
                                             "invalid_utf8": invalid, "skipped": skipped})
        seconds = time.perf_counter() - started
        print(f"data: wrote {num_bytes:,} bytes in {seconds:.1f} s")

    def _write_array(self, sources):
        """Stream every source into the .npy file. Returns (num_bytes, {file: invalid
        sequences}, [skipped files])."""
        separator = self.config["file_separator"].encode("utf-8")
        header = _npy_header(0)
        invalid, skipped, wrote_a_file = {}, [], False
        with atomic_output(self.array_path) as out:
            out.write(header)
            for name in sources:
                path = self.data_dir / name
                if sources[name][0] == 0:
                    _warn(f"{path}: empty file, skipped")
                    continue
                start = out.tell()
                if wrote_a_file:
                    out.write(separator)
                try:
                    count = _append_source(path, out, self.policy)
                except _InvalidUtf8 as error:
                    if self.policy == "error":
                        raise UserError(
                            f"{path}: invalid UTF-8 at byte offset {error.offset} "
                            f"(utf8_error_policy='error'). Fix the file, or set "
                            f"utf8_error_policy to 'replace', 'skip' or 'keep'.") from None
                    out.seek(start)
                    out.truncate()
                    skipped.append(name)
                    _warn(f"{path}: skipped (utf8_error_policy='skip'), invalid UTF-8 at "
                          f"byte offset {error.offset}")
                    continue
                if count:
                    invalid[name] = count
                    done = {"replace": "replaced with U+FFFD", "keep": "kept as raw bytes"}
                    _warn(f"{path}: {count} invalid UTF-8 sequence(s) {done[self.policy]}")
                wrote_a_file = True
            num_bytes = out.tell() - len(header)
            if num_bytes == 0:
                raise UserError(f"the .txt files in {self.data_dir} hold no bytes (all empty "
                                f"or skipped): add text to train on")
            out.seek(0)
            final_header = _npy_header(num_bytes)
            assert len(final_header) == len(header), "the .npy header changed length"
            out.write(final_header)
        return num_bytes, invalid, skipped

    def _invalid_remark(self, cached):
        bad = len(cached.get("invalid_utf8", {})) + len(cached.get("skipped", []))
        if not bad:
            return ""
        return (f"; {bad} file(s) had invalid UTF-8, handled by policy {self.policy!r} "
                f"and listed in {self.manifest_path}")


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

    The split is contiguous: with split = int(len(data) * (1 - val_split_ratio)), train is
    data[:split] and val is data[split:]. Window i of a span starts at s = i * stride and
    uses T + 1 bytes: x = span[s:s+T], y = span[s+1:s+T+1]. No window reaches past its
    span, so no training window sees a validation byte and vice versa."""

    def __init__(self, data, sequence_length, stride, split, val_split_ratio):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if data.ndim != 1 or data.dtype != np.uint8:
            raise ValueError(f"data must be a 1-D uint8 array, got {data.ndim}-D {data.dtype}")
        problems = config_problems({"sequence_length": sequence_length, "data_stride": stride,
                                    "val_split_ratio": val_split_ratio}, RULES,
                                   ("sequence_length", "data_stride", "val_split_ratio"))
        if problems:
            raise ValueError("; ".join(problems))
        boundary = split_point(len(data), val_split_ratio)
        self.data = data
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
        """Windows `indices` as (x, y), each (B, T) int64, gathered in one fancy index.
        torch's DataLoader calls this with the whole batch of indices."""
        starts = self._starts(indices)  # (B,)
        windows = self.data[starts[:, None] + self._offsets]  # (B, T+1) uint8
        windows = torch.from_numpy(windows.astype(np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

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
        state = self.__dict__.copy()
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
