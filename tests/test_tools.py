"""tools/make_reference_corpus.py on a small tarball made here: which files it keeps, the
order it writes them in, and that the bytes do not depend on the archive's order."""

import hashlib
import io
import os
import subprocess
import sys
import tarfile

TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "tools", "make_reference_corpus.py")

FILES = {
    "linux-source-6.1/Documentation/b.rst": "Beta prose.\n".encode("utf-8"),
    "linux-source-6.1/Documentation/a.txt": "Alpha prose — with a dash".encode("utf-8"),
    "linux-source-6.1/kernel/sched.c": b"int main(void) { return 0; }\n",
    "linux-source-6.1/arch/x86/boot.S": b"nop\n",
    "linux-source-6.1/firmware/blob.bin": b"\x7fELF\0\0\1",
    "linux-source-6.1/drivers/latin1.c": "/* caf\u00e9 */\n".encode("latin-1"),
}


def make_tarball(path, order):
    with tarfile.open(path, "w:xz") as archive:
        for name in order:
            info = tarfile.TarInfo(name)
            info.size = len(FILES[name])
            archive.addfile(info, io.BytesIO(FILES[name]))


def build(tmp_path, order, name):
    tarball = tmp_path / f"{name}.tar.xz"
    make_tarball(tarball, order)
    out = tmp_path / name
    done = subprocess.run([sys.executable, TOOL, str(out), "--tarball", str(tarball)],
                          capture_output=True, text=True, check=True)
    return out, done.stdout


def test_text_files_sorted_by_path_with_a_header_each_and_binaries_left_out(tmp_path):
    out, stdout = build(tmp_path, list(FILES), "corpus")
    docs = (out / "part1-documentation.txt").read_bytes()
    sources = (out / "part2-sources.txt").read_bytes()
    assert docs == ("### linux-source-6.1/Documentation/a.txt\nAlpha prose — with a dash\n"
                    "### linux-source-6.1/Documentation/b.rst\nBeta prose.\n").encode("utf-8")
    assert sources == (b"### linux-source-6.1/arch/x86/boot.S\nnop\n"
                       b"### linux-source-6.1/kernel/sched.c\nint main(void) { return 0; }\n")
    assert "left out (binary or not UTF-8): 2 files" in stdout
    whole = hashlib.sha256(docs + sources).hexdigest()
    assert f"corpus sha256 (both parts in order, as `cat part* | sha256sum`): {whole}" in stdout


def test_the_same_files_in_another_archive_order_give_the_same_bytes(tmp_path):
    first, _ = build(tmp_path, list(FILES), "first")
    second, _ = build(tmp_path, list(reversed(FILES)), "second")
    for name in ("part1-documentation.txt", "part2-sources.txt"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_a_missing_tarball_says_how_to_get_it(tmp_path):
    done = subprocess.run([sys.executable, TOOL, str(tmp_path / "out"), "--tarball",
                           str(tmp_path / "absent.tar.xz")], capture_output=True, text=True)
    assert done.returncode == 1
    assert "apt-get install linux-source-6.1=6.1.176-1" in done.stderr
    assert not (tmp_path / "out").exists()
