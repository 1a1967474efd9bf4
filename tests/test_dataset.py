"""DataProcessor (folder of .txt -> cached byte array) and ByteSequenceDataset (windows)."""

import json
import os
import pickle
import re
import socket

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import dataset
import main as main_module
from tests.conftest import make_tiny_config
from dataset import (BatchOrder, ByteSequenceDataset, DataProcessor, check_enough_data,
                     min_bytes_needed, split_point)
from utils import ConfigError, UserError

BAD = b"ok\xff\xfe bad \xe2\x82"  # two invalid bytes, then a sequence cut off at the end
BAD_REPLACED = "ok\ufffd\ufffd bad \ufffd".encode()


def make_config(tmp_path, **overrides):
    # A window of 2 bytes and a 50/50 split: four bytes are enough, so tiny corpora work.
    small = dict(file_separator="|", sequence_length=1, val_split_ratio=0.5)
    return make_tiny_config(str(tmp_path), **{**small, **overrides})


def write(tmp_path, name, content):
    path = tmp_path / "data" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def prepare(config):
    return DataProcessor(config).prepare()


def array_path(tmp_path):
    return tmp_path / "processed" / dataset.PROCESSED_FILENAME


def manifest_path(tmp_path):
    return tmp_path / "processed" / dataset.MANIFEST_FILENAME


# ---------------------------------------------------------------------------
# Processing

def test_files_are_joined_in_sorted_path_order_with_the_separator(tmp_path):
    write(tmp_path, "b.txt", "bee")
    write(tmp_path, "a.txt", "ay")
    write(tmp_path, "b/a.txt", "b-slash-a")  # "b.txt" < "b/a.txt": '.' sorts before '/'
    write(tmp_path, "sub/deeper/d.txt", "dé")
    write(tmp_path, "sub/c.txt", "sea")
    write(tmp_path, "notes.md", "not a .txt file")
    data = prepare(make_config(tmp_path, file_separator="—\n"))
    assert bytes(data) == "—\n".join(["ay", "bee", "b-slash-a", "sea", "dé"]).encode()
    assert isinstance(data, np.memmap) and data.dtype == np.uint8 and data.ndim == 1
    assert not data.flags.writeable


def test_empty_files_are_skipped_with_a_warning(tmp_path, capsys):
    write(tmp_path, "a.txt", "one")
    write(tmp_path, "b.txt", "")
    write(tmp_path, "c.txt", "three")
    assert bytes(prepare(make_config(tmp_path))) == b"one|three"
    assert re.search(r"warning: .*b\.txt: empty file", capsys.readouterr().err)


def test_a_corpus_of_zero_bytes_is_an_error(tmp_path):
    write(tmp_path, "a.txt", "")
    with pytest.raises(UserError, match="no bytes"):
        prepare(make_config(tmp_path))
    assert not manifest_path(tmp_path).exists() and not array_path(tmp_path).exists()


@pytest.mark.parametrize("policy, expected, warning", [
    ("replace", b"Aa|" + BAD_REPLACED + b"|Cc",
     r"bad\.txt: 3 invalid UTF-8 sequence\(s\) replaced"),
    ("keep", b"Aa|" + BAD + b"|Cc", r"bad\.txt: 3 invalid UTF-8 sequence\(s\) kept as raw bytes"),
    ("skip", b"Aa|Cc", r"bad\.txt: skipped .*byte offset 2"),
])
def test_invalid_utf8_policies_transform_and_warn(tmp_path, capsys, policy, expected, warning):
    write(tmp_path, "a.txt", "Aa")
    write(tmp_path, "bad.txt", BAD)
    write(tmp_path, "c.txt", "Cc")
    assert bytes(prepare(make_config(tmp_path, utf8_error_policy=policy))) == expected
    assert re.search("warning: .*" + warning, capsys.readouterr().err)


