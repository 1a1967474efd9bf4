"""Build the project's reference corpus of real text from Debian's Linux kernel sources.

    apt-get install linux-source-6.1=6.1.176-1     # leaves /usr/src/linux-source-6.1.tar.xz
    python3 tools/make_reference_corpus.py OUT_FOLDER [--tarball PATH]

Writes two files into OUT_FOLDER, each the concatenation of the tarball's text files in
sorted path order, every file preceded by a line `### path`:

    part1-documentation.txt   Documentation/ (English prose: reStructuredText and text)
    part2-sources.txt         everything else (C, headers, Kconfig, Makefiles, scripts)

A file is text when it holds no NUL byte and decodes as UTF-8; the rest (firmware, images,
Latin-1 leftovers) is left out and counted. The same tarball gives the same bytes on any
machine: the script prints each output's size and sha256 for checking against
docs/benchmarks.md, where the figures of the pinned package version are kept. A folder
given to main.py or bench.py is read in sorted file order, so the prose comes first and a
prefix of the corpus (bench's scale section) starts with English.
"""

import argparse
import hashlib
import os
import sys
import tarfile

DEFAULT_TARBALL = "/usr/src/linux-source-6.1.tar.xz"
PARTS = {"documentation": "part1-documentation.txt", "sources": "part2-sources.txt"}


def part_of(path):
    """Which output a member goes to: its path below the tarball's top folder decides."""
    inner = path.split("/", 1)[1] if "/" in path else path
    return "documentation" if inner.startswith("Documentation/") else "sources"


def text_members(tarball):
    """{part: {path: bytes}} of the tarball's text files. The archive is read once, as a
    stream: an xz tarball cannot seek, and sorting needs every member first."""
    texts = {part: {} for part in PARTS}
    skipped = 0
    with tarfile.open(tarball, mode="r|*") as archive:
        for member in archive:
            if not member.isfile():
                continue
            data = archive.extractfile(member).read()
            if b"\0" in data:
                skipped += 1
                continue
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                skipped += 1
                continue
            texts[part_of(member.name)][member.name] = data
    return texts, skipped


def write_part(files, destination, whole):
    """Writes the files in sorted path order; returns (bytes written, sha256 hex). `whole`
    is the running sha256 of every part so far, in order."""
    digest, size = hashlib.sha256(), 0
    with open(destination + ".tmp", "wb") as out:
        for path in sorted(files):
            data = files[path]
            if not data.endswith(b"\n"):
                data += b"\n"
            chunk = f"### {path}\n".encode("utf-8") + data
            out.write(chunk)
            digest.update(chunk)
            whole.update(chunk)
            size += len(chunk)
    os.replace(destination + ".tmp", destination)
    return size, digest.hexdigest()


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_folder", help="where the two .txt files are written")
    parser.add_argument("--tarball", default=DEFAULT_TARBALL,
                        help=f"the kernel source tarball (default: {DEFAULT_TARBALL})")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.tarball):
        print(f"error: {args.tarball} not found; install it with "
              f"`apt-get install linux-source-6.1=6.1.176-1` or pass --tarball", file=sys.stderr)
        return 1
    os.makedirs(args.out_folder, exist_ok=True)
    print(f"reading {args.tarball} ...", file=sys.stderr)
    texts, skipped = text_members(args.tarball)
    total = hashlib.sha256()
    for part, name in PARTS.items():
        size, digest = write_part(texts[part], os.path.join(args.out_folder, name), total)
        print(f"{name}: {len(texts[part]):,} files, {size:,} bytes, sha256 {digest}")
    print(f"left out (binary or not UTF-8): {skipped:,} files")
    print(f"corpus sha256 (both parts in order, as `cat part* | sha256sum`): "
          f"{total.hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
