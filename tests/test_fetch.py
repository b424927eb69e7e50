"""The `fetch` stage, for real: local folders, a local HTTP server, and the command line.

Every source is built from upstream's real files (the `fashion_mnist` fixture, conftest.py). The
expected MD5s below are the published ones (PROVENANCE.md of ../shared/data/fashion-mnist), not
taken from the code under test.
"""

import functools
import gzip
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import data_sources
import pytest
import yaml
from data_sources import UPSTREAM_GZ_MD5, fashion_mnist_folder, sources_for_tests

from stages import fetch as fetch_module
from stages.errors import UserError
from stages.fetch import fetch, read_sources

REPO = Path(__file__).resolve().parents[1]

# MD5 of each decompressed file (PROVENANCE.md, "MD5 unpacked"), in the order fetch reads them.
UNPACKED_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
# MD5 of the .gz files that Debian's dataset-fashion-mnist ships (PROVENANCE.md).
DEBIAN_GZ_MD5 = {
    "train-images-idx3-ubyte": "cf8536b0aa1a6ac5fa3f23001093305c",
    "train-labels-idx1-ubyte": "10bea18fdb374794d4bb42e356e600c9",
    "t10k-images-idx3-ubyte": "f78720b4224f21cce2f2ccf2d7a94c9a",
    "t10k-labels-idx1-ubyte": "0d30e22e447f3c33dab9ed536400ac01",
}
NAMES = list(UNPACKED_MD5)
CORRUPT = "t10k-labels-idx1-ubyte"  # the last file read, so the three before it pass first
TRUNCATED = "train-labels-idx1-ubyte"
MISSING = "t10k-images-idx3-ubyte"


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def copy_gz(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        if name not in skip:
            shutil.copyfile(src / f"{name}.gz", dst / f"{name}.gz")
    return dst


def debian_header(blob: bytes) -> bytes:
    """Debian's rewrite of an upstream .gz: FNAME flag and file name dropped, build mtime set."""
    assert blob[:4] == b"\x1f\x8b\x08\x08", "expected an upstream gzip header with a file name"
    body = blob.index(b"\0", 10) + 1
    return b"\x1f\x8b\x08\x00" + struct.pack("<I", 0x5EDA0AED) + blob[8:10] + blob[body:]


def assert_fetched(out: Path) -> None:
    """`out` holds exactly the four decompressed files, where torchvision looks for them."""
    raw = out / "FashionMNIST" / "raw"
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == sorted(NAMES)
    for name, expected in UNPACKED_MD5.items():
        assert md5((raw / name).read_bytes()) == expected, name


def only_out_in_parent(out: Path) -> None:
    """No staging folder (.out.XXXX) or old copy (.out.old) left beside the result."""
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def reason_for(message: str, source: str) -> str:
    """What fetch's one-line UserError reports for `source`: "<source>: <reason>"."""
    assert "\n" not in message, message
    tried = message.split("(tried ", 1)[1].rsplit("). Fix:", 1)[0]
    reasons = [part for part in tried.split("; ") if part.startswith(f"{source}: ")]
    assert len(reasons) == 1, f"{source} is not reported once in:\n{message}"
    return reasons[0]


@pytest.fixture(scope="module")
def bad_folders(tmp_path_factory, fashion_mnist) -> dict:
    """Debian-style, corrupt, truncated and incomplete copies of the original files, built once."""
    root = tmp_path_factory.mktemp("sources")

    debian = root / "debian"
    debian.mkdir()
    for name in NAMES:
        blob = debian_header((fashion_mnist / f"{name}.gz").read_bytes())
        assert md5(blob) == DEBIAN_GZ_MD5[name]  # byte for byte what Debian ships
        (debian / f"{name}.gz").write_bytes(blob)

    corrupt = copy_gz(fashion_mnist, root / "corrupt", skip=(CORRUPT,))
    data = bytearray(gzip.decompress((fashion_mnist / f"{CORRUPT}.gz").read_bytes()))
    data[-1] ^= 0x01  # one label changed
    (corrupt / f"{CORRUPT}.gz").write_bytes(gzip.compress(bytes(data), mtime=0))

    truncated = copy_gz(fashion_mnist, root / "truncated", skip=(TRUNCATED,))
    blob = (fashion_mnist / f"{TRUNCATED}.gz").read_bytes()
    (truncated / f"{TRUNCATED}.gz").write_bytes(blob[: len(blob) // 2])

    missing = copy_gz(fashion_mnist, root / "missing", skip=(MISSING,))

    return {
        "debian": debian,
        "corrupt": corrupt,
        "corrupt_md5": md5(bytes(data)),
        "truncated": truncated,
        "missing": missing,
    }


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # no request log in the test output
        pass


@pytest.fixture
def serve(monkeypatch):
    """Start HTTP servers on 127.0.0.1 (any free port) serving a folder; stopped on teardown."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setattr(fetch_module, "DOWNLOAD_TIMEOUT_S", 10)
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(QuietHandler, directory=str(folder))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def refused_url() -> str:
    """A 127.0.0.1 URL on a port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


# --- local folders ----------------------------------------------------------------------------


def test_upstream_folder_gives_files_that_torchvision_loads(fashion_mnist, tmp_path):
    from torchvision.datasets import FashionMNIST

    out = tmp_path / "fashion-mnist"
    assert fetch(["/nonexistent/fashion-mnist", str(fashion_mnist)], out) == str(fashion_mnist)
    assert_fetched(out)
    only_out_in_parent(out)

    train = FashionMNIST(root=str(out), train=True, download=False)
    test = FashionMNIST(root=str(out), train=False, download=False)
    assert len(train) == 60_000
    assert len(test) == 10_000
    assert tuple(train.data.shape) == (60_000, 28, 28)
    assert train.targets[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]


def test_debian_gzip_headers_are_accepted(bad_folders, fashion_mnist, tmp_path):
    debian = bad_folders["debian"]
    for name in NAMES:  # the .gz bytes differ from upstream; only the header does
        assert (debian / f"{name}.gz").read_bytes() != (fashion_mnist / f"{name}.gz").read_bytes()
    out = tmp_path / "out"
    assert fetch([str(debian)], out) == str(debian)
    assert_fetched(out)


def test_uncompressed_files_are_accepted(fashion_mnist, tmp_path):
    first = tmp_path / "first"
    fetch([str(fashion_mnist)], first)
    raw = first / "FashionMNIST" / "raw"  # torchvision's layout: no .gz files
    out = tmp_path / "second"
    assert fetch([str(raw)], out) == str(raw)
    assert_fetched(out)


def test_corrupt_file_names_file_and_both_md5s(bad_folders, tmp_path):
    corrupt = str(bad_folders["corrupt"])
    out = tmp_path / "out"
    with pytest.raises(UserError) as info:
        fetch([corrupt], out)
    line = reason_for(str(info.value), corrupt)
    assert CORRUPT in line
    assert UNPACKED_MD5[CORRUPT] in line
    assert bad_folders["corrupt_md5"] in line
    assert not out.exists()


def test_corrupt_source_is_skipped_for_the_next(bad_folders, fashion_mnist, tmp_path):
    out = tmp_path / "out"
    assert fetch([str(bad_folders["corrupt"]), str(fashion_mnist)], out) == str(fashion_mnist)
    assert_fetched(out)  # the corrupt labels did not slip through
    only_out_in_parent(out)


def test_truncated_gz_names_file_and_next_source_is_used(bad_folders, fashion_mnist, tmp_path):
    truncated = str(bad_folders["truncated"])
    with pytest.raises(UserError) as info:
        fetch([truncated], tmp_path / "alone")
    line = reason_for(str(info.value), truncated)
    assert f"{TRUNCATED}.gz" in line
    assert "gzip" in line

    out = tmp_path / "out"
    assert fetch([truncated, str(fashion_mnist)], out) == str(fashion_mnist)
    assert_fetched(out)


def test_missing_file_is_named(bad_folders, tmp_path):
    missing = str(bad_folders["missing"])
    with pytest.raises(UserError) as info:
        fetch([missing], tmp_path / "out")
    line = reason_for(str(info.value), missing)
    assert f"{MISSING}.gz is missing" in line


def test_no_good_source_lists_every_reason_and_leaves_nothing(bad_folders, serve, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    not_found_url = serve(empty)
    refused = refused_url()
    sources = {
        "/nonexistent/fashion-mnist": "train-images-idx3-ubyte.gz is missing",
        str(bad_folders["corrupt"]): UNPACKED_MD5[CORRUPT],
        str(bad_folders["truncated"]): f"{TRUNCATED}.gz is not a complete gzip file",
        str(bad_folders["missing"]): f"{MISSING}.gz is missing",
        not_found_url: "404",
        refused: "failed",
    }
    parent = tmp_path / "parent"
    out = parent / "fashion-mnist"
    with pytest.raises(UserError) as info:
        fetch(list(sources), out)
    message = str(info.value)
    for source, reason in sources.items():
        assert reason in reason_for(message, source)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "FASHION_MNIST_DIR" in message
    assert "add a folder" in message
    assert "download URL" in message
    assert not out.exists()
    assert list(parent.iterdir()) == []  # no staging folders left behind


def test_empty_source_list_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"fetch\.sources is empty"):
        fetch([], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folder_named_by_environment_variable(fashion_mnist, tmp_path, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_TEST_DIR", str(copy_gz(fashion_mnist, tmp_path / "mine")))
    out = tmp_path / "out"
    assert fetch(["$FASHION_MNIST_TEST_DIR", "/nonexistent/fm"], out) == "$FASHION_MNIST_TEST_DIR"
    assert_fetched(out)

    monkeypatch.setenv("FASHION_MNIST_TEST_ROOT", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    for source in ("${FASHION_MNIST_TEST_ROOT}/mine", "~/mine"):
        assert fetch([source], tmp_path / "again") == source


@pytest.mark.parametrize("value", [None, ""])
def test_unset_environment_variable_is_skipped_with_its_name(
    value, fashion_mnist, tmp_path, monkeypatch
):
    if value is None:
        monkeypatch.delenv("FASHION_MNIST_TEST_DIR", raising=False)
    else:
        monkeypatch.setenv("FASHION_MNIST_TEST_DIR", value)
    # an empty value must not make the source the working folder, here one with the files
    monkeypatch.chdir(copy_gz(fashion_mnist, tmp_path / "cwd"))
    source = "$FASHION_MNIST_TEST_DIR"
    with pytest.raises(UserError) as info:
        fetch([source], tmp_path / "alone")
    line = reason_for(str(info.value), source)
    assert line.endswith("environment variable FASHION_MNIST_TEST_DIR is unset or empty")

    out = tmp_path / "out"
    assert fetch([source, str(fashion_mnist)], out) == str(fashion_mnist)
    assert_fetched(out)


# --- existing output --------------------------------------------------------------------------


def test_refetch_replaces_existing_output(fashion_mnist, tmp_path):
    out = tmp_path / "out"
    (out / "FashionMNIST" / "raw").mkdir(parents=True)
    (out / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"old and wrong")
    (out / "FashionMNIST" / "raw" / "stale.txt").write_text("stale")
    (out / "junk.txt").write_text("junk")

    assert fetch([str(fashion_mnist)], out) == str(fashion_mnist)
    assert_fetched(out)  # exactly the four verified files: old content is gone
    only_out_in_parent(out)


def test_failed_fetch_keeps_existing_output(bad_folders, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous data")
    with pytest.raises(UserError):
        fetch([str(bad_folders["corrupt"])], out)
    assert (out / "keep.txt").read_text() == "previous data"
    only_out_in_parent(out)


# --- HTTP -------------------------------------------------------------------------------------


def test_download_from_http_server(fashion_mnist, serve, tmp_path):
    url = serve(copy_gz(fashion_mnist, tmp_path / "www"))
    out = tmp_path / "dest" / "out"
    assert fetch([url], out) == url
    assert_fetched(out)
    only_out_in_parent(out)


def test_corrupt_download_fails_with_md5_then_local_source_is_used(
    bad_folders, fashion_mnist, serve, tmp_path
):
    url = serve(bad_folders["corrupt"])
    with pytest.raises(UserError) as info:
        fetch([url], tmp_path / "alone")
    line = reason_for(str(info.value), url)
    assert CORRUPT in line
    assert UNPACKED_MD5[CORRUPT] in line
    assert bad_folders["corrupt_md5"] in line

    out = tmp_path / "out"
    assert fetch([url, str(fashion_mnist)], out) == str(fashion_mnist)
    assert_fetched(out)


def test_http_404_is_a_clean_failure(serve, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    url = serve(empty)
    with pytest.raises(UserError) as info:
        fetch([url], tmp_path / "out")
    line = reason_for(str(info.value), url)
    assert f"download of {url}train-images-idx3-ubyte.gz failed" in line
    assert "404" in line


def test_malformed_url_falls_through_to_next_source(fashion_mnist, serve, tmp_path):
    bad = "http://127.0.0.1:notaport/"  # a typo in params.yaml (http.client.InvalidURL)
    with pytest.raises(UserError) as info:
        fetch([bad], tmp_path / "alone")
    assert "failed" in reason_for(str(info.value), bad)
    out = tmp_path / "out"
    assert fetch([bad, str(fashion_mnist)], out) == str(fashion_mnist)
    assert_fetched(out)


# --- the stage as a command -------------------------------------------------------------------


def run_stage(cwd: Path, params: dict) -> subprocess.CompletedProcess:
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    pythonpath = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath}
    return subprocess.run(
        [sys.executable, "-m", "stages.fetch", "--params", "params.yaml"]
        + ["--out", "data/fashion-mnist", "--record", "data/fetch.json"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_command_uses_first_good_source_and_records_it(fashion_mnist, tmp_path):
    proc = run_stage(tmp_path, {"fetch": {"sources": ["/nonexistent/fm", str(fashion_mnist)]}})
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "data" / "fetch.json").read_text())
    assert record["source"] == str(fashion_mnist)
    assert record["files_md5"] == UNPACKED_MD5
    assert_fetched(tmp_path / "data" / "fashion-mnist")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["fashion-mnist", "fetch.json"]


def test_command_with_the_repo_sources_takes_fashion_mnist_dir_first(
    fashion_mnist, tmp_path, monkeypatch
):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(copy_gz(fashion_mnist, tmp_path / "mine")))
    work = tmp_path / "work"
    work.mkdir()
    proc = run_stage(work, {"fetch": {"sources": read_sources(REPO / "params.yaml")}})
    assert proc.returncode == 0, proc.stderr
    assert json.loads((work / "data" / "fetch.json").read_text())["source"] == "$FASHION_MNIST_DIR"
    assert_fetched(work / "data" / "fashion-mnist")


def test_command_without_good_source_exits_2(bad_folders, tmp_path):
    sources = ["/nonexistent/fm", str(bad_folders["missing"])]
    proc = run_stage(tmp_path, {"fetch": {"sources": sources}})
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error:")
    assert "Traceback" not in proc.stderr
    for source in sources:
        assert source in proc.stderr
    assert not (tmp_path / "data" / "fashion-mnist").exists()
    assert not (tmp_path / "data" / "fetch.json").exists()
    assert list((tmp_path / "data").iterdir()) == []


def test_command_rejects_sources_that_are_not_a_list(fashion_mnist, tmp_path):
    proc = run_stage(tmp_path, {"fetch": {"sources": str(fashion_mnist)}})
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error:")
    assert "fetch.sources" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data" / "fashion-mnist").exists()


# --- the tests' own data: the `fashion_mnist` fixture's sources (tests/data_sources.py) --------


def assert_upstream_gz(folder: Path) -> None:
    for name in NAMES:
        assert md5((folder / f"{name}.gz").read_bytes()) == UPSTREAM_GZ_MD5[name], name


def test_fixture_tries_the_fetch_sources_then_shared():
    assert sources_for_tests() == read_sources(REPO / "params.yaml") + [
        str(REPO.parent / "shared" / "data" / "fashion-mnist")
    ]
    assert sources_for_tests()[0] == "$FASHION_MNIST_DIR"


def test_fixture_takes_the_first_source_that_works(
    bad_folders, fashion_mnist, serve, tmp_path, monkeypatch
):
    monkeypatch.delenv("FASHION_MNIST_TEST_DIR", raising=False)
    url = serve(copy_gz(fashion_mnist, tmp_path / "www"))
    debian = str(bad_folders["debian"])
    sources = ["$FASHION_MNIST_TEST_DIR", str(bad_folders["corrupt"]), debian, url]
    cache, out = tmp_path / "cache", tmp_path / "out"
    assert fashion_mnist_folder(sources, cache, out) == (debian, out)
    assert_upstream_gz(out)  # Debian's files, given back upstream's gzip header
    assert not cache.exists()  # the later URL was not downloaded

    mine = copy_gz(fashion_mnist, tmp_path / "mine", skip=(MISSING,))
    monkeypatch.setenv("FASHION_MNIST_TEST_DIR", str(mine))
    with pytest.raises(pytest.fail.Exception, match=f"{MISSING}.gz is missing in {mine}"):
        fashion_mnist_folder(sources[:1], cache, out)
    shutil.copyfile(fashion_mnist / f"{MISSING}.gz", mine / f"{MISSING}.gz")
    assert fashion_mnist_folder(sources, cache, tmp_path / "out2")[0] == "$FASHION_MNIST_TEST_DIR"


def test_fixture_downloads_once_into_its_cache(fashion_mnist, serve, tmp_path):
    www = copy_gz(fashion_mnist, tmp_path / "www")
    sources = ["/nonexistent/fm", serve(www)]
    cache = tmp_path / "cache" / "fashion-mnist"
    assert fashion_mnist_folder(sources, cache, tmp_path / "out") == (sources[1], cache)
    assert_upstream_gz(cache)
    only_out_in_parent(cache)

    (www / f"{CORRUPT}.gz").unlink()  # the server has lost a file: the cache is enough
    assert fashion_mnist_folder(sources, cache, tmp_path / "out") == (sources[1], cache)

    (cache / f"{CORRUPT}.gz").write_bytes(b"damaged")  # a bad cache is downloaded again ...
    with pytest.raises(pytest.fail.Exception, match="404"):  # ... here from a server without it
        fashion_mnist_folder(sources, cache, tmp_path / "out")
    shutil.copyfile(fashion_mnist / f"{CORRUPT}.gz", www / f"{CORRUPT}.gz")
    assert fashion_mnist_folder(sources, cache, tmp_path / "out") == (sources[1], cache)
    assert_upstream_gz(cache)
    only_out_in_parent(cache)


def test_fixture_without_a_source_fails_in_one_line(fashion_mnist, serve, tmp_path, monkeypatch):
    monkeypatch.delenv("FASHION_MNIST_TEST_DIR", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    # the right data, compressed anew: not upstream's bytes, which the tests need (zlib happens
    # to reproduce upstream's stream of the t10k labels, not of the train labels)
    labels = "train-labels-idx1-ubyte"
    recompressed = copy_gz(fashion_mnist, tmp_path / "recompressed", skip=(labels,))
    data = gzip.decompress((fashion_mnist / f"{labels}.gz").read_bytes())
    (recompressed / f"{labels}.gz").write_bytes(gzip.compress(data, mtime=0))
    sources = {
        "$FASHION_MNIST_TEST_DIR": "environment variable FASHION_MNIST_TEST_DIR is unset or empty",
        str(empty): f"train-images-idx3-ubyte.gz is missing in {empty}",
        str(recompressed): f"{labels}.gz: the data is right but not compressed as upstream's",
        serve(empty): "404",
        refused_url(): "failed",
    }
    cache = tmp_path / "cache"
    with pytest.raises(pytest.fail.Exception) as info:
        fashion_mnist_folder(list(sources), cache, tmp_path / "out")
    assert info.value.__context__ is None  # else pytest prints that exception too
    message = str(info.value)
    assert "\n" not in message
    tried = message[message.index("(tried ") + len("(tried ") : message.index("). Provide it:")]
    for part, (source, reason) in zip(tried.split("; "), sources.items(), strict=True):
        assert part.startswith(f"{source}: ")
        assert reason in part
    assert "apt-get install dataset-fashion-mnist" in message
    assert "set FASHION_MNIST_DIR to a folder holding the four .gz files" in message
    assert f"allow the download (kept in {cache})" in message
    assert not cache.exists()


def test_fixture_download_gives_up_after_its_short_timeout(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setattr(data_sources, "TEST_DOWNLOAD_TIMEOUT_S", 0.5)
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        start = time.monotonic()
        with pytest.raises(pytest.fail.Exception, match="timed out"):
            fashion_mnist_folder([url], tmp_path / "cache", tmp_path / "out")
    assert time.monotonic() - start < 5