def test_invalid_utf8_policy_error_names_file_and_offset(tmp_path):
    write(tmp_path, "a.txt", "Aa")
    write(tmp_path, "bad.txt", BAD)
    with pytest.raises(UserError, match=r"bad\.txt: invalid UTF-8 at byte offset 2"):
        prepare(make_config(tmp_path, utf8_error_policy="error"))
    assert not manifest_path(tmp_path).exists()


MIXED = ("héllo €uro 🙂 東京 ".encode() + b"\xff" + "ü".encode() + b"\xf0\x9f" + b"x"
         + "—🙂".encode() + b"\xe2\x82")


@pytest.mark.parametrize("block_bytes", [1, 2, 3, 5])
def test_characters_split_across_read_blocks(tmp_path, monkeypatch, capsys, block_bytes):
    monkeypatch.setattr(dataset, "BLOCK_BYTES", block_bytes)
    write(tmp_path, "valid.txt", "é€🙂東京—ü")
    write(tmp_path, "mixed.txt", MIXED)
    reference = MIXED.decode("utf-8", "replace")
    data = prepare(make_config(tmp_path, force_reprocess_data=True))
    assert bytes(data) == reference.encode() + "|é€🙂東京—ü".encode()
    err = capsys.readouterr().err
    assert f"mixed.txt: {reference.count(chr(0xFFFD))} invalid" in err and "valid.txt" not in err

    data = prepare(make_config(tmp_path, force_reprocess_data=True, utf8_error_policy="keep"))
    assert bytes(data) == MIXED + "|é€🙂東京—ü".encode()
    first_bad = len("héllo €uro 🙂 東京 ".encode())
    with pytest.raises(UserError, match=f"byte offset {first_bad}\\b"):
        prepare(make_config(tmp_path, force_reprocess_data=True, utf8_error_policy="error"))

    # "skip" has already written the good start of mixed.txt when it meets the bad byte.
    data = prepare(make_config(tmp_path, force_reprocess_data=True, utf8_error_policy="skip"))
    assert bytes(data) == "é€🙂東京—ü".encode()
    assert array_path(tmp_path).stat().st_size == len(dataset._npy_header(0)) + len(data)


# ---------------------------------------------------------------------------
# Caching

def test_unchanged_sources_reuse_the_cache(tmp_path, capsys):
    write(tmp_path, "a.txt", "alpha")
    write(tmp_path, "b.txt", "beta")
    prepare(make_config(tmp_path))
    assert "rebuilding" in capsys.readouterr().out
    inode = array_path(tmp_path).stat().st_ino  # a rebuild renames a new file into place
    data = prepare(make_config(tmp_path))
    out = capsys.readouterr().out
    assert "reusing" in out and "rebuilding" not in out
    assert array_path(tmp_path).stat().st_ino == inode
    assert bytes(data) == b"alpha|beta"


def test_the_corpus_fingerprint_is_computed_once_with_the_cache(tmp_path, monkeypatch):
    """Every run records which corpus it trains on. Hashing every byte at every start
    costs a second or more a GB: the fingerprint is computed when the cache is built and
    kept in its manifest, so a start with the cache reads no byte to fingerprint it."""
    import trainer as trainer_module
    config = make_tiny_config(str(tmp_path))
    write(tmp_path, "a.txt", "to be or not to be. " * 100)
    data, corpus = main_module.open_corpus(config)
    assert corpus == dataset.corpus_fingerprint(np.array(data))  # the array's, byte for byte

    def read_every_byte(data):
        raise AssertionError("the corpus was read again to fingerprint it")
    with monkeypatch.context() as patched:
        patched.setattr(dataset, "corpus_fingerprint", read_every_byte)
        patched.setattr(trainer_module, "corpus_fingerprint", read_every_byte)
        data, again = main_module.open_corpus(config)
        trainer = main_module.build_training(config, data, torch.device("cpu"), corpus=again)
    assert again == corpus and trainer.corpus == corpus
    path = write(tmp_path, "a.txt", "to be or not to be? " * 100)  # same size, other bytes
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    _, edited = main_module.open_corpus(config)
    assert edited["bytes"] == corpus["bytes"] and edited != corpus


