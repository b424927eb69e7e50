"""stages/files.py after a writer was killed with SIGKILL in the middle of a write: the next write
to the same path removes what the dead writer left, and never what a running writer is using."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from stages.files import make_temp_dir, write_text

REPO = Path(__file__).resolve().parents[1]
# A writer that stops inside its write: it kills itself, or sleeps until it is killed.
WRITER = """
import os, signal, sys, time
from pathlib import Path
from stages.files import atomic_write, make_temp_dir
target, how = Path(sys.argv[1]), sys.argv[2]
def stop(tmp):
    tmp.write_text("half")
    print("writing", flush=True)
    os.kill(os.getpid(), signal.SIGKILL) if how == "die" else time.sleep(60)
if target.suffix == ".txt":
    atomic_write(target, stop)
else:
    stop(make_temp_dir(target) / "part")
"""


def writer(target: Path, how: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target), how],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout.readline() == "writing\n"
    return proc


def others(folder: Path, keep: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != keep)


def test_a_killed_writers_temporary_file_goes_at_the_next_write_a_running_ones_stays(tmp_path):
    target = tmp_path / "out.txt"
    dead = writer(target, "die")
    assert dead.wait(timeout=60) == -signal.SIGKILL
    left = others(tmp_path, "out.txt")
    assert len(left) == 1 and left[0].startswith(f".out.txt.{dead.pid}.")

    running = writer(target, "sleep")
    try:
        assert len(others(tmp_path, "out.txt")) == 1  # its own: the dead one's was removed
        write_text(target, "whole")
        assert target.read_text() == "whole"
        (kept,) = others(tmp_path, "out.txt")
        assert kept.startswith(f".out.txt.{running.pid}.")
    finally:
        running.kill()
        running.wait(timeout=60)
    write_text(target, "again")
    assert others(tmp_path, "out.txt") == []


def test_a_killed_writers_temporary_folder_goes_at_the_next_one(tmp_path):
    target = tmp_path / "plots"
    dead = writer(target, "die")
    assert dead.wait(timeout=60) == -signal.SIGKILL
    (left,) = others(tmp_path, "plots")
    assert (tmp_path / left / "part").read_text() == "half"

    staging = make_temp_dir(target)
    assert others(tmp_path, "plots") == [staging.name]
    assert staging.name.startswith(f".plots.{os.getpid()}.")
