"""End to end: the real DVC pipeline on a small slice of the real data, in a temporary git repo.

One module-scoped project is built and reproduced once; the tests then act on it in order
(repro, no-op repro, an experiment, bad params, the queue).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.pipeline
GIT_IDENTITY = {  # `dvc exp run` commits; a bare CI machine may have no git identity
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}

TINY = {
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


def run(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **GIT_IDENTITY}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def make_project(tmp: Path, shared_data: Path, **params) -> Path:
    """A copy of the tracked project files with tiny params, as a fresh git + DVC repo."""
    project = tmp / "project"
    files = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, project / name)
    values = yaml.safe_load((project / "params.yaml").read_text())
    values.update(TINY, **params)
    values["fetch"]["sources"] = [str(shared_data)]
    (project / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    run(project, "git", "init", "-q")
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "tiny")
    return project


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, shared_data) -> tuple[Path, str]:
    """The tiny project after its first `dvc repro` (committed), and that command's output."""
    project = make_project(tmp_path_factory.mktemp("pipeline"), shared_data)
    first = run(project, "dvc", "repro")
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "repro")
    return project, first.stdout


@pytest.fixture
def project(reproduced) -> Path:
    return reproduced[0]


def test_repro_runs_every_stage_once_then_nothing(reproduced):
    project, first_output = reproduced
    listed = set(run(project, "dvc", "stage", "list", "--name-only").stdout.split())
    assert len(listed) == 9  # fetch, configure, 3 x train, 3 x evaluate, report
    assert stages_run(first_output) == listed
    second = run(project, "dvc", "repro")
    assert stages_run(second.stdout) == set()
    assert "up to date" in run(project, "dvc", "status").stdout
    metrics = json.loads((project / "results" / "metrics.json").read_text())
    assert set(metrics) == {"final", "blocks-2", "radam"}
    assert 0.0 < metrics["final"]["test_accuracy"] <= 1.0
    assert (project / "results" / "report.md").read_text().count("## Study:") == 3
    for name in ("blocks", "optimizer", "final", "confusion_final"):
        png = (project / "results" / "figures" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000


def test_exp_run_reruns_exactly_the_runs_that_use_the_changed_key(project):
    out = run(project, "dvc", "exp", "run", "-S", "optimizer=radam", "--name", "use-radam").stdout
    # `radam` already sets optimizer=radam, so its resolved config is byte-identical.
    assert stages_run(out) == {
        "configure",
        "train@final-0",
        "train@blocks-2-0",
        "evaluate@final-0",
        "evaluate@blocks-2-0",
        "report",
    }
    assert "Stage 'train@radam-0' didn't change, skipping" in out
    metrics = json.loads((project / "results" / "metrics.json").read_text())
    # The base run with radam is the radam run: same config, same seed, same numbers.
    assert metrics["final"]["test_accuracy"] == metrics["radam"]["test_accuracy"]

    shown = json.loads(run(project, "dvc", "exp", "show", "--json").stdout)
    names = [exp.get("name") for base in shown for exp in base.get("experiments") or []]
    assert "use-radam" in names

    diff = json.loads(run(project, "dvc", "metrics", "diff", "HEAD", "use-radam", "--json").stdout)
    assert "final.test_accuracy" in diff["results/metrics.json"]
    plots = json.loads(run(project, "dvc", "plots", "diff", "HEAD", "use-radam", "--json").stdout)
    revisions = {rev for rows in plots["data"].values() for row in rows for rev in row["revisions"]}
    assert {"HEAD", "use-radam"} <= revisions
    run(project, "git", "checkout", "-q", "--", ".")
    run(project, "dvc", "checkout", "-q")


def test_params_typo_fails_cleanly(project):
    before = run(project, "git", "status", "--porcelain").stdout
    lock = (project / "dvc.lock").read_text()

    typo = run(project, "dvc", "exp", "run", "-S", "optimiser=adam", check=False)
    assert typo.returncode != 0
    assert "optimiser" in typo.stdout + typo.stderr
    assert run(project, "git", "status", "--porcelain").stdout == before

    bad = run(project, "dvc", "exp", "run", "-S", "optimizer=adamw", check=False)
    assert bad.returncode != 0
    message = bad.stdout + bad.stderr
    assert "optimizer='adamw' is not allowed; choose one of: adam, radam, sgd" in message
    assert stages_run(message) == {"configure"}  # nothing trained
    assert (project / "dvc.lock").read_text() == lock
    run(project, "git", "checkout", "-q", "--", "params.yaml")  # DVC leaves the typed value
    assert run(project, "git", "status", "--porcelain").stdout == before


def test_two_queued_experiments_run_in_parallel(project):
    run(project, "dvc", "exp", "run", "--queue", "-S", "lr=0.02,0.005")
    run(project, "dvc", "queue", "start", "-j", "2")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = run(project, "dvc", "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert status.count("Success") == 2, status
    shown = json.loads(run(project, "dvc", "exp", "show", "--json").stdout)
    lrs = [
        exp["data"]["params"]["params.yaml"]["data"]["lr"]
        for base in shown
        for exp in base.get("experiments") or []
        if exp.get("revs") and exp["revs"][0].get("data")
        for exp in exp["revs"][:1]
    ]
    assert {0.02, 0.005} <= set(lrs)