@pytest.mark.parametrize("policy", ["replace", "skip", "keep"])
def test_the_fingerprint_written_with_the_cache_is_the_arrays(tmp_path, monkeypatch, policy):
    """The manifest's fingerprint is the array's, whatever the policy did to the bytes,
    a file skipped after some of its bytes were written included (blocks of 2 bytes: "ok"
    is out before the invalid bytes)."""
    monkeypatch.setattr(dataset, "BLOCK_BYTES", 2)
    for name, content in (("a.txt", "alpha"), ("b.txt", BAD), ("c.txt", "gamma")):
        write(tmp_path, name, content)
    data, corpus = main_module.open_corpus(make_config(tmp_path, utf8_error_policy=policy))
    assert (bytes(data) == b"alpha|gamma") == (policy == "skip")
    assert corpus == dataset.corpus_fingerprint(np.array(data))


def _modify_same_size(tmp_path):
    path = write(tmp_path, "a.txt", "ALPHA")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    return {}, b"ALPHA|beta", "1 file(s) modified (a.txt)"


def _add_file(tmp_path):
    write(tmp_path, "sub/c.txt", "gamma")
    return {}, b"alpha|beta|gamma", "1 file(s) added (sub/c.txt)"


def _remove_file(tmp_path):
    (tmp_path / "data" / "b.txt").unlink()
    return {}, b"alpha", "1 file(s) removed (b.txt)"


def _change_separator(tmp_path):
    return {"file_separator": "\n"}, b"alpha\nbeta", "`file_separator` changed"


def _change_policy(tmp_path):
    return {"utf8_error_policy": "keep"}, b"alpha|beta", "`utf8_error_policy` changed"


def _force(tmp_path):
    return {"force_reprocess_data": True}, b"alpha|beta", "force_reprocess_data is set"


def _resize_keeping_the_mtime(tmp_path):
    path = tmp_path / "data" / "a.txt"
    stat = path.stat()
    write(tmp_path, "a.txt", "alphabet")  # longer, and stamped with the old time (cp -p)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return {}, b"alphabet|beta", "1 file(s) modified (a.txt)"


def _edit_keeping_size_and_mtime(tmp_path):
    """Seen only by hashing: a same-size edit with the old time stamp (rsync -t)."""
    path = tmp_path / "data" / "a.txt"
    stat = path.stat()
    write(tmp_path, "a.txt", "ALPHA")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return {"data_change_detection": "content"}, b"ALPHA|beta", "`data_change_detection` changed"


def _damage_array(tmp_path):
    with open(array_path(tmp_path), "r+b") as file:
        file.truncate(130)
    return {}, b"alpha|beta", "cached array is missing or has the wrong size"


@pytest.mark.parametrize("change", [_modify_same_size, _resize_keeping_the_mtime, _add_file,
                                    _remove_file, _change_separator, _change_policy, _force,
                                    _damage_array, _edit_keeping_size_and_mtime])
def test_any_change_rebuilds_the_cache(tmp_path, capsys, change):
    write(tmp_path, "a.txt", "alpha")
    write(tmp_path, "b.txt", "beta")
    prepare(make_config(tmp_path))
    inode = array_path(tmp_path).stat().st_ino
    capsys.readouterr()
    overrides, expected, reason = change(tmp_path)
    data = prepare(make_config(tmp_path, **overrides))
    assert f"rebuilding cache {array_path(tmp_path)} ({reason})" in capsys.readouterr().out
    assert array_path(tmp_path).stat().st_ino != inode
    assert bytes(data) == expected


