"""Atomic writes: a crash leaves either the old file or the new one, never half of one.

A writer killed mid-write (kill -9) leaves its temporary file or folder behind; the names carry
the writer's process id, and the next write to the same path removes those of writers that no
longer run.
"""

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_abandoned(path: Path, suffix: str) -> None:
    """Remove the temporaries for `path` (named by `_temp_prefix`) of writers no longer running.

    mkstemp and mkdtemp add 8 characters of [a-z0-9_].
    """
    name = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[a-z0-9_]{{8}}{re.escape(suffix)}")
    for entry in os.scandir(path.parent):
        match = name.fullmatch(entry.name)
        if match and not _running(int(match[1])):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                Path(entry.path).unlink(missing_ok=True)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def make_temp_dir(final_dir: Path) -> Path:
    """A temporary folder beside `final_dir` (same file system), with normal permissions."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(final_dir, "")
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final_dir), dir=final_dir.parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary name in the same folder, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(path, ".tmp")
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written folder into place; an old folder at `final_dir` is replaced."""
    final_dir = Path(final_dir)
    old = final_dir.with_name(f".{final_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    shutil.rmtree(old, ignore_errors=True)
