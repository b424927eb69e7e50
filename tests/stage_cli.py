"""A stage's command line run inside the test process.

Same entry point, arguments, output and exit status as `python -m stages.<name>` run from the
repository, without a new interpreter that imports torch again for every call. Each command
keeps at least one test that runs it as a real process.
"""

import contextlib
import importlib
import io
import subprocess
import sys
from pathlib import Path

from stages.errors import run_cli

REPO = Path(__file__).resolve().parents[1]


def run_stage_cli(module: str, *args: str, own_process: bool = False):
    """`python -m <module> <args>` from the repository: with `own_process` as a real command,
    else in this process."""
    if own_process:
        command = [sys.executable, "-m", module, *args]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    return run_in_process(module, *args)


def run_in_process(module: str, *args: str) -> subprocess.CompletedProcess:
    """Run `module`'s `main` as its `__main__` block does; returns what a subprocess run would."""
    main = importlib.import_module(module).main
    out, err, code = io.StringIO(), io.StringIO(), 0
    saved_argv, sys.argv = sys.argv, [module, *args]
    try:
        with (
            contextlib.chdir(REPO),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            run_cli(main)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = saved_argv
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())