def _fail_on_second_file(monkeypatch):
    calls = []
    append = dataset._append_source

    def failing(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return append(*args)
    monkeypatch.setattr(dataset, "_append_source", failing)


def test_interrupted_build_leaves_no_cache_to_trust(tmp_path, monkeypatch, capsys):
    for name, text in [("a.txt", "alpha"), ("b.txt", "beta"), ("c.txt", "gamma")]:
        write(tmp_path, name, text)
    prepare(make_config(tmp_path))
    _fail_on_second_file(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        prepare(make_config(tmp_path, force_reprocess_data=True))
    assert not manifest_path(tmp_path).exists()
    assert sorted(os.listdir(tmp_path / "processed")) == [dataset.PROCESSED_FILENAME]  # no temp
    monkeypatch.undo()
    capsys.readouterr()
    assert bytes(prepare(make_config(tmp_path))) == b"alpha|beta|gamma"
    assert "rebuilding" in capsys.readouterr().out


def test_crash_before_the_manifest_is_written_is_not_trusted(tmp_path, monkeypatch, capsys):
    path = write(tmp_path, "a.txt", "alpha")
    write(tmp_path, "b.txt", "beta")
    prepare(make_config(tmp_path))
    original = path.stat()
    write(tmp_path, "a.txt", "ALPHA")

    def crash(*args):
        raise OSError("disk full")
    monkeypatch.setattr(dataset, "_write_manifest", crash)
    with pytest.raises(OSError):
        prepare(make_config(tmp_path))  # the new array is in place, its manifest is not
    monkeypatch.undo()
    # Put the old source back exactly: the old manifest, had it survived, would match it.
    write(tmp_path, "a.txt", "alpha")
    os.utime(path, ns=(original.st_atime_ns, original.st_mtime_ns))
    capsys.readouterr()
    assert bytes(prepare(make_config(tmp_path))) == b"alpha|beta"
    assert "rebuilding" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# Demo corpus

def test_empty_data_dir_gets_a_deterministic_demo_corpus(tmp_path, capsys):
    data_dir = tmp_path / "empty" / "data"
    data_dir.mkdir(parents=True)
    data = prepare(make_config(tmp_path, data_dir=str(data_dir), sequence_length=128,
                               val_split_ratio=0.1))
    out = capsys.readouterr().out
    assert "DUMMY DATA" in out and f"put .txt files in {data_dir}" in out
    content = (data_dir / dataset.DUMMY_FILENAME).read_bytes()
    assert bytes(data) == content
    assert 2_000_000 <= len(content) <= 4_000_000
    text = content.decode("utf-8")  # valid UTF-8, or this raises
    assert all(ch in text for ch in "éü—€東京") and any(ord(ch) > 0xFFFF for ch in text)
    assert len(set(text.splitlines())) > 5000  # varied, not one line repeated
    assert dataset.dummy_corpus_text() == text  # same bytes every time


def test_demo_corpus_arithmetic_is_correct():
    facts = re.findall(r"^(\d+) ([-+×]) (\d+) = (\d+)\.$", dataset.dummy_corpus_text(), re.M)
    assert len(facts) > 1000
    ops = {"+": int.__add__, "-": int.__sub__, "×": int.__mul__}
    assert all(ops[op](int(a), int(b)) == int(c) for a, op, b, c in facts)


def test_empty_data_dir_without_demo_corpus_is_an_error(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with pytest.raises(UserError, match=f"no .txt files in {re.escape(str(data_dir))}"):
        prepare(make_config(tmp_path, generate_dummy_data_if_empty=False))
    assert data_dir.is_dir() and not any(data_dir.iterdir())


# ---------------------------------------------------------------------------
# Enough data

def _windows_per_split(n, length, ratio):
    data = np.zeros(n, dtype=np.uint8)
    return [len(ByteSequenceDataset(data, length, 1, split, ratio)) for split in ("train", "val")]


@pytest.mark.parametrize("length", [1, 2, 7, 128])
@pytest.mark.parametrize("ratio", [0.1, 0.013, 0.25, 0.5, 0.7, 0.9])
def test_min_bytes_needed_is_the_smallest_corpus_with_a_window_per_split(length, ratio):
    needed = min_bytes_needed(length, ratio)
    assert min(_windows_per_split(needed, length, ratio)) >= 1
    assert min(_windows_per_split(needed - 1, length, ratio)) == 0


def test_too_little_data_error_gives_the_numbers(tmp_path):
    config = make_config(tmp_path, sequence_length=9, val_split_ratio=0.25)
    needed = min_bytes_needed(9, 0.25)
    assert needed == 37  # train int(37 * 0.75) = 27 >= 10 and validation 10 >= 10
    check_enough_data(needed, config)
    with pytest.raises(UserError, match=r"found 36 bytes.*at least 37 bytes"):
        check_enough_data(needed - 1, config)
    write(tmp_path, "a.txt", "x" * 17)
    with pytest.raises(UserError, match=r"found 17 bytes.*at least 37 bytes"):
        prepare(config)


# ---------------------------------------------------------------------------
# Windows

def _span(data, split, ratio):
    train_end = int(len(data) * (1 - ratio))
    return (0, train_end) if split == "train" else (train_end, len(data))


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("length, stride", [(1, 1), (8, 3), (16, 16), (16, 40)])
def test_windows_are_the_shifted_slices_of_their_span(split, length, stride):
    data = np.random.default_rng(0).integers(0, 256, 1037, dtype=np.uint8)
    ds = ByteSequenceDataset(data, length, stride, split, 0.3)
    begin, end = _span(data, split, 0.3)
    starts = list(range(begin, end - length, stride))  # s + length + 1 <= end
    assert len(ds) == len(starts) > 0 and ds.num_bytes == end - begin
    for i, s in enumerate(starts):
        x, y = ds[i]
        assert x.dtype == y.dtype == torch.int64 and int(ds.window_starts(i)) == s
        assert x.tolist() == data[s:s + length].tolist()
        assert y.tolist() == data[s + 1:s + length + 1].tolist()


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("windows_before", [0, 1, 5])
@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_window_count_at_the_span_boundary(split, windows_before, extra):
    length, stride = 8, 3
    span = length + 1 + windows_before * stride + extra  # extra == 0: last window ends on the edge
    data = np.arange(2 * span, dtype=np.int64).astype(np.uint8)
    ds = ByteSequenceDataset(data, length, stride, split, 0.5)  # each split gets `span` bytes
    expected = windows_before + 1 if extra >= 0 else windows_before
    assert ds.num_bytes == span and len(ds) == expected
    if len(ds):  # where the last window's targets end, relative to the span's end
        begin = 0 if split == "train" else span
        last_end = int(ds.window_starts(len(ds) - 1)) + length + 1
        assert last_end == begin + span - (extra if extra >= 0 else stride - 1)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_no_training_window_touches_validation_bytes():
    data = np.zeros(1037, dtype=np.uint8)
    train_end = int(1037 * 0.9)
    train = ByteSequenceDataset(data, 16, 5, "train", 0.1)
    val = ByteSequenceDataset(data, 16, 5, "val", 0.1)
    assert max(int(train.window_starts(i)) + 16 for i in range(len(train))) <= train_end - 1
    assert min(int(val.window_starts(i)) for i in range(len(val))) == train_end
    assert len(train) > 0 and len(val) > 0


def test_a_capped_validation_split_is_the_corpus_end_up_to_the_cap():
    n = 100_003
    assert split_point(n, 0.1) == split_point(n, 0.1, None) == int(n * 0.9)
    assert split_point(n, 0.1, 5000) == n - 5000  # the cap, where 10 % is more
    assert split_point(n, 0.1, 50_000) == int(n * 0.9)  # the ratio, where it is less
    data = np.zeros(n, dtype=np.uint8)
    train, val = (ByteSequenceDataset(data, 16, 16, split, 0.1, 5000) for split in ("train", "val"))
    assert (train.span_end, val.span_start, val.span_end) == (n - 5000, n - 5000, n)
    # A cap must leave the validation split a window: the dataset and the config say so.
    with pytest.raises(ValueError, match="val_split_max_bytes"):
        ByteSequenceDataset(data, 16, 16, "val", 0.1, 16)
    with pytest.raises(ConfigError, match=r"val_split_max_bytes.*one window"):
        main_module.check_config(make_tiny_config("/unused", val_split_max_bytes=16))


def test_getitems_equals_stacked_getitem():
    data = np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8)
    ds = ByteSequenceDataset(data, 12, 7, "train", 0.2)
    indices = [3, 0, 7, 7, -1, len(ds) - 1]
    x, y = ds.__getitems__(indices)
    assert x.shape == y.shape == (len(indices), 12) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x, torch.stack([ds[i][0] for i in indices]))
    assert torch.equal(y, torch.stack([ds[i][1] for i in indices]))
    assert torch.equal(ds[-1][0], ds[len(ds) - 1][0])
    with pytest.raises(IndexError):
        ds.__getitems__([0, len(ds)])


def test_dataloader_gets_whole_batches_from_getitems():
    data = np.random.default_rng(2).integers(0, 256, 400, dtype=np.uint8)
    ds = ByteSequenceDataset(data, 10, 10, "train", 0.1)
    x, y = next(iter(DataLoader(ds, batch_size=4, collate_fn=lambda batch: batch)))
    expected_x, expected_y = ds.__getitems__([0, 1, 2, 3])
    assert torch.equal(x, expected_x) and torch.equal(y, expected_y)


def test_pickling_reopens_the_memmap_instead_of_copying_it(tmp_path):
    path = tmp_path / "bytes.npy"
    np.save(path, np.random.default_rng(3).integers(0, 256, 100_000, dtype=np.uint8))
    ds = ByteSequenceDataset(np.load(path, mmap_mode="r"), 32, 32, "val", 0.1)
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000
    copy = pickle.loads(blob)
    assert isinstance(copy.data, np.memmap) and len(copy) == len(ds)
    assert torch.equal(copy.__getitems__(range(len(ds)))[1], ds.__getitems__(range(len(ds)))[1])


def resident_file_kb():
    """Pages of files mapped into this process (Linux's RssFile), KB."""
    with open("/proc/self/status") as file:
        return int(next(line.split()[1] for line in file if line.startswith("RssFile:")))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_windows_of_a_mapped_file_are_read_without_mapping_the_file(tmp_path):
    """Through the map, 4,000 random windows of a 4 MB array would map all of it."""
    np.save(tmp_path / "bytes.npy", np.random.default_rng(0).integers(0, 256, 4_000_000,
                                                                       dtype=np.uint8))
    data = np.load(tmp_path / "bytes.npy", mmap_mode="r")
    ds = ByteSequenceDataset(data, 64, 64, "train", 0.1)
    indices = np.random.default_rng(1).integers(0, len(ds), 4000)
    ds.__getitems__(indices[:2])  # a first call loads libraries, which RssFile counts too
    before = resident_file_kb()
    x, y = ds.__getitems__(indices)
    assert resident_file_kb() - before < 1000
    windows = np.asarray(data)[ds.window_starts(indices)[:, None] + np.arange(65)]
    assert torch.equal(x, torch.from_numpy(windows[:, :-1].astype(np.int64)))
    assert torch.equal(y, torch.from_numpy(windows[:, 1:].astype(np.int64)))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_the_corpus_fingerprint_reads_a_mapped_file_without_mapping_it(tmp_path):
    """Every run fingerprints its corpus: through the map that would bring all of it into
    the process. The file is read instead, and the digest is the array's."""
    array = np.random.default_rng(2).integers(0, 256, 4_000_000, dtype=np.uint8)
    np.save(tmp_path / "bytes.npy", array)
    data = np.load(tmp_path / "bytes.npy", mmap_mode="r")
    before = resident_file_kb()
    mapped = dataset.corpus_fingerprint(data)
    assert resident_file_kb() - before < 1000
    assert mapped == dataset.corpus_fingerprint(array)  # the in-memory path, same bytes
    array[123_456] ^= 1
    assert dataset.corpus_fingerprint(array) != mapped


def test_bad_arguments_are_rejected():
    data = np.zeros(100, dtype=np.uint8)
    with pytest.raises(ValueError, match="split"):
        ByteSequenceDataset(data, 4, 4, "test", 0.1)
    with pytest.raises(ValueError, match="uint8"):
        ByteSequenceDataset(data.astype(np.int64), 4, 4, "train", 0.1)


# ---------------------------------------------------------------------------
# Paths and damaged files

def test_content_hashing_sees_an_edit_that_keeps_size_and_time(tmp_path, capsys):
    path = write(tmp_path, "a.txt", "alpha")
    config = make_config(tmp_path, data_change_detection="content")
    prepare(config)
    stat = path.stat()
    write(tmp_path, "a.txt", "ALPHA")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    capsys.readouterr()
    assert bytes(prepare(config)) == b"ALPHA"
    assert "(1 file(s) modified (a.txt))" in capsys.readouterr().out
    # By size and time alone the same edit goes unseen: the documented limit of the default.
    write(tmp_path, "a.txt", "alpha")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    plain = make_config(tmp_path)
    prepare(plain)
    write(tmp_path, "a.txt", "ALPHA")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert bytes(prepare(plain)) == b"alpha"


def test_a_missing_data_dir_is_an_error_not_an_empty_corpus(tmp_path):
    typo = tmp_path / "dataa"
    with pytest.raises(UserError, match=f"data_dir {re.escape(str(typo))} does not exist"):
        prepare(make_config(tmp_path, data_dir=str(typo)))
    assert not typo.exists()  # nothing created, no demo corpus trained on
    # The default folder on a first run is created and gets the demo corpus.
    config = make_config(tmp_path, data_dir=str(typo), sequence_length=64)
    data = DataProcessor(config, create_missing_data_dir=True).prepare()
    assert (typo / dataset.DUMMY_FILENAME).is_file() and len(data) > 1_000_000


def test_a_single_txt_file_is_a_corpus_of_one_file(tmp_path):
    path = write(tmp_path, "only.txt", "just this one")
    write(tmp_path, "other.txt", "not this")
    assert bytes(prepare(make_config(tmp_path, data_dir=str(path)))) == b"just this one"
    notes = write(tmp_path, "notes.md", "markdown")
    with pytest.raises(UserError, match="not a .txt file"):
        prepare(make_config(tmp_path, data_dir=str(notes)))


def test_symlinked_folders_are_followed_and_loops_read_once(tmp_path, capsys):
    write(tmp_path, "a.txt", "alpha")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "deep").mkdir(parents=True)
    (elsewhere / "deep" / "b.txt").write_text("beta")
    os.symlink(elsewhere, tmp_path / "data" / "linked")
    os.symlink(tmp_path / "data", elsewhere / "deep" / "loop")  # back up: a cycle
    data = prepare(make_config(tmp_path))
    assert bytes(data) == b"alpha|beta"
    assert "symlink loop" in capsys.readouterr().err


