"""DVC stage `fetch`: put verified Fashion-MNIST files where torchvision reads them.

Sources are tried in the order of `fetch.sources` in params.yaml: local folders (such as the one
Debian's `dataset-fashion-mnist` installs, or `$FASHION_MNIST_DIR`: `$VARS` and `~` are expanded)
and HTTP(S) base URLs. A source is used only if all four files decompress to the expected MD5s;
otherwise the next one is tried. The files are assembled in a temporary folder and moved into
place only when all four are verified.
"""

import argparse
import gzip
import http.client
import io
import os
import re
import shutil
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from stages.config import load_params
from stages.data import RAW_MD5, md5_hex, raw_folder
from stages.errors import UserError, run_cli
from stages.files import make_temp_dir, replace_dir, write_json

DOWNLOAD_TIMEOUT_S = 60
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")  # $NAME or ${NAME}, as os.path.expandvars reads

T = TypeVar("T")


class SourceError(Exception):
    """One source could not supply one file; the next source is tried."""


class NoGoodSource(Exception):
    """Every source failed; `failures` holds (source, reason) for each, in order."""

    def __init__(self, failures: list[tuple[str, str]]):
        super().__init__(f"{len(failures)} sources failed")
        self.failures = failures


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def local_folder(source: str) -> Path:
    """The folder a folder source names, `$VARS` and `~` expanded; unset variables fail it.

    Checked first, because os.path.expandvars leaves an unset `$NAME` in place, which would then
    be looked up as a folder literally named `$NAME`.
    """
    unset = [a or b for a, b in VARIABLE.findall(source) if not os.environ.get(a or b)]
    if unset:
        raise SourceError(f"environment variable {unset[0]} is unset or empty")
    return Path(os.path.expandvars(source)).expanduser()


def _decompress(name: str, blob: bytes) -> bytes:
    try:
        return gzip.decompress(blob)
    except (EOFError, OSError, zlib.error) as exc:
        raise SourceError(f"{name}.gz is not a complete gzip file ({exc})") from exc


def _read_local(folder: Path, name: str) -> tuple[str, bytes]:
    try:
        for file_name in (f"{name}.gz", name):
            if (folder / file_name).is_file():
                return file_name, (folder / file_name).read_bytes()
    except OSError as exc:  # unreadable file: permissions, I/O error
        raise SourceError(f"{name}: cannot read it in {folder} ({exc})") from exc
    raise SourceError(f"{name}.gz is missing in {folder}")


def _download(base_url: str, name: str, timeout_s: float) -> bytes:
    url = base_url.rstrip("/") + f"/{name}.gz"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            buffer = io.BytesIO()
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=f"{name}.gz", leave=False
            ) as bar:
                while chunk := response.read(1 << 20):
                    buffer.write(chunk)
                    bar.update(len(chunk))
    # OSError: URLError, HTTPError, timeouts, refused connections; HTTPException: a malformed
    # URL in params (InvalidURL) or a cut chunked transfer (IncompleteRead)
    except (OSError, http.client.HTTPException) as exc:
        raise SourceError(f"download of {url} failed ({exc})") from exc
    return buffer.getvalue()


def read_stored(source: str, name: str, timeout_s: float | None = None) -> tuple[str, bytes]:
    """One file as the source stores it: its file name (`<name>.gz` or `<name>`) and bytes.

    `timeout_s` bounds each network wait of a download (default DOWNLOAD_TIMEOUT_S).
    """
    if is_url(source):
        timeout = DOWNLOAD_TIMEOUT_S if timeout_s is None else timeout_s
        return f"{name}.gz", _download(source, name, timeout)
    return _read_local(local_folder(source), name)


def verified(name: str, file_name: str, blob: bytes) -> bytes:
    """The decompressed bytes of a stored file, refused unless their MD5 is the expected one."""
    data = _decompress(name, blob) if file_name.endswith(".gz") else blob
    actual = md5_hex(data)
    if actual != RAW_MD5[name]:
        raise SourceError(
            f"{name}: MD5 of the decompressed bytes is {actual}, expected {RAW_MD5[name]}"
        )
    return data


def first_good_source(sources: list[str], take: Callable[[str], T]) -> tuple[str, T]:
    """Call `take` on each source in order; return the first that raises no SourceError, with
    what `take` returned. Raises NoGoodSource with every source's reason otherwise."""
    failures = []
    for source in sources:
        try:
            return source, take(source)
        except SourceError as exc:
            failures.append((source, str(exc)))
    raise NoGoodSource(failures)


def fetch(sources: list[str], out: Path) -> str:
    """Fill `out` from the first source that has all four verified files; return that source."""

    def fill(source: str) -> None:
        staging = make_temp_dir(out)
        try:
            raw = raw_folder(staging)
            raw.mkdir(parents=True)
            for name in RAW_MD5:
                (raw / name).write_bytes(verified(name, *read_stored(source, name)))
            replace_dir(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    try:
        return first_good_source(sources, fill)[0]
    except NoGoodSource as exc:
        tried = "; ".join(f"{source}: {reason}" for source, reason in exc.failures)
        raise UserError(
            "no source has verified Fashion-MNIST files "
            f"(tried {tried or 'none: fetch.sources is empty'}). "
            "Fix: `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or set "
            "FASHION_MNIST_DIR to a folder holding the four files, or add a folder holding them "
            "to fetch.sources in params.yaml, or keep the download URL there on a machine with "
            "internet access."
        ) from None


def read_sources(params_path: Path) -> list[str]:
    """`fetch.sources` of a params file, checked to be a list of folders or URLs."""
    sources = (load_params(params_path).get("fetch") or {}).get("sources")
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise UserError(f"fetch.sources in {params_path} must be a list of folders or URLs")
    return sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("data/fashion-mnist"))
    parser.add_argument("--record", type=Path, default=Path("data/fetch.json"))
    parser.add_argument(
        "--source", action="append", help="a folder or URL to try instead of fetch.sources"
    )
    args = parser.parse_args()

    sources = args.source or read_sources(args.params)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    source = fetch(sources, args.out)
    write_json(args.record, {"source": source, "files_md5": RAW_MD5})
    print(f"fetch: Fashion-MNIST verified from {source} into {args.out}")


if __name__ == "__main__":
    run_cli(main)
