"""Helpers for the end-to-end tests: a tiny copy of the project as a fresh git + DVC repo."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GIT_IDENTITY = {  # `dvc exp run` commits; a bare CI machine may have no git identity
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}
TINY = {
    "seeds": [0],
    "epochs": 1,
    "batch_size": 128,
    "train_limit": 512,
    "val_size": 256,
    "test_limit": 256,
    "runs": {"final": {}, "blocks-2": {"blocks": 2}, "radam": {"optimizer": "radam"}},
    "studies": {
        "blocks": {"final": "1 block", "blocks-2": "2 blocks"},
        "optimizer": {"final": "Adam", "radam": "RAdam"},
        "final": {"final": "final model"},
    },
}


def env() -> dict[str, str]:
    """The project's venv first on PATH, so stages run its `python` and `dvc`."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **GIT_IDENTITY}


def run(
    cwd: Path, *args: str, check: bool = True, timeout: float = 600, log: Path | None = None
) -> subprocess.CompletedProcess:
    """Run a command in the project; a hung command fails the test instead of hanging CI.

    `log` sends the output to a file instead of pipes: `dvc queue start` leaves processes that
    hold its output open until its workers exit, so reading a pipe would wait for them.
    """
    try:
        if log is None:
            proc = subprocess.run(
                args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout
            )
        else:
            with log.open("w") as out:
                proc = subprocess.run(
                    args, cwd=cwd, env=env(), stdout=out, stderr=subprocess.STDOUT, timeout=timeout
                )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{' '.join(args)} did not finish within {timeout} s") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def one_error_line(output: str, prefix: str = "error:") -> str:
    """The one line of `output` starting with `prefix`, asserting that there is exactly one and
    no traceback anywhere."""
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith(prefix)]
    assert len(errors) == 1, output
    return errors[0]


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def make_project(folder: Path, fashion_mnist: Path, **params) -> Path:
    """A copy of the tracked project files with tiny params, as a fresh git + DVC repo, without
    the committed reference (dvc.lock, results/ and the reference's DVC store)."""
    project = folder / "project"
    files = subprocess.run(
        ["git", "ls-files", ":!dvc.lock", ":!results", ":!reference"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    for name in files:
        if (REPO / name).is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, project / name)
    values = yaml.safe_load((project / "params.yaml").read_text())
    values.update(TINY, **params)
    values["fetch"]["sources"] = [str(fashion_mnist)]
    (project / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    run(project, "git", "init", "-q")
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "tiny")
    return project