def test_an_unreadable_data_file_is_named(tmp_path, monkeypatch):
    write(tmp_path, "a.txt", "alpha")
    bad = write(tmp_path, "b.txt", "beta")

    def refusing_open(path, *args, **kwargs):
        if str(path) == str(bad):
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, *args, **kwargs)
    monkeypatch.setattr(dataset, "open", refusing_open, raising=False)
    with pytest.raises(UserError, match=r"b\.txt: cannot read this data file \(Permission"):
        prepare(make_config(tmp_path))
    assert not manifest_path(tmp_path).exists()


def test_a_damaged_array_header_is_rebuilt_with_a_warning(tmp_path, capsys):
    write(tmp_path, "a.txt", "alpha")
    prepare(make_config(tmp_path))
    with open(array_path(tmp_path), "r+b") as file:
        file.write(b"\x00garbage!")  # the magic string and header, same file size
    capsys.readouterr()
    assert bytes(prepare(make_config(tmp_path))) == b"alpha"
    captured = capsys.readouterr()
    assert "unreadable" in captured.err and "rebuilding cache" in captured.out


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path, capsys):
    write(tmp_path, "a.txt", "alpha")
    processed = tmp_path / "processed"
    processed.mkdir()
    host = socket.gethostname()
    dead = processed / f".tmp_{host}_999999999_abc_{dataset.PROCESSED_FILENAME}"
    live = processed / f".tmp_{host}_{os.getpid()}_abc_{dataset.PROCESSED_FILENAME}"
    other_host = processed / f".tmp_some-other-host_1_abc_{dataset.PROCESSED_FILENAME}"
    for path in (dead, live, other_host):
        path.write_bytes(b"x" * 1000)
    prepare(make_config(tmp_path))
    assert not dead.exists() and live.exists() and other_host.exists()
    assert "removed 0.0 MB of temporary files" in capsys.readouterr().out


