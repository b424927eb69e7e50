"""Where the tests get Fashion-MNIST: the `fetch` stage's own sources, then ../shared (CI's).

The tests need upstream's four original .gz files byte for byte (test_fetch.py rewrites their
gzip headers into Debian's and damages copies of them). Debian's package rewrote only the gzip
header, so its files become upstream's again with upstream's header in front of the unchanged
data stream; every result is checked against upstream's published .gz MD5s.
"""

import os
import shutil
import struct
from pathlib import Path

import pytest

from stages.data import RAW_MD5, md5_hex
from stages.fetch import (
    NoGoodSource,
    SourceError,
    first_good_source,
    is_url,
    read_sources,
    read_stored,
    verified,
)
from stages.files import make_temp_dir, replace_dir

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "fashion-mnist"
CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "fashion-mixer"
    / "fashion-mnist"
)
# Short: offline, a download must fail fast instead of holding up the whole suite.
TEST_DOWNLOAD_TIMEOUT_S = 10

# Upstream's .gz files (zalandoresearch/fashion-mnist README): their MD5s, and the mtimes in
# their gzip headers (one per split).
UPSTREAM_GZ_MD5 = {
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
UPSTREAM_MTIME = {"train": 0x59A7E9DE, "t10k": 0x59A7E9F3}
FNAME = 0x08  # gzip header flag: a file name follows the 10 fixed bytes


def sources_for_tests() -> list[str]:
    """The fetch stage's sources from this repo's params.yaml, then ../shared beside the clone."""
    return read_sources(REPO / "params.yaml") + [str(SHARED)]


def upstream_gz(name: str, blob: bytes) -> bytes:
    """Upstream's .gz bytes from a copy with upstream's data stream (upstream's, Debian's)."""
    stream = blob[blob.index(b"\0", 10) + 1 :] if blob[3] & FNAME else blob[10:]
    mtime = UPSTREAM_MTIME[name.split("-")[0]]
    gz = b"\x1f\x8b\x08\x08" + struct.pack("<I", mtime) + b"\x00\x03" + name.encode() + b"\0"
    gz += stream
    if md5_hex(gz) != UPSTREAM_GZ_MD5[name]:
        raise SourceError(f"{name}.gz: the data is right but not compressed as upstream's")
    return gz


def original_files(source: str, timeout_s: float | None = None) -> dict[str, bytes]:
    """Upstream's four .gz files from one source, each verified by fetch's own checks."""
    files = {}
    for name in RAW_MD5:
        file_name, blob = read_stored(source, name, timeout_s)
        if file_name != f"{name}.gz":
            raise SourceError(f"{name}.gz is missing (the tests need the .gz files)")
        verified(name, file_name, blob)
        files[name] = upstream_gz(name, blob)
    return files


def write_files(files: dict[str, bytes], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, gz in files.items():
        (folder / f"{name}.gz").write_bytes(gz)
    return folder


def fashion_mnist_folder(sources: list[str], cache: Path, out: Path) -> tuple[str, Path]:
    """The first source, in order, that gives the four files, and a folder holding them.

    A folder's files are written into `out`. A URL's are downloaded into `cache` once and taken
    from there while they verify. Where no source works, the test fails with one line.
    """

    def take(source: str) -> Path:
        if not is_url(source):
            return write_files(original_files(source), out)
        try:
            original_files(str(cache))
        except SourceError:
            downloaded = original_files(source, TEST_DOWNLOAD_TIMEOUT_S)
            staging = make_temp_dir(cache)
            try:
                replace_dir(write_files(downloaded, staging), cache)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return cache

    try:
        return first_good_source(sources, take)
    except NoGoodSource as exc:
        failures = exc.failures
    # failed outside the except block: pytest would print NoGoodSource above the line as well
    tried = "; ".join(f"{source}: {reason}" for source, reason in failures)
    message = (
        f"no Fashion-MNIST for the tests (tried {tried or 'no source'}). Provide it: "
        "`sudo apt-get install dataset-fashion-mnist`, or set FASHION_MNIST_DIR to a folder "
        f"holding the four .gz files, or allow the download (kept in {cache})."
    )
    pytest.fail(message.replace("\n", " "), pytrace=False)
