"""Test-only (tests/test_faults.py): every Python process started with this folder on PYTHONPATH,
`dvc` itself and each stage alike, logs the files it writes, so that a test that kills the
pipeline can tell what was being written at the moment it killed it.

Set by the test: WRITE_LOG (the log file: one JSON line per event, on the system-wide
monotonic clock) and WRITE_LOG_ROOT (only writes below this folder are logged). Optionally
WRITE_LOG_PAUSE, a JSON object {regular expression: n}: the n-th write in a process whose final
path matches an expression holds still in the middle (a temporary file written but not yet
renamed into place; a plain file opened, so truncated or to be appended to, with nothing written
to it yet), logs "pause" and sleeps for WRITE_LOG_PAUSE_S seconds, so that a kill lands inside.

Events: "proc" (a process started: its command line), "open" (a write began), "pause", "done"
(the file is in place: renamed, closed, or a temporary one removed), "exit".
"""

import atexit
import builtins
import contextlib
import io
import json
import os
import re
import sys
import time

# dvc's lock files are held open while dvc runs; they are locks, not writes
LOCK_FILES = {"lock", "rwlock.lock"}
# stages.files' temporary names: .<name>.<pid>.<8 random characters>, and .tmp for a file
TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.\d+\.[a-z0-9_]{8}\.tmp$")
TEMP_DIR = re.compile(r"^\.(?P<name>.+)\.\d+\.[a-z0-9_]{8}$")


def _install(log: str, root: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    asked = json.loads(os.environ.get("WRITE_LOG_PAUSE", "{}"))
    pauses = {re.compile(pattern): nth for pattern, nth in asked.items()}
    pause_s = float(os.environ.get("WRITE_LOG_PAUSE_S", "5"))
    matched = dict.fromkeys(pauses, 0)
    root = os.path.realpath(root)
    real_open = builtins.open
    # What this process created with os.open or os.mkdir (mkstemp's and mkdtemp's temporaries,
    # DVC's reflinks), and *.tmp files: complete when renamed or removed, not when closed.
    writing: set[str] = set()

    def emit(event: str, **fields) -> None:
        line = {"t": time.monotonic(), "pid": os.getpid(), "event": event, **fields}
        os.write(fd, (json.dumps(line) + "\n").encode())

    def relative(path) -> str | None:
        if isinstance(path, int | bytes):
            return None
        full = os.path.realpath(os.fspath(path))
        if not full.startswith(root + os.sep):
            return None
        rel = full[len(root) + 1 :]
        if rel.startswith(".git" + os.sep) or os.path.basename(rel) in LOCK_FILES:
            return None
        return rel

    def target(rel: str) -> str:
        """The path a write ends up at: a temporary file's or folder's final name."""
        parts = rel.split(os.sep)
        for i, part in enumerate(parts):
            match = TEMP_FILE.match(part) or TEMP_DIR.match(part)
            if match:
                parts[i] = match["name"]
        return os.sep.join(parts)

    def hold(rel: str) -> None:
        for pattern, nth in pauses.items():
            if pattern.search(target(rel)):
                matched[pattern] += 1
                if matched[pattern] == nth:
                    emit("pause", path=rel, target=target(rel))
                    time.sleep(pause_s)

    class Logged:
        """A file open for writing that logs when it is closed: the write is then complete."""

        def __init__(self, file, rel: str):
            self._file, self._rel, self._written = file, rel, False

        def __getattr__(self, name):
            return getattr(self._file, name)

        def _before_writing(self) -> None:
            if not self._written and self._rel not in writing:
                hold(self._rel)  # opened (truncated, or to append to), nothing written yet
            self._written = True

        def write(self, data):
            self._before_writing()
            return self._file.write(data)

        def writelines(self, lines) -> None:
            self._before_writing()
            self._file.writelines(lines)

        def __iter__(self):
            return iter(self._file)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.close()

        def close(self) -> None:
            if self._file.closed:
                return
            self._file.close()
            if self._rel not in writing:
                emit("done", path=self._rel, target=target(self._rel))

        def __del__(self) -> None:
            with contextlib.suppress(Exception):
                self.close()

    def logged_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        rel = relative(file) if any(c in mode for c in "wax+") else None
        if rel is None:
            return handle
        if rel not in writing:
            if rel.endswith(".tmp"):  # another program's temporary: complete once renamed
                writing.add(rel)
            emit("open", path=rel, target=target(rel))
        return Logged(handle, rel)

    def on_event(event: str, args) -> None:
        with contextlib.suppress(Exception):  # raised here, it would fail the write itself
            observe(event, args)

    def observe(event: str, args) -> None:
        if event == "open" and args[1] is None and isinstance(args[2], int):  # os.open
            rel = relative(args[0])
            if rel is not None and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                writing.add(rel)
                emit("open", path=rel, target=target(rel))
        elif event == "os.mkdir":
            rel = relative(args[0])
            if rel is not None and TEMP_DIR.match(os.path.basename(rel)):
                writing.add(rel)
                emit("open", path=rel, target=target(rel))
        elif event == "os.rename":  # os.rename and os.replace
            rel = relative(args[0])
            if rel is not None and (rel in writing or target(rel) != rel):
                hold(rel)
                writing.discard(rel)
                emit("done", path=rel, target=target(rel))
        elif event == "os.remove":
            rel = relative(args[0])
            if rel is not None and rel in writing:
                writing.discard(rel)
                emit("done", path=rel, target=target(rel))

    builtins.open = io.open = logged_open
    sys.addaudithook(on_event)
    emit("proc", argv=sys.orig_argv)
    atexit.register(emit, "exit")


if os.environ.get("WRITE_LOG") and os.environ.get("WRITE_LOG_ROOT"):
    _install(os.environ["WRITE_LOG"], os.environ["WRITE_LOG_ROOT"])
