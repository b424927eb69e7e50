"""DVC stage `fetch`: put verified Fashion-MNIST files where torchvision reads them.

Sources are tried in the order of `fetch.sources` in params.yaml: local folders (such as the one
Debian's `dataset-fashion-mnist` installs) and HTTP(S) base URLs. A source is used only if all
four files decompress to the expected MD5s; otherwise the next one is tried. The files are
assembled in a temporary folder and moved into place only when all four are verified.
"""

import argparse
import gzip
import http.client
import io
import shutil
import urllib.request
import zlib
from pathlib import Path

from tqdm import tqdm

from stages.config import load_params
from stages.data import RAW_MD5, md5_hex, raw_folder
from stages.errors import UserError, run_cli
from stages.files import make_temp_dir, replace_dir, write_json

DOWNLOAD_TIMEOUT_S = 60


class SourceError(Exception):
    """One source could not supply one file; the next source is tried."""


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _decompress(name: str, blob: bytes) -> bytes:
    try:
        return gzip.decompress(blob)
    except (EOFError, OSError, zlib.error) as exc:
        raise SourceError(f"{name}.gz is not a complete gzip file ({exc})") from exc


def _read_local(folder: Path, name: str) -> bytes:
    try:
        if (folder / f"{name}.gz").is_file():
            return _decompress(name, (folder / f"{name}.gz").read_bytes())
        if (folder / name).is_file():
            return (folder / name).read_bytes()
    except OSError as exc:  # unreadable file: permissions, I/O error
        raise SourceError(f"{name}: cannot read it in {folder} ({exc})") from exc
    raise SourceError(f"{name}.gz is missing in {folder}")


def _download(base_url: str, name: str) -> bytes:
    url = base_url.rstrip("/") + f"/{name}.gz"
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
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
    return _decompress(name, buffer.getvalue())


def _read(source: str, name: str) -> bytes:
    data = (
        _download(source, name) if is_url(source) else _read_local(Path(source).expanduser(), name)
    )
    actual = md5_hex(data)
    if actual != RAW_MD5[name]:
        raise SourceError(
            f"{name}: MD5 of the decompressed bytes is {actual}, expected {RAW_MD5[name]}"
        )
    return data


def fetch(sources: list[str], out: Path) -> str:
    """Fill `out` from the first source that has all four verified files; return that source."""
    failures = []
    for source in sources:
        staging = make_temp_dir(out)
        try:
            raw = raw_folder(staging)
            raw.mkdir(parents=True)
            for name in RAW_MD5:
                (raw / name).write_bytes(_read(source, name))
            replace_dir(staging, out)
            return source
        except SourceError as exc:
            failures.append(f"  - {source}: {exc}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    tried = "\n".join(failures) if failures else "  (fetch.sources is empty)"
    raise UserError(
        "no source has verified Fashion-MNIST files. Tried:\n"
        f"{tried}\n"
        "Fix: `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or add a folder "
        "holding the four files to fetch.sources in params.yaml, or keep the download URL "
        "there on a machine with internet access."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("data/fashion-mnist"))
    parser.add_argument("--record", type=Path, default=Path("data/fetch.json"))
    parser.add_argument(
        "--source", action="append", help="a folder or URL to try instead of fetch.sources"
    )
    args = parser.parse_args()

    if args.source:
        sources = args.source
    else:
        params = load_params(args.params)
        sources = (params.get("fetch") or {}).get("sources")
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise UserError(f"fetch.sources in {args.params} must be a list of folders or URLs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    source = fetch(sources, args.out)
    write_json(args.record, {"source": source, "files_md5": RAW_MD5})
    print(f"fetch: Fashion-MNIST verified from {source} into {args.out}")


if __name__ == "__main__":
    run_cli(main)