def test_the_manifest_records_where_each_file_lies(tmp_path):
    write(tmp_path, "a.txt", "alpha")
    write(tmp_path, "b.txt", "")
    write(tmp_path, "c.txt", "gamma!")
    data = bytes(prepare(make_config(tmp_path)))
    spans = json.loads(manifest_path(tmp_path).read_text())["spans"]
    assert spans == {"a.txt": [0, 5], "c.txt": [6, 12]}
    assert data[6:12] == b"gamma!"


# -- data order ---------------------------------------------------------------

def one_epoch(order, epoch, first=0):
    """The micro-batches of `epoch` from micro-batch `first` on."""
    batches = order.micro_batches(epoch, first)
    return [next(batches) for _ in range(order.micro_batches_per_epoch - first)]


def test_two_ranks_see_the_same_windows_as_one_rank_with_twice_the_batch():
    single = one_epoch(BatchOrder(103, 8, 1, seed=1), epoch=2)
    rank0 = one_epoch(BatchOrder(103, 4, 1, seed=1, rank=0, world_size=2), epoch=2)
    rank1 = one_epoch(BatchOrder(103, 4, 1, seed=1, rank=1, world_size=2), epoch=2)
    assert len(single) == len(rank0) == len(rank1) == 12
    for big, a, b in zip(single, rank0, rank1):
        assert big == a + b and not set(a) & set(b)
    assert one_epoch(BatchOrder(103, 8, 1, 1), epoch=3) != single  # reshuffled every epoch


def test_sampler_resumes_mid_epoch():
    full = one_epoch(BatchOrder(50, 5, 1, seed=0), epoch=0)
    assert one_epoch(BatchOrder(50, 5, 1, seed=0), epoch=0, first=4) == full[4:]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 4097])
def test_seeded_permutation_is_a_bijection(n):
    values = dataset.SeededPermutation(n, seed=5)(np.arange(n))
    assert sorted(values.tolist()) == list(range(n))
    if n > 10:
        assert values.tolist() != list(range(n))  # and it does shuffle
        assert dataset.SeededPermutation(n, seed=6)(np.arange(n)).tolist() != values.tolist()


def test_the_batch_order_needs_no_memory_per_window():
    """A 10 GB corpus at data_stride=1 has 10^10 windows: a stored permutation would take
    80 GB; the order of any micro-batch is computed from the seed alone."""
    order = dataset.BatchOrder(10**10, batch_size=64, accumulation=1, seed=3)
    batches = order.micro_batches(epoch=2, first=10**7)
    first, second = next(batches), next(batches)
    assert len(first) == 64 and len(set(first + second)) == 128
    assert all(0 <= index < 10**10 for index in first + second)
    assert next(order.micro_batches(epoch=2, first=10**7 + 1)) == second  # resumable
